"""Sentence pooling over the token axis (sentence-transformers semantics) and L2 normalisation on
the GPU (CUDA twin of kernels/cpu/pooling.py, same MODES).

pool: one thread per output element (b, c) walks the tokens in order, summing in float64 exactly as
the CPU does (the same bits). l2_normalize: one block per row, a fixed-order shared-memory tree of
float64 squares. Rows whose mask is all padding pool to 0 (mean, max) like the CPU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import block_sum_f64, check_device_array, grid_blocks, launch_threads

MODES = {"mean": 0, "cls": 1, "max": 2, "mean_sqrt_len": 3, "lasttoken": 4}

TUNABLES = {
    "pool": {"threads": 128, "max_blocks": 8192},  # grid-stride over the (B, C) outputs
    "l2_normalize": {"threads": 128},  # threads per block (a power of two); one block per row
}


@kernel(cache=True)
def _pool_kernel(out, x, mask, mode):
    # out (B, C); x (B, T, C); mask (B, T) u8 with 1 = real token
    B, T, C = x.shape
    for i in range(cuda.grid(1), B * C, cuda.gridsize(1)):
        b = i // C
        c = i - b * C
        n = 0
        last = 0
        for t in range(T):
            if mask[b, t]:
                n += 1
                last = t
        if mode == 1:
            out[b, c] = x[b, 0, c]
        elif mode == 4:
            out[b, c] = x[b, last, c]
        elif mode == 2:
            m = -math.inf
            for t in range(T):
                if mask[b, t] and x[b, t, c] > m:
                    m = float64(x[b, t, c])
            out[b, c] = m if n > 0 else 0.0
        else:
            s = float64(0.0)
            for t in range(T):
                if mask[b, t]:
                    s += float64(x[b, t, c])
            d = max(float64(n), 1e-9)
            if mode == 3:
                d = math.sqrt(d)
            out[b, c] = s / d


@kernel(cache=True)
def _l2_kernel(x):
    # x (N, C) in place; torch.nn.functional.normalize semantics (eps 1e-12); block i: row i
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    s = float64(0.0)
    for c in range(tid, C, nt):
        v = float64(x[i, c])
        s += v * v
    s = block_sum_f64(sh, s, tid, nt)
    inv = 1.0 / max(math.sqrt(s), 1e-12)
    for c in range(tid, C, nt):
        x[i, c] = float64(x[i, c]) * inv


def pool(out, x, mask, mode="mean", *, threads=None, max_blocks=None):
    """out (B, C) = pooling of x (B, T, C) over the tokens where mask (B, T) uint8 is 1.

    Modes as the CPU's MODES. Device arrays, C-contiguous; T >= 1."""
    op, tun = "pool", TUNABLES["pool"]
    if mode not in MODES:
        raise GraphError(f"pool: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    check_device_array(op, "x", x, ndim=3)
    B, T, C = x.shape
    if T < 1:
        raise GraphError(f"pool: 'x' has shape {tuple(x.shape)}, expected at least one token")
    check_device_array(op, "out", out, (B, C))
    check_device_array(op, "mask", mask, (B, T), np.uint8)
    t = launch_threads(op, tun, threads)
    if B * C == 0:
        return
    _pool_kernel[grid_blocks(op, tun, B * C, t, max_blocks), t](out, x, mask, MODES[mode])


def l2_normalize(x, *, threads=None):
    """x (..., C) /= max(||x||_2, 1e-12) per row, in place (device array, float32, C-contiguous)."""
    op = "l2_normalize"
    check_device_array(op, "x", x)
    if len(x.shape) < 1:
        raise GraphError(f"{op}: 'x' must have at least one dimension")
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    C = tuple(x.shape)[-1]
    N = int(np.prod(tuple(x.shape)[:-1], dtype=np.int64))
    if N * C == 0:
        return
    _l2_kernel[N, t, 0, 8 * t](x.reshape(N, C))
