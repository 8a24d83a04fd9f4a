"""Gated FFN input layer (SwiGLU and friends): out = act(x @ Wg.T + bg) * (x @ Wu.T + bu).

The gate and up projections are one fused weight w (2F, K): rows [0, F) gate, [F, 2F) up, so one
GEMM computes both and the product act(gate) * up is this GEMM's epilogue, applied to each block
right after it is computed (still in cache), as linear.py does for its activations:
  many rows: row blocks of a BLAS sgemm over all 2F columns;
  few rows (decoding): column blocks of F, each thread computing the gate *and* up columns of its
  block, so the epilogue never needs another thread's result.
Training also keeps pre (N, 2F) = x @ w.T + b for the backward pass (dpre from swiglu_backward,
then the plain linear backward of the fused weight). Block sizes are run-time arguments (rows /
cols / skinny_max_rows, tunable like the linear forward's: nbformer/tuning/space.py CpuLinearGlu;
by default resolve_blocks: gemm.row_blocks by shape, linear.SKINNY_MAX_ROWS); for given blocks,
results are bit-identical run to run and for any thread count. Training always runs the default
blocks (so its forward gives the inference forward's bits).

act: silu (SwiGLU, Llama), gelu_tanh / gelu (GeGLU), relu (ReGLU), none (bilinear).
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .checks import check_array as _check
from .gemm import COLS, ROWS, by_rows_with, check_threads, num_threads, pin_blas_to_one_thread, row_blocks
from .precompile import BOOL, F2, I64, R1, R2, kernel
from .linear import (ACT_CODES, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU, SKINNY_MAX_ROWS, _blocks,
                     _gelu_erf_f32, _gelu_erf_grad_f32, _gelu_tanh_f32, _gelu_tanh_grad_f32, _sigmoid_f32,
                     _skinny_block, _silu_f32)

_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}  # no nnan/ninf
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(inline="always", fastmath=_FM)
def _glu_row(o, o0, g, u, n, act):
    # o[o0 + j] = act(g[j]) * u[j], j < n; one plain loop per activation so that each vectorises
    if act == ACT_SILU:
        for j in range(n):
            o[o0 + j] = _silu_f32(g[j]) * u[j]
    elif act == ACT_GELU_TANH:
        for j in range(n):
            o[o0 + j] = _gelu_tanh_f32(g[j]) * u[j]
    elif act == ACT_GELU:
        for j in range(n):
            o[o0 + j] = _gelu_erf_f32(g[j]) * u[j]
    elif act == ACT_RELU:
        for j in range(n):
            o[o0 + j] = max(g[j], _ZERO) * u[j]
    else:
        for j in range(n):
            o[o0 + j] = g[j] * u[j]


@kernel((F2, F2, R2, R2, R1, I64, BOOL, BOOL, I64, I64, I64), cost=8.0)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _glu_linear_fwd(out, pre, x, w, b, act, use_bias, keep_pre, rows, cols, skinny):
    # out (N, F); pre (N, 2F) (written when keep_pre); x (N, K); w (2F, K); b (2F,)
    # rows / cols: block sizes; skinny: up to this many rows (>= 2) use _skinny_block (run-time values)
    N, F = out.shape
    M = 2 * F
    if by_rows_with(N, M, rows, cols):
        for c in prange((N + rows - 1) // rows):
            r0 = c * rows
            r1 = min(N, r0 + rows)
            blk = pre[r0:r1] if keep_pre else np.empty((r1 - r0, M), np.float32)
            np.dot(x[r0:r1], w.T, blk)
            for i in range(r0, r1):
                row = blk[i - r0]
                if use_bias:
                    for j in range(M):
                        row[j] += b[j]
                _glu_row(out[i], 0, row[:F], row[F:], F, act)
    else:  # few rows (decoding): blocks of F columns, gate and up of a block in one thread
        for c in prange((F + cols - 1) // cols):
            m0 = c * cols
            m1 = min(F, m0 + cols)
            n = m1 - m0
            tg = np.empty((N, n), np.float32)
            tu = np.empty((N, n), np.float32)
            if 2 <= N <= skinny:
                _skinny_block(tg, x, w, m0, m1)
                _skinny_block(tu, x, w, F + m0, F + m1)
            else:
                np.dot(x, w[m0:m1].T, tg)
                np.dot(x, w[F + m0:F + m1].T, tu)
            for i in range(N):
                g, u = tg[i], tu[i]
                if use_bias:
                    for j in range(n):
                        g[j] += b[m0 + j]
                        u[j] += b[F + m0 + j]
                if keep_pre:
                    p = pre[i]
                    for j in range(n):
                        p[m0 + j] = g[j]
                        p[F + m0 + j] = u[j]
                _glu_row(out[i], m0, g, u, n, act)


def _act_code(op, act):
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    return ACT_CODES[act]


def _check_linear(op, out, x, w, b):
    """Validates the fused input layer's arguments; returns (F, K, N), N the rows of x."""
    _check(op, "x", x, None)
    if x.ndim < 1:
        raise GraphError(f"{op}: 'x' must have shape (..., K), got a 0-d array")
    _check(op, "w", w, None)
    if w.ndim != 2 or w.shape[1] != x.shape[-1] or w.shape[0] % 2:
        raise GraphError(f"{op}: 'w' has shape {w.shape}, expected (2F, {x.shape[-1]}) (gate rows, then up rows)")
    F = w.shape[0] // 2
    _check(op, "out", out, x.shape[:-1] + (F,))
    if b is not None:
        _check(op, "b", b, (2 * F,))
    return F, w.shape[1], math.prod(x.shape[:-1])


