"""Linear layers: GEMM plus our fused bias/activation/residual epilogue, forward and backward.

GEMMs: on a host with AMX (gemm_amx.available()), every product big enough (gemm_amx.worth) runs
there, fp32-accurate from bfloat16 splits, all through one kernel (_linear_amx): the forward
(weight panels kept for read-only weights, packed per call for training's writable ones) and the
backward's dX = G @ W and dW = G.T @ X. Elsewhere (and for small products: decoding, few rows) BLAS
sgemm calls on blocks, one block per Numba thread, each block's epilogue fused right after its GEMM
(see gemm.py for why BLAS itself runs single-threaded). Everything elementwise (epilogues,
activation backward, the deterministic bias-gradient reduction) is our own njit code.

Weights use the nn.Linear layout w (M, K): out (N, M) = act(x (N, K) @ w.T + b) + residual.
"""
import math

import numba
import numpy as np
from numba import njit, prange

from ...errors import GraphError
from . import gemm_amx
from .checks import check_array as _check
from .attention import _exp2
from .gemm import (COLS, ROWS, auto_blocks, by_rows_with, check_threads, matmul_nn, matmul_tn, num_threads,
                   pin_blas_to_one_thread, sgemm_rows, tn_rows)
from .precompile import BOOL, F1, F2, F64, I64, R1, R2, array, kernel, native_address, native_caller

ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3, 4
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU}

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(inline="always")
def activate(v, act):
    if act == ACT_RELU:
        return v if v > 0.0 else 0.0 * v
    if act == ACT_GELU:
        return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
    if act == ACT_GELU_TANH:
        return 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    if act == ACT_SILU:
        return v / (1.0 + math.exp(-v)) if v >= 0.0 else v * math.exp(v) / (1.0 + math.exp(v))
    return v


# Vectorisable float32 GELUs for the forward epilogue: libm's tanhf/erff are scalar calls (no
# SVML here) and doubled the time of the FFN's first linear layer. Both are built on the
# polynomial exp2 of the attention kernel (rel. error ~1e-7); max abs error vs float64 ~3e-7.
_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}  # no nnan/ninf
_F_LOG2E = np.float32(1.4426950408889634)
_F_K0 = np.float32(math.sqrt(2.0 / math.pi))
_F_K1 = np.float32(0.044715)
_F_ONE = np.float32(1.0)
_F_HALF = np.float32(0.5)
_F_RSQRT2 = np.float32(1.0 / math.sqrt(2.0))
# erfc(z) = t * exp(-z*z + P(t)), t = 1 / (1 + z/2), z >= 0; fractional error < 1.2e-7
# (Numerical Recipes' Chebyshev fit, W. H. Press et al.)
_ERFC = tuple(np.float32(c) for c in (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                                      0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277))


@njit(inline="always", fastmath=_FM)
def _erfc_abs(x):
    """erfc(|x|) in float32 (fractional error < 1.2e-7)."""
    z = abs(x)
    t = _F_ONE / (_F_ONE + _F_HALF * z)
    p = _ERFC[9]
    for k in range(8, -1, -1):
        p = p * t + _ERFC[k]
    return t * _exp2((p - z * z) * _F_LOG2E)


@njit(inline="always", fastmath=_FM)
def _gelu_tanh_f32(v):
    # 0.5 v (1 + tanh(u)) = v * sigmoid(2u), with exp of a non-positive argument only
    u = _F_K0 * (v + _F_K1 * v * v * v)
    t = _exp2(np.float32(-2.0) * abs(u) * _F_LOG2E)
    r = v / (_F_ONE + t)
    return r if u >= 0 else r * t


@njit(inline="always", fastmath=_FM)
def _gelu_erf_f32(v):
    erfc = _erfc_abs(v * _F_RSQRT2)
    # 0.5 v (1 + erf(v/sqrt2)): erf = 1 - erfc for v >= 0, erfc - 1 for v < 0
    return _F_HALF * v * (np.float32(2.0) - erfc) if v >= 0 else _F_HALF * v * erfc


@njit(inline="always", fastmath=_FM)
def _sigmoid_f32(v):
    # exp of a non-positive argument only: no overflow for large |v|
    t = _exp2(-abs(v) * _F_LOG2E)
    r = _F_ONE / (_F_ONE + t)
    return r if v >= 0 else r * t


