"""LayerNorm forward over the last axis on the GPU; saves mean and rstd for the backward pass
(CUDA twin of kernels/cpu/layernorm.py).

One block per row. Each thread sums its strided columns in float64, then a fixed-order
shared-memory tree combines the threads: row statistics in float64 like the CPU's, two passes
(mean, then the sum of squared deviations), deterministic bits on every run.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import block_sum_f64, check_device_array, launch_threads

TUNABLES = {"layernorm_forward": {"threads": 128}}  # threads per block (a power of two); one block per row


@kernel(cache=True)
def _layernorm_kernel(out, mean, rstd, x, w, b, eps):
    # x, out (N, C); mean, rstd (N,); w, b (C,); block i normalises row i
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    s = float64(0.0)
    for c in range(tid, C, nt):
        s += float64(x[i, c])
    m = block_sum_f64(sh, s, tid, nt) / C
    v = float64(0.0)
    for c in range(tid, C, nt):
        d = float64(x[i, c]) - m
        v += d * d
    var = block_sum_f64(sh, v, tid, nt) / C
    r = 1.0 / float64(math.sqrt(var + eps))  # float64(): inf, not an exception, under the simulator
    mf = float32(m)
    rf = float32(r)
    for c in range(tid, C, nt):
        out[i, c] = (x[i, c] - mf) * rf * w[c] + b[c]
    if tid == 0:
        mean[i] = mf
        rstd[i] = rf


def layernorm_forward(out, mean, rstd, x, w, b, eps, *, threads=None):
    """out (..., C) = (x - mean) * rstd * w + b; mean, rstd (...) written for backward.

    Device arrays, float32, C-contiguous (views into an arena are fine when contiguous)."""
    op = "layernorm_forward"
    check_device_array(op, "x", x)
    if len(x.shape) < 1 or tuple(x.shape)[-1] < 1:
        raise GraphError(f"{op}: 'x' has shape {tuple(x.shape)}, expected (..., C) with C >= 1")
    C = tuple(x.shape)[-1]
    lead = tuple(x.shape)[:-1]
    check_device_array(op, "out", out, x.shape)
    check_device_array(op, "mean", mean, lead)
    check_device_array(op, "rstd", rstd, lead)
    check_device_array(op, "w", w, (C,))
    check_device_array(op, "b", b, (C,))
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    N = int(np.prod(lead, dtype=np.int64))
    if N == 0:
        return
    _layernorm_kernel[N, t, 0, 8 * t](out.reshape(N, C), mean.reshape(N), rstd.reshape(N), x.reshape(N, C), w, b,
                            float(eps))