def resolve_blocks(N, F, rows, cols):
    """The blocks for N rows of a (2F, K) fused weight: gemm.row_blocks (whole gate | up rows, a
    multiple of the pool's threads; column splits of F measured slower here from 512 rows) when
    neither rows nor cols is given, else the given ones (a missing one: gemm.ROWS / COLS)."""
    if rows is None and cols is None:
        return row_blocks(N, 2 * F)
    return (ROWS if rows is None else rows), (COLS if cols is None else cols)


def swiglu_linear_forward(out, x, w, b=None, act="silu", *, rows=None, cols=None, skinny_max_rows=None,
                          threads=None):
    """out (..., F) = act(x @ w[:F].T + b[:F]) * (x @ w[F:].T + b[F:]); x (..., K), w (2F, K), b (2F,).

    Tunables (None: defaults; see nbformer/tuning/space.py CpuLinearGlu), as linear_forward's:
    rows (row blocks of all 2F columns), cols (column blocks of F when rows are few; both None:
    resolve_blocks by shape), skinny_max_rows (linear.SKINNY_MAX_ROWS) may change the last bits;
    threads never does."""
    op = "swiglu_linear_forward"
    F, K, N = _check_linear(op, out, x, w, b)
    code = _act_code(op, act)
    rows, cols = resolve_blocks(N, F, rows, cols)
    rows, cols, skinny = _blocks(op, rows, cols, skinny_max_rows)
    threads = check_threads(op, threads)
    if N == 0 or F == 0:
        return
    out2 = out.reshape(N, F)
    pin_blas_to_one_thread()
    with num_threads(threads):
        _glu_linear_fwd(out2, out2, x.reshape(N, K), w, w[0] if b is None else b, code, b is not None, False,
                        rows, cols, skinny)


def swiglu_linear_forward_train(out, pre, x, w, b=None, act="silu"):
    """As swiglu_linear_forward, and also writes pre (..., 2F) = x @ w.T + b (gate | up) for backward."""
    op = "swiglu_linear_forward_train"
    F, K, N = _check_linear(op, out, x, w, b)
    _check(op, "pre", pre, x.shape[:-1] + (2 * F,))
    code = _act_code(op, act)
    rows, cols = resolve_blocks(N, F, None, None)  # the inference default: same bits
    if N == 0 or F == 0:
        return
    pin_blas_to_one_thread()
    _glu_linear_fwd(out.reshape(N, F), pre.reshape(N, 2 * F), x.reshape(N, K), w, w[0] if b is None else b,
                    code, b is not None, True, rows, cols, SKINNY_MAX_ROWS)


@kernel((F2, R2, I64), cost=1.5)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _glu_fwd(out, pre, act):
    N, F = out.shape
    for i in prange(N):
        p = pre[i]
        _glu_row(out[i], 0, p[:F], p[F:], F, act)


def swiglu_forward(out, pre, act="silu"):
    """The epilogue on its own: out (..., F) = act(pre[..., :F]) * pre[..., F:], pre (..., 2F)."""
    op = "swiglu_forward"
    _check(op, "pre", pre, None)
    if pre.shape[-1] % 2:
        raise GraphError(f"{op}: 'pre' has {pre.shape[-1]} columns, expected an even number (gate | up)")
    F = pre.shape[-1] // 2
    _check(op, "out", out, pre.shape[:-1] + (F,))
    _glu_fwd(out.reshape(-1, F), pre.reshape(-1, 2 * F), _act_code(op, act))


@kernel((F2, R2, R2, I64), cost=2.5)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _glu_bwd(dpre, dout, pre, act):
    # dpre (N, 2F) written: d gate = dout * up * act'(gate), d up = dout * act(gate)
    N, F = dout.shape
    for i in prange(N):
        p, d, dp = pre[i], dout[i], dpre[i]
        if act == ACT_SILU:
            for j in range(F):
                g = p[j]
                sg = _sigmoid_f32(g)
                dp[F + j] = d[j] * (g * sg)
                dp[j] = d[j] * p[F + j] * (sg * (_ONE + g * (_ONE - sg)))
        elif act == ACT_GELU_TANH:
            for j in range(F):
                dp[F + j] = d[j] * _gelu_tanh_f32(p[j])
                dp[j] = d[j] * p[F + j] * _gelu_tanh_grad_f32(p[j])
        elif act == ACT_GELU:
            for j in range(F):
                dp[F + j] = d[j] * _gelu_erf_f32(p[j])
                dp[j] = d[j] * p[F + j] * _gelu_erf_grad_f32(p[j])
        elif act == ACT_RELU:
            for j in range(F):
                on = p[j] > _ZERO
                dp[F + j] = d[j] * p[j] if on else _ZERO
                dp[j] = d[j] * p[F + j] if on else _ZERO
        else:
            for j in range(F):
                dp[F + j] = d[j] * p[j]
                dp[j] = d[j] * p[F + j]


def swiglu_backward(dpre, dout, pre, act="silu"):
    """Backward of the epilogue: dpre (..., 2F) = [dout * up * act'(gate) | dout * act(gate)] from the
    saved pre (..., 2F) = gate | up and dout (..., F). Written, not accumulated; the fused weight's
    gradients then come from linear_backward(dx, dw, db, dpre, x, w)."""
    op = "swiglu_backward"
    _check(op, "pre", pre, None)
    F = pre.shape[-1] // 2
    if pre.shape[-1] != 2 * F:
        raise GraphError(f"{op}: 'pre' has {pre.shape[-1]} columns, expected an even number (gate | up)")
    _check(op, "dout", dout, pre.shape[:-1] + (F,))
    _check(op, "dpre", dpre, pre.shape)
    _glu_bwd(dpre.reshape(-1, 2 * F), dout.reshape(-1, F), pre.reshape(-1, 2 * F), _act_code(op, act))