@njit(inline="always", fastmath=_FM)
def _silu_f32(v):
    return v * _sigmoid_f32(v)


SRC_OUT, SRC_PRE, SRC_TMP = 0, 1, 2  # where the GEMM block the epilogue reads lives


@njit(inline="always", fastmath=_FM)
def _act_row(o, row, res, m0, n, act, use_residual, copy):
    # o[m0 + j] = act(row[j]) (+ res[m0 + j]); res is read before o is written, element by element,
    # so o may alias res. One plain loop per case, so that each vectorises.
    if act == ACT_GELU_TANH:
        if use_residual:
            for j in range(n):
                o[m0 + j] = _gelu_tanh_f32(row[j]) + res[m0 + j]
        else:
            for j in range(n):
                o[m0 + j] = _gelu_tanh_f32(row[j])
    elif act == ACT_GELU:
        if use_residual:
            for j in range(n):
                o[m0 + j] = _gelu_erf_f32(row[j]) + res[m0 + j]
        else:
            for j in range(n):
                o[m0 + j] = _gelu_erf_f32(row[j])
    elif act == ACT_SILU:
        if use_residual:
            for j in range(n):
                o[m0 + j] = _silu_f32(row[j]) + res[m0 + j]
        else:
            for j in range(n):
                o[m0 + j] = _silu_f32(row[j])
    elif act == ACT_RELU:
        if use_residual:
            for j in range(n):
                o[m0 + j] = max(row[j], np.float32(0.0)) + res[m0 + j]
        else:
            for j in range(n):
                o[m0 + j] = max(row[j], np.float32(0.0))
    elif use_residual:
        for j in range(n):
            o[m0 + j] = row[j] + res[m0 + j]
    elif copy:
        for j in range(n):
            o[m0 + j] = row[j]


# The epilogue is an ordinary (not IR-inlined) function called from the parallel loops: Numba then
# types and lowers it once instead of copying its IR, with every activation's inlined body, into
# both prange bodies (that halved this kernel's compile time); LLVM still inlines it into the
# parallel loop bodies, where the arrays are known not to alias (as fast as the inlined original;
# called instead through a native address, like attention's work item, it ran 10-20 % slower).
@njit(fastmath=_FM, error_model="numpy")
def _epilogue_row(out, pre, src, i, r, m0, m1, b, act, residual, use_bias, use_residual, keep_pre, src_kind):
    # out[i, m0:m1] = act(src[r, :] + b) (+ residual[i]); src[r] is this row's GEMM result
    n = m1 - m0
    row = src[r]
    if use_bias:
        for j in range(n):
            row[j] += b[m0 + j]
    if keep_pre and src_kind != SRC_PRE:
        for j in range(n):
            pre[i, m0 + j] = row[j]
    _act_row(out[i], row, residual[i], m0, n, act, use_residual, src_kind != SRC_OUT)


SKINNY_MAX_ROWS = 16  # 2..16 rows (batched / beam decoding): our kernel instead of sgemm (default; tunable)


@njit(inline="always", fastmath=_FM)
def _skinny_block(tmp, x, w, m0, m1):
    # tmp (N, m1 - m0) = x (N, K) @ w[m0:m1].T for a few rows: each weight row is read from memory
    # once and used for 4 rows of x at a time (x stays in L1). sgemm packs the whole weight block
    # for M = 2..16 rows and reached 6-7 GB/s on a Marian LM head; this reaches 19-28 GB/s.
    N, K = x.shape
    for j in range(m0, m1):
        wj = w[j]
        c = j - m0
        i = 0
        while i + 4 <= N:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                v = wj[k]
                a0 += x0[k] * v
                a1 += x1[k] * v
                a2 += x2[k] * v
                a3 += x3[k] * v
            tmp[i, c], tmp[i + 1, c], tmp[i + 2, c], tmp[i + 3, c] = a0, a1, a2, a3
            i += 4
        while i < N:
            xi = x[i]
            acc = np.float32(0.0)
            for k in range(K):
                acc += xi[k] * wj[k]
            tmp[i, c] = acc
            i += 1


