"""RMSNorm over the last axis (Llama): out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).

Forward saves rstd (one float per row) for the backward pass. Row statistics are accumulated in
float64; the dw reduction runs over fixed 64-row chunks in a fixed order, so results are
bit-identical whatever the thread count.
"""
import math

import numpy as np
from numba import njit, prange

from .checks import check_array as _check
from .gemm import check_threads, num_threads
from .precompile import F1, F2, F64, I64, R1, R2, kernel

# safe fastmath subset (no nnan/ninf): the float64 row sums may be reassociated, so they vectorise
_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}
ROWS_PER_CHUNK = 64  # fixed row chunk for the dw partial sums: never depends on the thread count
SERIAL_MAX_ELEMENTS = 32768  # forward on fewer elements runs on the calling thread (same bits)


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _rmsnorm_row(out, rstd, x, w, eps, i):
    xi = x[i]
    C = xi.shape[0]
    s = 0.0
    for c in range(C):
        v = np.float64(xi[c])
        s += v * v
    rf = np.float32(1.0 / math.sqrt(s / C + eps))
    oi = out[i]
    for c in range(C):
        oi[c] = xi[c] * rf * w[c]
    rstd[i] = rf


@kernel((F2, F1, R2, R1, F64), cost=1.0)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _rmsnorm_forward(out, rstd, x, w, eps):
    # x, out (N, C); rstd (N,)
    for i in prange(x.shape[0]):
        _rmsnorm_row(out, rstd, x, w, eps, i)


@kernel((F2, F1, R2, R1, F64), cost=0.5)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rmsnorm_forward_serial(out, rstd, x, w, eps):
    # the same rows on the calling thread: below SERIAL_MAX_ELEMENTS starting the pool costs more
    # than the work (a decode step's 1 x 576 row: ~8 us in parallel, ~1 us here)
    for i in range(x.shape[0]):
        _rmsnorm_row(out, rstd, x, w, eps, i)


def rmsnorm_forward(out, rstd, x, w, eps, *, threads=None):
    """out (..., C) = x * rstd * w with rstd (...) = 1 / sqrt(mean(x^2) + eps), written for backward.
    out may alias x. threads: Numba threads for this call (None: unchanged; 1, or fewer than
    SERIAL_MAX_ELEMENTS elements: the calling thread alone); rows are independent, so never the bits."""
    op = "rmsnorm_forward"
    threads = check_threads(op, threads)
    _check(op, "x", x, None)
    C = x.shape[-1]
    _check(op, "out", out, x.shape)
    _check(op, "w", w, (C,))
    _check(op, "rstd", rstd, x.shape[:-1])
    if x.size <= SERIAL_MAX_ELEMENTS or threads == 1:
        _rmsnorm_forward_serial(out.reshape(-1, C), rstd.reshape(-1), x.reshape(-1, C), w, float(eps))
        return
    with num_threads(threads):
        _rmsnorm_forward(out.reshape(-1, C), rstd.reshape(-1), x.reshape(-1, C), w, float(eps))


@kernel((F2, F1, R2, R2, R1, R1, I64), cost=2.0)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _rmsnorm_backward(dx, dw, dout, x, w, rstd, rows):
    # x, dout, dx (N, C); w, dw (C,); rstd (N,) from the forward
    N, C = x.shape
    nchunk = (N + rows - 1) // rows
    part = np.zeros((nchunk, C))  # float64 per-chunk partial sums of dout * norm
    for k in prange(nchunk):
        pk = part[k]
        for i in range(k * rows, min(N, (k + 1) * rows)):
            r = rstd[i]
            xi, gi, di = x[i], dout[i], dx[i]
            s = 0.0
            for c in range(C):  # mean(dnorm * norm), float64
                s += np.float64(gi[c] * w[c]) * np.float64(xi[c] * r)
            a = np.float32(s / C)
            for c in range(C):
                n = xi[c] * r  # float32, as in the forward
                g = gi[c]  # read before dx is written: dx may alias dout
                pk[c] += g * n
                di[c] = r * (g * w[c] - n * a)
    for c in prange(C):
        sw = 0.0
        for k in range(nchunk):  # fixed order over chunks: deterministic
            sw += part[k, c]
        dw[c] = sw


def rmsnorm_backward(dx, dw, dout, x, w, rstd, *, threads=None):
    """Adjoint of rmsnorm_forward. x, dout, dx (..., C); w, dw (C,); rstd (...).

    With norm = x * rstd and dnorm = dout * w: dx = rstd * (dnorm - norm * mean(dnorm * norm)),
    dw = sum_rows(dout * norm). Both written, not accumulated; dx may alias dout.
    threads: Numba threads for this call (None: unchanged); the 64-row chunks of dw stay fixed, so
    never the bits."""
    op = "rmsnorm_backward"
    threads = check_threads(op, threads)
    _check(op, "x", x, None)
    C = x.shape[-1]
    _check(op, "dout", dout, x.shape)
    _check(op, "dx", dx, x.shape)
    _check(op, "w", w, (C,))
    _check(op, "dw", dw, (C,))
    _check(op, "rstd", rstd, x.shape[:-1])
    with num_threads(threads):
        _rmsnorm_backward(dx.reshape(-1, C), dw, dout.reshape(-1, C), x.reshape(-1, C), w, rstd.reshape(-1),
                          ROWS_PER_CHUNK)
