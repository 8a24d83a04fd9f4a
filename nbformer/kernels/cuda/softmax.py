"""Row softmax / log-softmax over the last axis on the GPU, float32 in and out, float64 sums
(CUDA twin of kernels/cpu/softmax.py).

One block per row: a shared-memory tree max, then a tree sum of exp(x - max) in float64 (fixed
order: the same bits on every run). Rows of all -inf give NaN, like torch and the CPU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import block_max_f64, block_sum_f64, check_device_array, launch_threads

TUNABLES = {
    "softmax_forward": {"threads": 512},  # threads per block (a power of two); one block per row
    "log_softmax_forward": {"threads": 512},
}


@kernel(cache=True)
def _softmax_kernel(out, x, log):
    # x, out (N, V); block i handles row i
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    V = x.shape[1]
    m = -math.inf
    for j in range(tid, V, nt):
        if x[i, j] > m:
            m = float64(x[i, j])
    m = block_max_f64(sh, m, tid, nt)
    s = float64(0.0)
    for j in range(tid, V, nt):
        s += math.exp(float64(x[i, j]) - m)
    s = block_sum_f64(sh, s, tid, nt)
    if log:
        lse = m + math.log(s)
        for j in range(tid, V, nt):
            out[i, j] = float64(x[i, j]) - lse
    else:
        inv = 1.0 / s
        for j in range(tid, V, nt):
            out[i, j] = math.exp(float64(x[i, j]) - m) * inv


def _launch(op, out, x, log, threads):
    check_device_array(op, "x", x)
    if len(x.shape) < 1 or tuple(x.shape)[-1] < 1:
        raise GraphError(f"{op}: 'x' has shape {tuple(x.shape)}, expected (..., V) with V >= 1")
    check_device_array(op, "out", out, x.shape)
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    V = tuple(x.shape)[-1]
    N = int(np.prod(tuple(x.shape)[:-1], dtype=np.int64))
    if N == 0:
        return
    _softmax_kernel[N, t, 0, 8 * t](out.reshape(N, V), x.reshape(N, V), log)


def softmax_forward(out, x, *, threads=None):
    """out (..., V) = softmax(x) over the last axis (device arrays, float32, C-contiguous)."""
    _launch("softmax_forward", out, x, False, threads)


def log_softmax_forward(out, x, *, threads=None):
    """out (..., V) = log_softmax(x) over the last axis (device arrays, float32, C-contiguous)."""
    _launch("log_softmax_forward", out, x, True, threads)