# error_model numpy: division without Python's zero check, and the safe fastmath subset: the
# epilogue loops then vectorise (GELU 8x faster than with libm calls and checked division)
@kernel((F2, F2, R2, R2, R1, I64, R2, BOOL, BOOL, BOOL, I64, I64, I64), cost=9.0)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _linear_fwd(out, pre, x, w, b, act, residual, use_bias, use_residual, keep_pre, rows, cols, skinny):
    # out, pre, residual (N, M); x (N, K); w (M, K). One GEMM block per thread, epilogue right after.
    # rows / cols: block sizes (gemm.ROWS / COLS by default); skinny: up to this many rows (>= 2)
    # use _skinny_block instead of sgemm. Run-time values: tuning them compiles nothing.
    N, M = out.shape
    K = x.shape[1]
    plain = not use_bias and act == ACT_NONE and not use_residual and not keep_pre
    # one parallel loop for both splits (row blocks; or, for few rows, column blocks): its body,
    # the epilogue inlined once, is compiled once instead of twice (a cold start's longest kernel)
    by_rows = by_rows_with(N, M, rows, cols)
    n_blocks = (N + rows - 1) // rows if by_rows else (M + cols - 1) // cols
    for c in prange(n_blocks):
        if by_rows:
            r0, r1, m0, m1 = c * rows, min(N, (c + 1) * rows), 0, M
        else:  # few rows (decoding): blocks of columns
            r0, r1, m0, m1 = 0, N, c * cols, min(M, (c + 1) * cols)
        if by_rows and plain:
            np.dot(x[r0:r1], w.T, out[r0:r1])
            continue
        if plain and not 2 <= N <= skinny:  # a block of columns of out, written in place
            sgemm_rows(False, True, N, m1 - m0, K, x, K, w[m0:], K, out[:, m0:], M)
            continue
        if by_rows:
            # the GEMM block goes to pre, or to a scratch block: an epilogue that read and wrote
            # the same row would defeat vectorisation (and give other bits than training's path)
            blk = pre[r0:r1] if keep_pre else np.empty((r1 - r0, M), np.float32)
            np.dot(x[r0:r1], w.T, blk)
        else:
            blk = np.empty((N, m1 - m0), np.float32)
            if 2 <= N <= skinny:
                _skinny_block(blk, x, w, m0, m1)
            else:  # one row: BLAS sgemv is at the bandwidth already
                np.dot(x, w[m0:m1].T, blk)
        src = SRC_PRE if by_rows and keep_pre else SRC_TMP
        for i in range(r0, r1):
            _epilogue_row(out, pre, blk, i, i - r0, m0, m1, b, act, residual, use_bias, use_residual, keep_pre,
                          src)


DST_OUT, DST_TMP, DST_PRE = 0, 1, 2  # where the AMX product goes (see _linear_amx)
B_PACKED, B_FROM_WT, B_FROM_ROWS = gemm_amx.B_PACKED, gemm_amx.B_FROM_WT, gemm_amx.B_FROM_ROWS


def _linear_amx(out, pre, x, w, pb, b, act, residual, use_bias, use_residual, keep_pre, b_mode, a_trans, dst_kind,
                pa, tc, kb, T, cfg, stream):
    # Every product of a linear layer on AMX (gemm_amx), in one kernel (training compiles one):
    #   out (R, C) = act(A @ B + b) [+ residual], A = x (R, K), or x.T (x (K, R)) where a_trans;
    #   B = w.T (w (C, K), nn.Linear's weight) or w itself (w (K, C), b_mode B_FROM_ROWS).
    # The forward: B = w.T, its panels pb kept (B_PACKED) or packed here (B_FROM_WT: a weight updated
    # in place, as training's), keep_pre: pre = A @ B + b. The backward: dX = G @ W and dW = G.T @ X
    # (a_trans), B_FROM_ROWS, no epilogue. Panels are packed as gemm_amx.product_blocks says. The
    # product goes to out (DST_OUT: no epilogue, whole blocks), to tc (DST_TMP: padded scratch) or
    # to pre (DST_PRE: keep_pre, whole blocks), then the epilogue over the rows (the same
    # _epilogue_row as the BLAS path; a plain copy from tc). stream: gemm_amx.streams(out) (DST_OUT).
    R, C = out.shape
    dst = out if dst_kind == DST_OUT else (pre if dst_kind == DST_PRE else tc)
    gemm_amx.product_blocks(dst, x, pa, w, pb, a_trans, b_mode, kb, T, cfg, stream and dst_kind == DST_OUT)
    if dst_kind != DST_OUT:
        src = SRC_PRE if dst_kind == DST_PRE else SRC_TMP
        for i in prange(R):
            _epilogue_row(out, pre, dst, i, i, 0, C, b, act, residual, use_bias, use_residual, keep_pre, src)


