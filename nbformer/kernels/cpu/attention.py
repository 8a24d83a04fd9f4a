"""Tiled FlashAttention-2-style attention forward on the CPU (Numba).

out (B, Tq, NH*HS) = softmax(scale * Q K^T + mask) V, plus lse (B, NH, Tq), the per-row
logsumexp of the scaled scores that a backward pass needs.

Work items are (batch, head, query tile) triples spread over a prange; each item owns a disjoint
part of out/lse, so results are bit-identical whatever the thread count. An item walks the key
tiles with an online softmax (running max m, running sum l, rescaled accumulator), so nothing
of size Tq x Tk exists: per-item scratch is O(block_q * (block_k + HS)) floats. Key tiles that
are entirely above the causal diagonal, or entirely padding for that batch row, are skipped.

Per key tile: S^T = K Q^T (one BLAS sgemm, K read in place from the strided q/kv buffer),
masks, row max, exp2 (own vectorisable polynomial: numba has no vector exp without SVML),
then acc += P V (sgemm with beta = 1, V read in place). The tile is kept transposed
(keys x queries) so that every softmax loop runs unit-stride over queries and vectorises.
Scores are carried in log2 units (Q pre-scaled by scale*log2(e)).
"""
import math

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nbformer.errors import GraphError

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# 2**f on [-0.5, 0.5], degree-6 fit of the relative error (max 1e-7 in float32 Horner).
_C0 = np.float32(1.0)
_C1 = np.float32(0.6931471824645996)
_C2 = np.float32(0.24022646248340607)
_C3 = np.float32(0.05550329014658928)
_C4 = np.float32(0.009618519805371761)
_C5 = np.float32(0.0013399859890341759)
_C6 = np.float32(0.00015337577497120947)
_HALF = np.float32(0.5)
_XMIN = np.float32(-100.0)  # clamp before the exponent bits are built
_XCUT = np.float32(-80.0)  # 2**x below this is flushed to exactly 0 (also for -inf)
_FASTMATH = {"contract", "arcp", "nsz", "afn", "reassoc"}  # no nnan/ninf: masks are -inf
_ZERO = np.float32(0.0)
_NEG_INF = np.float32(-np.inf)


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32 (vectorisable, unlike ldexp)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _sgemm_cm(typingctx, ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """Column-major BLAS sgemm: C = alpha*op(A)@op(B) + beta*C, A/B/C given as (array, byte offset
    of the first element, leading dimension in elements). Calls the same `numba_xxgemm` helper
    (scipy's BLAS) that numba's own np.dot uses, but with free strides and beta, so tiles can be
    read in place from the strided q/kv buffers and P@V accumulates without a temporary."""
    arrs = (a, b, c)
    if not all(isinstance(x, types.Array) and x.dtype == types.float32 for x in arrs):
        return None
    ints = (ta, tb, m, n, k, a_off, lda, b_off, ldb, c_off, ldc)
    if not all(isinstance(x, types.Integer) for x in ints):
        return None
    if not all(isinstance(x, types.Float) for x in (alpha, beta)):
        return None
    sig = types.int32(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)

    def codegen(context, builder, signature, args):
        (ta_, tb_, m_, n_, k_, alpha_, a_, aoff_, lda_, b_, boff_, ldb_, beta_, c_, coff_, ldc_) = args
        sty = signature.args
        i8, i8p = ir.IntType(8), ir.IntType(8).as_pointer()
        intp = context.get_value_type(types.intp)

        def as_intp(v, ty):
            return context.cast(builder, v, ty, types.intp)

        def ptr(arr, aty, off, offty):
            data = context.make_array(aty)(context, builder, arr).data
            return builder.gep(builder.bitcast(data, i8p), [as_intp(off, offty)])

        def trans(v, ty):
            nz = builder.icmp_signed("!=", as_intp(v, ty), ir.Constant(intp, 0))
            return builder.select(nz, ir.Constant(i8, ord("t")), ir.Constant(i8, ord("n")))

        def f32_slot(v, ty):
            return builder.bitcast(cgutils.alloca_once_value(
                builder, context.cast(builder, v, ty, types.float32)), i8p)

        fnty = ir.FunctionType(ir.IntType(32), [i8, i8, i8, intp, intp, intp, i8p, i8p, intp,
                                                i8p, intp, i8p, i8p, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        return builder.call(fn, [
            ir.Constant(i8, ord("s")), trans(ta_, sty[0]), trans(tb_, sty[1]),
            as_intp(m_, sty[2]), as_intp(n_, sty[3]), as_intp(k_, sty[4]),
            f32_slot(alpha_, sty[5]), ptr(a_, sty[6], aoff_, sty[7]), as_intp(lda_, sty[8]),
            ptr(b_, sty[9], boff_, sty[10]), as_intp(ldb_, sty[11]), f32_slot(beta_, sty[12]),
            ptr(c_, sty[13], coff_, sty[14]), as_intp(ldc_, sty[15])])

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, counter, idx):
    """Atomically c = counter[idx]; counter[idx] += 1; return c (an int64 work queue)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return types.int64(counter, idx), codegen


@njit(inline="always")
def _gemm_rm(ta, tb, M, N, K, A, a_off, lda, Bm, b_off, ldb, beta, Cm, c_off, ldc):
    """Row-major C (M x N) = op(A) @ op(B) + beta*C; offsets in bytes, leading dims in elements.
    A row-major matrix is its transpose in column-major, so C^T = op(B)^T op(A)^T is one
    column-major call with the operands swapped and the transpose flags unchanged."""
    return _sgemm_cm(tb, ta, N, M, K, np.float32(1.0), Bm, b_off, ldb, A, a_off, lda, beta, Cm, c_off, ldc)


@njit(inline="always", fastmath=_FASTMATH)
def _exp2(x):
    """2**x in float32 for x <= 0 (rel. error ~1e-7); x < -80 (and -inf) gives exactly 0,
    NaN stays NaN (comparisons are written so that NaN takes the computing branch)."""
    y = _XMIN if x < _XMIN else x
    n = np.floor(y + _HALF)
    f = y - n
    p = _C6
    p = p * f + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + _C0
    r = p * _bits_to_f32((np.int32(n) + 127) << 23)
    return _ZERO if x < _XCUT else r


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _attention_forward_core(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS,
                            causal, scale, bq, bk, n_threads):
    B = q_buf.shape[0]
    Tq = q_buf.shape[1]
    Tk = kv_buf.shape[1]
    nqt = (Tq + bq - 1) // bq
    qscale = np.float32(scale * _LOG2E)  # scores kept in log2 units: exp2 instead of exp
    n_items = B * NH * nqt
    # dynamic schedule: one prange iteration per thread, each pulling work items from an
    # atomic counter. Balances causal tiles and survives a thread being descheduled; the
    # result does not depend on which thread took an item (items never share output).
    n_workers = max(1, min(n_threads, n_items))  # (numba.get_num_threads() in here blocks caching)
    counter = np.zeros(1, np.int64)
    for _w in prange(n_workers):
        # per-worker scratch, O(bq*bk + bq*HS) floats, nothing grows with T
        qs_f = np.empty(bq * HS, np.float32)   # queries * scale * log2(e)
        st = np.empty(bk * bq, np.float32)     # S^T, then P^T, of one key tile
        acc_f = np.empty(bq * HS, np.float32)  # un-normalised output
        m = np.empty(bq, np.float32)   # running max (log2 units)
        l = np.empty(bq, np.float32)   # running sum of exp2(s - m)
        ma = np.empty(bq, np.float32)
        mb = np.empty(bq, np.float32)
        alpha = np.empty(bq, np.float32)
        while True:
            item = _fetch_add(counter, 0)
            if item >= n_items:
                break
            _attention_item(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS,
                            causal, bq, bk, item, qscale, qs_f, st, acc_f, m, l, ma, mb, alpha)


@njit(cache=True, fastmath=_FASTMATH)
def _attention_item(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, causal, bq,
                    bk, item, qscale, qs_f, st, acc_f, m, l, ma, mb, alpha):
    """One (batch, head, query tile) work item; items are numbered heaviest-first for causal."""
    B = q_buf.shape[0]
    Tq = q_buf.shape[1]
    Tk = kv_buf.shape[1]
    shift = Tk - Tq  # causal: query i sees key j iff j <= i + shift
    nqt = (Tq + bq - 1) // bq
    kv_s0 = kv_buf.strides[0]
    kv_s1 = kv_buf.strides[1]
    kv_ld = max(kv_s1 // 4, HS)  # only a 1-row kv_buf can have a smaller (unused) row stride
    qtile = nqt - 1 - item // (B * NH)  # last query tiles (most causal work) first
    bh = item % (B * NH)
    b = bh // NH
    h = bh - b * NH
    i0 = qtile * bq
    nq = min(bq, Tq - i0)
    qs = qs_f[:nq * HS].reshape(nq, HS)    # (nq, HS)
    acc = acc_f[:nq * HS].reshape(nq, HS)  # (nq, HS)
    for i in range(nq):
        m[i] = _NEG_INF
        l[i] = _ZERO
        for d in range(HS):
            acc[i, d] = _ZERO
    qc = q_off + h * HS
    for i in range(nq):
        # row view first: the indices below are then provably >= 0, so there is no
        # per-element wraparound handling and the loop vectorises
        qrow = q_buf[b, i0 + i, qc:qc + HS]
        for d in range(HS):
            qs[i, d] = qrow[d] * qscale
    # keys visible to the last query row of the tile; later key tiles are skipped
    j_end = Tk
    if causal:
        j_end = min(Tk, i0 + nq + shift)
    k_base = b * kv_s0 + (k_off + h * HS) * 4
    v_base = b * kv_s0 + (v_off + h * HS) * 4
    for j0 in range(0, max(j_end, 0), bk):
        nk = min(bk, j_end - j0)
        n_valid = 0
        for j in range(nk):
            n_valid += key_mask[b, j0 + j] != 0
        if n_valid == 0:
            continue  # every key of this tile is padding
        # S^T (nk, nq) = K_tile (nk, HS) @ qs^T, K read in place from kv_buf
        _gemm_rm(0, 1, nk, nq, HS, kv_buf, k_base + j0 * kv_s1, kv_ld, qs, 0, HS,
                 _ZERO, st, 0, nq)
        # masks: padded keys are whole rows of S^T; causal hides queries i < j - shift - i0
        for j in range(nk):
            if key_mask[b, j0 + j] == 0:
                for i in range(nq):
                    st[j * nq + i] = _NEG_INF
            elif causal:
                for i in range(min(nq, j0 + j - shift - i0)):
                    st[j * nq + i] = _NEG_INF
        # new running max; ping-pong between two buffers (an in-place running max becomes
        # a masked store, which is very slow on AMD)
        for i in range(nq):
            ma[i] = m[i]
        for j in range(0, nk - 1, 2):
            r0 = st[j * nq:(j + 1) * nq]
            r1 = st[(j + 1) * nq:(j + 2) * nq]
            for i in range(nq):
                mb[i] = max(ma[i], max(r0[i], r1[i]))
            for i in range(nq):
                ma[i] = mb[i]
        if nk % 2 == 1:
            r0 = st[(nk - 1) * nq:nk * nq]
            for i in range(nq):
                mb[i] = max(ma[i], r0[i])
            for i in range(nq):
                ma[i] = mb[i]
        for i in range(nq):
            mn = ma[i]
            m_use = mn if mn != _NEG_INF else _ZERO  # no key seen yet: avoid -inf - -inf
            alpha[i] = _exp2(m[i] - m_use)
            m[i] = mn
            mb[i] = m_use
            l[i] *= alpha[i]
        for j in range(nk):
            row = st[j * nq:(j + 1) * nq]
            for i in range(nq):
                p = _exp2(row[i] - mb[i])
                row[i] = p
                l[i] += p
        for i in range(nq):
            a = alpha[i]
            if a != np.float32(1.0):
                for d in range(HS):
                    acc[i, d] *= a
        # acc (nq, HS) += P (nq, nk) @ V_tile (nk, HS), V read in place from kv_buf
        _gemm_rm(1, 0, nq, HS, nk, st, 0, nq, kv_buf, v_base + j0 * kv_s1, kv_ld,
                 np.float32(1.0), acc, 0, HS)
    oc = h * HS
    for i in range(nq):
        orow = out[b, i0 + i, oc:oc + HS]
        if l[i] != _ZERO:  # NaN inputs give NaN rows, not empty ones
            inv = np.float32(1.0) / l[i]
            for d in range(HS):
                orow[d] = acc[i, d] * inv
            lse[b, h, i0 + i] = np.float32((np.float64(m[i]) + math.log2(np.float64(l[i]))) * _LN2)
        else:
            for d in range(HS):
                orow[d] = _ZERO
            lse[b, h, i0 + i] = _NEG_INF


def attention_flops(B, NH, Tq, Tk, HS, causal):
    """FLOPs by the usual convention: 4*B*NH*Tq*Tk*HS (two matmuls), half of that if causal."""
    f = 4 * B * NH * Tq * Tk * HS
    return f // 2 if causal else f


# ---------------------------------------------------------------- BLAS threads
# The core calls sgemm from every prange thread. OpenBLAS would start its own threads for
# tiles above 64^3 multiply-adds and oversubscribe the cores (measured 3-4x slower with 2
# cores), so BLAS is held at one thread for the duration of a call and restored after.
_BLAS = None  # (scipy BLAS importable, threadpoolctl controllers of the loaded BLAS libraries)


def _blas():
    global _BLAS
    if _BLAS is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (the sgemm numba_xxgemm calls)
        except ImportError:
            _BLAS = (False, [])
            return _BLAS
        try:
            from threadpoolctl import ThreadpoolController

            libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # no threadpoolctl: run with whatever BLAS threading is set
            libs = []
        _BLAS = (True, libs)
    return _BLAS


class _SingleThreadBlas:
    def __enter__(self):
        self.saved = []
        for lib in _blas()[1]:
            n = lib.num_threads
            if n != 1:
                lib.set_num_threads(1)
                self.saved.append((lib, n))
        return self

    def __exit__(self, *exc):
        for lib, n in self.saved:
            lib.set_num_threads(n)
        return False


# ---------------------------------------------------------------- launcher
def _check_f32(name, a, ndim):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
        what = f"{a.dtype} array of {a.ndim} dims" if isinstance(a, np.ndarray) else type(a).__name__
        raise GraphError(f"attention_forward: {name} must be a {ndim}-d float32 array, got {what}")


def _blas_readable(kv):
    """kv rows are handed to BLAS in place: unit stride along the last axis, whole-float and
    non-overlapping rows. Views along axis 1 (a KV-cache prefix) qualify; anything else is
    copied once by the launcher."""
    s0, s1, s2 = kv.strides
    T, W = kv.shape[1:]
    return s2 == 4 and s0 % 4 == 0 and s1 % 4 == 0 and (T <= 1 or s1 >= 4 * W)


def attention_forward(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, n_heads, head_size,
                      causal, scale, block_q=64, block_k=64):
    """Scaled dot-product attention forward, FlashAttention-2 style, into out and lse.

    out (B, Tq, NH*HS) float32 C-contiguous, written fully; lse (B, NH, Tq) float32, written:
    logsumexp of the scaled scores per query row (-inf, with out 0, for rows that see no key).
    q_buf (B, Tq, Wq): head h at columns q_off + h*HS; kv_buf (B, Tk, Wkv): keys at
    k_off + h*HS, values at v_off + h*HS (may be q_buf itself, or a view along axis 1).
    key_mask (B, Tk) uint8, 1 = attend. causal is bottom-right aligned: query i sees key j iff
    j <= i + (Tk - Tq). block_q/block_k are the tile sizes.
    """
    NH, HS = int(n_heads), int(head_size)
    if NH < 1 or HS < 1:
        raise GraphError(f"attention_forward: n_heads and head_size must be >= 1, got {NH}, {HS}")
    bq, bk = int(block_q), int(block_k)
    if bq < 1 or bk < 1:
        raise GraphError(f"attention_forward: block_q and block_k must be >= 1, got {bq}, {bk}")
    _check_f32("q_buf", q_buf, 3)
    _check_f32("kv_buf", kv_buf, 3)
    _check_f32("out", out, 3)
    _check_f32("lse", lse, 3)
    B, Tq, Wq = q_buf.shape
    Bk, Tk, Wkv = kv_buf.shape
    C = NH * HS
    if Bk != B:
        raise GraphError(f"attention_forward: kv_buf batch {Bk} != q_buf batch {B}")
    q_off, k_off, v_off = int(q_off), int(k_off), int(v_off)
    if q_off < 0 or q_off + C > Wq:
        raise GraphError(f"attention_forward: q_buf width {Wq} cannot hold {NH} heads x {HS} "
                         f"at offset q_off={q_off}")
    for name, off in (("k_off", k_off), ("v_off", v_off)):
        if off < 0 or off + C > Wkv:
            raise GraphError(f"attention_forward: kv_buf width {Wkv} cannot hold {NH} heads x "
                             f"{HS} at offset {name}={off}")
    if out.shape != (B, Tq, C) or not out.flags.c_contiguous:
        raise GraphError(f"attention_forward: out must be C-contiguous {(B, Tq, C)}, got "
                         f"{out.shape}{'' if out.flags.c_contiguous else ' non-contiguous'}")
    if lse.shape != (B, NH, Tq) or not lse.flags.c_contiguous:
        raise GraphError(f"attention_forward: lse must be C-contiguous {(B, NH, Tq)}, got "
                         f"{lse.shape}{'' if lse.flags.c_contiguous else ' non-contiguous'}")
    if (not isinstance(key_mask, np.ndarray) or key_mask.dtype != np.uint8
            or key_mask.shape != (B, Tk)):
        got = (f"{key_mask.dtype} {key_mask.shape}" if isinstance(key_mask, np.ndarray)
               else type(key_mask).__name__)
        raise GraphError(f"attention_forward: key_mask must be uint8 {(B, Tk)}, got {got}")
    if B == 0 or Tq == 0:
        return
    if not _blas_readable(kv_buf):
        kv_buf = np.ascontiguousarray(kv_buf)
    if not key_mask.flags.c_contiguous:
        key_mask = np.ascontiguousarray(key_mask)  # (B, Tk) bytes; saves a compiled variant
    if not _blas()[0]:
        raise GraphError("attention_forward: needs scipy (the BLAS numba calls); pip install scipy")
    with _SingleThreadBlas():
        _attention_forward_core(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS,
                                bool(causal), float(scale), bq, bk, numba.get_num_threads())
