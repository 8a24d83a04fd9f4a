"""LayerNorm forward over the last axis; saves mean and rstd for the backward pass.

Launchers take `threads=None` (the Numba threads for the call; None: unchanged): every row (forward,
backward dx) and every fixed 64-row chunk of the dw/db partial sums is one thread's alone and the
chunks are reduced in a fixed order, so the thread count never changes a bit (the tuner's
cpu.layernorm / cpu.layernorm_backward families, nbformer/tuning/space.py)."""
import math

import numpy as np
from numba import njit, prange

from .checks import check_array as _check
from .gemm import check_threads, num_threads
from .precompile import F1, F2, F64, I64, R1, R2, kernel


# safe fastmath subset (no nnan/ninf): the float64 row sums may be reassociated, so they vectorise
_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}


@kernel((F2, F1, F1, R2, R1, R1, F64), cost=1.4)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _layernorm_forward(out, mean, rstd, x, w, b, eps):
    # x, out (N, C); mean, rstd (N,); row statistics accumulated in float64
    N, C = x.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += x[i, c]
        m = s / C
        v = 0.0
        for c in range(C):
            d = x[i, c] - m
            v += d * d
        r = 1.0 / math.sqrt(v / C + eps)
        mf = np.float32(m)
        rf = np.float32(r)
        for c in range(C):
            out[i, c] = (x[i, c] - mf) * rf * w[c] + b[c]
        mean[i] = mf
        rstd[i] = rf


def layernorm_forward(out, mean, rstd, x, w, b, eps, *, threads=None):
    """out (..., C) = (x - mean) * rstd * w + b; mean, rstd (...) written for backward.
    threads: Numba threads for this call (None: unchanged); never changes the bits."""
    C = x.shape[-1]
    threads = check_threads("layernorm_forward", threads)
    with num_threads(threads):
        _layernorm_forward(out.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1), x.reshape(-1, C), w, b,
                           float(eps))


# ---------------------------------------------------------------- backward
ROWS_PER_CHUNK = 64  # fixed row chunk for the dw/db partial sums: never depends on the thread count


@kernel((F2, F1, F1, R2, R2, R1, R1, R1, I64), cost=3.6)
@njit(parallel=True, cache=True)
def _layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, rows):
    # x, dout, dx (N, C); w, dw, db (C,); mean, rstd (N,) from the forward
    N, C = x.shape
    nchunk = (N + rows - 1) // rows
    part = np.zeros((nchunk, 2, C))  # float64 per-chunk partial sums of dout*norm and dout
    for k in prange(nchunk):
        for i in range(k * rows, min(N, (k + 1) * rows)):
            m = mean[i]
            r = rstd[i]
            s1 = 0.0
            s2 = 0.0
            for c in range(C):  # row reductions (sequential, float64)
                n = (x[i, c] - m) * r  # float32, as in the forward
                dn = dout[i, c] * w[c]
                s1 += dn
                s2 += dn * n
            a = np.float32(s1 / C)
            bb = np.float32(s2 / C)
            for c in range(C):  # elementwise, vectorizable
                n = (x[i, c] - m) * r
                g = dout[i, c]
                dx[i, c] = r * (g * w[c] - a - n * bb)
                part[k, 0, c] += g * n
                part[k, 1, c] += g
    for c in prange(C):
        sw = 0.0
        sb = 0.0
        for k in range(nchunk):  # fixed order over chunks: deterministic
            sw += part[k, 0, c]
            sb += part[k, 1, c]
        dw[c] = sw
        db[c] = sb


def layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, *, threads=None):
    """Adjoint of layernorm_forward. x, dout, dx (..., C); w, dw, db (C,); mean, rstd (...).

    dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) with dnorm = dout * w;
    dw = sum_rows(dout * norm), db = sum_rows(dout). All three are written, not accumulated;
    dw/db are reduced over fixed 64-row chunks in a fixed order (bit-identical for any thread count).
    threads: Numba threads for this call (None: unchanged); the chunk stays fixed (not tunable).
    """
    op = "layernorm_backward"
    _check(op, "x", x, None)
    C = x.shape[-1]
    lead = x.shape[:-1]
    _check(op, "dout", dout, x.shape)
    _check(op, "dx", dx, x.shape)
    for name, a in (("w", w), ("dw", dw), ("db", db)):
        _check(op, name, a, (C,))
    _check(op, "mean", mean, lead)
    _check(op, "rstd", rstd, lead)
    threads = check_threads(op, threads)
    with num_threads(threads):
        _layernorm_backward(dx.reshape(-1, C), dw, db, dout.reshape(-1, C), x.reshape(-1, C), w,
                            mean.reshape(-1), rstd.reshape(-1), ROWS_PER_CHUNK)