if gemm_amx.HOST_HAS_AMX:  # (tile instructions do not compile for other hosts)
    _U16_3, _U8_1 = array(numba.types.uint16, 3), array(numba.types.uint8, 1)
    _linear_amx = kernel((F2, F2, R2, R2, _U16_3, R1, I64, R2, BOOL, BOOL, BOOL, I64, BOOL, I64, _U16_3, F2, I64, I64,
                          _U8_1, BOOL), cost=5.0)(
        njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)(_linear_amx))
else:
    _linear_amx = None


def _on_amx(R, C, K):
    """Whether an (R x K) @ (K x C) product of a linear layer runs on AMX (gemm_amx: this host and
    process, and a product big enough to pay for padding and packing)."""
    return gemm_amx.worth(R, C, K) and gemm_amx.available()


def _amx_forward(out2, pre2, x2, w, b, code, res2, use_bias, use_res, keep_pre):
    """linear_forward (keep_pre False; pre2 unused) or linear_forward_train on AMX, out2 (N, M) =
    act(x2 (N, K) @ w.T + b) [+ res2]; the caller checked _on_amx. A read-only w's panels are kept
    (gemm_amx.packed_weight); a writable one's (or one the cache cannot hold) are packed for this
    call, inside the kernel."""
    N, M = out2.shape
    K = x2.shape[1]
    aligned = N % 32 == 0 and M % 32 == 0
    plain = not use_bias and code == ACT_NONE and not use_res
    kind = (DST_PRE if keep_pre else (DST_OUT if plain else DST_TMP)) if aligned else DST_TMP
    pa, pb, tc = gemm_amx.panels(N, M, K, kind == DST_TMP)
    kept = gemm_amx.packed_weight(w)
    _linear_amx(out2, pre2, x2, w, pb if kept is None else kept, b, code, res2, use_bias, use_res, keep_pre,
                B_FROM_WT if kept is None else B_PACKED, False, kind, pa, tc, gemm_amx.K_BLOCK,
                numba.get_num_threads(), gemm_amx.config(), kind == DST_OUT and gemm_amx.streams(out2))


def _amx_product(out, a, b, a_trans):
    """out (R, C) = a (R, K) @ b (K, C), or a.T @ b (a (K, R)) where a_trans, on AMX (the backward's
    dX = G @ W and dW = G.T @ X): _linear_amx without an epilogue; the caller checked _on_amx."""
    R, C = out.shape
    K = b.shape[0]
    kind = DST_OUT if R % 32 == 0 and C % 32 == 0 else DST_TMP
    pa, pb, tc = gemm_amx.panels(R, C, K, kind == DST_TMP)
    _linear_amx(out, out, a, b, pb, b[0], ACT_NONE, out, False, False, False, B_FROM_ROWS, a_trans, kind, pa, tc,
                gemm_amx.K_BLOCK, numba.get_num_threads(), gemm_amx.config(), kind == DST_OUT and gemm_amx.streams(out))


def resolve_blocks(N, M, rows, cols):
    """linear_forward's GEMM blocks for an (N, M) output: gemm.auto_blocks when neither rows nor cols
    is given, else the given ones (a missing one: gemm.ROWS / COLS). Shared with the tuning family."""
    if rows is None and cols is None:
        return auto_blocks(N, M)
    return (ROWS if rows is None else rows), (COLS if cols is None else cols)


def _blocks(op, rows, cols, skinny_max_rows):
    """The block tunables (None: the defaults ROWS, COLS, SKINNY_MAX_ROWS), checked."""
    vals = []
    for name, v, default, lo in (("rows", rows, ROWS, 1), ("cols", cols, COLS, 1),
                                 ("skinny_max_rows", skinny_max_rows, SKINNY_MAX_ROWS, 0)):
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= 1 << 20:
            raise GraphError(f"{op}: tunable '{name}' is {v!r}, expected an int in [{lo}, {1 << 20}]")
        vals.append(int(v))
    return vals


def _check_forward(op, out, pre, x, w, b, residual):
    """Validates a linear forward's arguments (float32, C-contiguous, shapes agreeing with x (..., K) and
    w (M, K)); returns (N, M, K), N the rows of x. pre None: not checked (inference)."""
    _check(op, "x", x, None)
    if x.ndim < 1:
        raise GraphError(f"{op}: 'x' must have shape (..., K), got a 0-d array")
    _check(op, "w", w, None)
    K = x.shape[-1]
    if w.ndim != 2 or w.shape[1] != K:
        raise GraphError(f"{op}: 'w' has shape {w.shape}, expected (M, {K}) (nn.Linear layout)")
    M = w.shape[0]
    oshape = x.shape[:-1] + (M,)
    _check(op, "out", out, oshape)
    if pre is not None:
        _check(op, "pre", pre, oshape)
    if b is not None:
        _check(op, "b", b, (M,))
    if residual is not None:
        _check(op, "residual", residual, oshape)
    return math.prod(x.shape[:-1]), M, K


def linear_forward(out, x, w, b=None, act="none", residual=None, *, rows=None, cols=None, skinny_max_rows=None,
                   threads=None):
    """out (..., M) = act(x (..., K) @ w.T + b) [+ residual (..., M)]; out must not alias x or residual (BLAS writes it first).

    Tunables (None: defaults; see nbformer/tuning/space.py): rows / cols, the GEMM block sizes
    (both None: gemm.auto_blocks for this shape; one None: gemm.ROWS / COLS for it); skinny_max_rows, the most rows (>= 2) that use the few-row kernel instead of
    sgemm; threads, the Numba threads for this call. Blocks and skinny_max_rows may change the last
    bits (other sgemm call shapes), threads never does.

    On a host with AMX (gemm_amx.available()), a product big enough (gemm_amx.worth) runs there,
    fp32-accurate from bfloat16 splits: a read-only weight's packed panels are kept (an inference
    model's: Model binds read-only views; gemm_amx.packed_weight), a writable one's (training's,
    updated in place) packed at every call; unless rows or cols is given: blocks name a BLAS
    schedule, which then runs as given (so the tuner, whose "auto" blocks are None here, compares
    the two)."""
    op = "linear_forward"
    N, M, K = _check_forward(op, out, None, x, w, b, residual)
    code = _act_code(op, act)
    blas_schedule = rows is not None or cols is not None  # blocks given: the BLAS schedule they name
    if rows is None and cols is None:
        rows, cols = auto_blocks(N, M)
    rows, cols, skinny = _blocks(op, rows, cols, skinny_max_rows)
    threads = check_threads(op, threads)
    if N == 0 or M == 0:
        return
    out2, x2 = out.reshape(N, M), x.reshape(N, K)
    use_bias, use_res = b is not None, residual is not None
    res2 = residual.reshape(N, M) if use_res else out2
    if not blas_schedule and _on_amx(N, M, K):
        with num_threads(threads):
            _amx_forward(out2, out2, x2, w, b if use_bias else w[0], code, res2, use_bias, use_res, False)
        return
    pin_blas_to_one_thread()
    with num_threads(threads):
        _linear_fwd(out2, out2, x2, w, b if use_bias else w[0], code, res2, use_bias, use_res, False, rows, cols, skinny)


# ---------------------------------------------------------------- training: forward that saves pre, backward
ROWS_PER_CHUNK = 64  # fixed row chunk for the db partial sums: never depends on the thread count
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_K = 0.044715


@njit(inline="always")
def activate_grad(v, act):
    """d act(v) / dv in float64 (gelu_tanh matches torch's approximate='tanh' backward)."""
    v = np.float64(v)
    if act == ACT_RELU:
        return 1.0 if v > 0.0 else 0.0
    if act == ACT_GELU:
        return 0.5 * (1.0 + math.erf(v * _SQRT_HALF)) + v * math.exp(-0.5 * v * v) * _INV_SQRT_2PI
    if act == ACT_GELU_TANH:
        x2 = v * v
        t = math.tanh(_SQRT_2_OVER_PI * (v + _GELU_K * x2 * v))
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x2)
    if act == ACT_SILU:
        s = 1.0 / (1.0 + math.exp(-v)) if v >= 0.0 else math.exp(v) / (1.0 + math.exp(v))
        return s * (1.0 + v * (1.0 - s))
    return 1.0


_F_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))


@njit(inline="always", fastmath=_FM)
def _gelu_tanh_grad_f32(v):
    # d/dv 0.5 v (1 + tanh(u)), u = k0 (v + k1 v^3); tanh from exp of a non-positive argument
    u = _F_K0 * (v + _F_K1 * v * v * v)
    t = _exp2(np.float32(-2.0) * abs(u) * _F_LOG2E)
    th = (_F_ONE - t) / (_F_ONE + t)
    th = th if u >= 0 else -th
    return _F_HALF * (_F_ONE + th) + _F_HALF * v * (_F_ONE - th * th) * _F_K0 * (
        _F_ONE + np.float32(3.0) * _F_K1 * v * v)


@njit(inline="always", fastmath=_FM)
def _gelu_erf_grad_f32(v):
    # Phi(v) + v phi(v); Phi from the same erfc fit as the forward
    erfc = _erfc_abs(v * _F_RSQRT2)
    cdf = _F_ONE - _F_HALF * erfc if v >= 0 else _F_HALF * erfc
    return cdf + v * _exp2(-_F_HALF * v * v * _F_LOG2E) * _F_INV_SQRT_2PI


_BACKWARD_ROWS_SIG = (array(F64, 1), R2, R2, F2, I64, BOOL, I64, I64)


@kernel(_BACKWARD_ROWS_SIG, cost=1.9)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _backward_rows(pk, dout, pre, g, act, use_db, r0, r1):
    # rows [r0, r1) of g = dout * act'(pre), their column sums added to pk (float64)
    M = dout.shape[1]
    for i in range(r0, r1):
        d, gi = dout[i], g[i]
        if act == ACT_GELU_TANH:
            pi = pre[i]
            for j in range(M):
                gi[j] = d[j] * _gelu_tanh_grad_f32(pi[j])
        elif act == ACT_GELU:
            pi = pre[i]
            for j in range(M):
                gi[j] = d[j] * _gelu_erf_grad_f32(pi[j])
        elif act == ACT_SILU:
            pi = pre[i]
            for j in range(M):
                # d/dv v s(v) = s (1 + v (1 - s))
                sg = _sigmoid_f32(pi[j])
                gi[j] = d[j] * (sg * (_F_ONE + pi[j] * (_F_ONE - sg)))
        elif act == ACT_RELU:
            pi = pre[i]
            for j in range(M):
                gi[j] = d[j] if pi[j] > 0 else np.float32(0.0)
        if use_db:
            src = gi if act != ACT_NONE else d
            for j in range(M):
                pk[j] += src[j]


_call_backward_rows = native_caller(_BACKWARD_ROWS_SIG)


@kernel((F1, R2, R2, F2, I64, BOOL, I64, I64), cost=2.4)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _linear_backward_elementwise(db, dout, pre, g, act, use_db, rows, backward_rows):
    # dout, pre, g (N, M); db (M,). g = dout * act'(pre); db = column sums of g over fixed row
    # chunks (float64 partials), reduced in a fixed order: deterministic for any thread count.
    # The chunk body is its own cached kernel, called through its native address (backward_rows),
    # as _linear_fwd calls its epilogue.
    N, M = dout.shape
    nchunk = (N + rows - 1) // rows
    part = np.zeros((nchunk if use_db else 1, M))  # (one unused row without db)
    for k in prange(nchunk):
        row = np.int64(k) if use_db else np.int64(0)  # (k is unsigned in a prange)
        r0 = np.int64(k) * rows
        _call_backward_rows(backward_rows, (part[row], dout, pre, g, act, use_db, r0, min(N, r0 + rows)))
    if use_db:
        for j in prange(M):
            s = 0.0
            for k in range(nchunk):  # fixed order over chunks
                s += part[k, j]
            db[j] = s


def _act_code(op, act):
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    return ACT_CODES[act]


def linear_forward_train(out, pre, x, w, b=None, act="none", residual=None):
    """As linear_forward, and also writes pre (..., M) = x @ w.T + b (before the activation) for backward.

    out (..., M) = act(pre) [+ residual]; out may alias residual or pre, pre must not alias x.
    """
    op = "linear_forward_train"
    N, M, K = _check_forward(op, out, pre, x, w, b, residual)
    use_bias, use_res = b is not None, residual is not None
    code = _act_code(op, act)
    if N == 0 or M == 0:
        return
    out2, pre2, x2 = out.reshape(N, M), pre.reshape(N, M), x.reshape(N, K)
    res2 = residual.reshape(N, M) if use_res else pre2
    bias = b if use_bias else w[0]
    if _on_amx(N, M, K):  # as linear_forward (the same bits)
        _amx_forward(out2, pre2, x2, w, bias, code, res2, use_bias, use_res, True)
        return
    rows, cols = auto_blocks(N, M)  # linear_forward's default blocks (the same bits)
    pin_blas_to_one_thread()
    _linear_fwd(out2, pre2, x2, w, bias, code, res2, use_bias, use_res, True, rows, cols, SKINNY_MAX_ROWS)


def linear_backward(dx, dw, db, dout, x, w, pre=None, act="none", scratch=None):
    """Backward of out = act(pre), pre = x @ w.T + b (w (M, K) in nn.Linear layout).

    g = dout * act'(pre) (fused; pre (..., M) is the saved pre-activation, unused for act='none');
    dx (..., K) = g @ w, dw (M, K) = g.T @ x, db (M,) = column sums of g (fixed 64-row chunks,
    fixed-order reduction). All written, not accumulated; dx, dw and db may each be None (skipped).
    scratch (..., M) float32 holds g when act != 'none' (allocated if None); dout is left intact.
    """
    op = "linear_backward"
    _check(op, "x", x, None)
    _check(op, "w", w, None)
    if w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise GraphError(f"{op}: 'w' has shape {w.shape}, expected (M, {x.shape[-1]})")
    M, K = w.shape
    oshape = x.shape[:-1] + (M,)
    _check(op, "dout", dout, oshape)
    code = _act_code(op, act)
    use_dx, use_dw, use_db = dx is not None, dw is not None, db is not None
    if use_dx:
        _check(op, "dx", dx, x.shape)
    if use_dw:
        _check(op, "dw", dw, (M, K))
    if use_db:
        _check(op, "db", db, (M,))
    N = math.prod(x.shape[:-1])
    x2, dout2 = x.reshape(N, K), dout.reshape(N, M)
    if code != ACT_NONE:
        if pre is None:
            raise GraphError(f"{op}: 'pre' (the saved pre-activation) is required for act={act!r}")
        _check(op, "pre", pre, oshape)
        if scratch is None:
            g2 = np.empty((N, M), np.float32)
        else:
            _check(op, "scratch", scratch, None)
            if scratch.size != N * M:
                raise GraphError(f"{op}: 'scratch' has {scratch.size} elements, expected {N * M} ({oshape})")
            g2 = scratch.reshape(N, M)
        pre2 = pre.reshape(N, M)
    else:
        g2 = pre2 = dout2
    if N == 0 or M == 0:  # sums over nothing: every gradient that has elements is 0
        for grad in (dx, dw, db):
            if grad is not None:
                grad.fill(0.0)
        return
    if code != ACT_NONE or use_db:
        _linear_backward_elementwise(db if use_db else w[0], dout2, pre2, g2, code, use_db, ROWS_PER_CHUNK,
                                     native_address("linear._backward_rows"))
    if K == 0:  # dx (..., 0) and dw (M, 0) have no elements
        return
    pin_blas_to_one_thread()
    if use_dx:
        if _on_amx(N, K, M):
            _amx_product(dx.reshape(N, K), g2, w, False)  # (N, M) @ (M, K)
        else:  # blocks by shape, as the forward's (gemm.auto_blocks)
            matmul_nn(dx.reshape(N, K), g2, w, *auto_blocks(N, K))
    if use_dw:
        if _on_amx(M, K, N):
            _amx_product(dw, g2, x2, True)  # (N, M).T @ (N, K)
        else:
            matmul_tn(dw, g2, x2, tn_rows(M))
