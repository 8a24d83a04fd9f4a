"""Tiled FlashAttention-2-style attention forward on the CPU (Numba).

out (B, Tq, NH*HS) = softmax(scale * Q K^T + mask) V, plus lse (B, NH, Tq), the per-row
logsumexp of the scaled scores that a backward pass needs.

Work items are (batch, head, query tile) triples spread over a prange; each item owns a disjoint
part of out/lse, so results are bit-identical whatever the thread count. An item walks the key
tiles with an online softmax (running max m, running sum l, rescaled accumulator), so nothing
of size Tq x Tk exists: per-item scratch is O(block_q * (block_k + HS)) floats. Key tiles that
are entirely above the causal diagonal, or entirely padding for that batch row, are skipped.

Per key tile: S^T = K Q^T, masks, row max, exp2 (own vectorisable polynomial: numba has no
vector exp without SVML), then acc += P V. Both products go through one register-blocked
micro-kernel emitted as LLVM IR (microkernel.rank_update: 24 AVX-512 or 12 AVX accumulators,
no packing; K is read in place from the strided q/kv buffer). The tile is kept transposed
(keys x queries) so that every softmax loop runs unit-stride over queries and vectorises. Scores are carried in log2 units (Q is
pre-scaled by scale*log2(e)). No BLAS, so no thread oversubscription inside the prange.
"""
import math

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nbformer.errors import GraphError
from nbformer.kernels.cpu.precompile import (BOOL, F1, F3, F32, F64, I64, RA3, RU2, U64, entry_point, kernel,
                                             native_address, native_caller)
from nbformer.kernels.cpu.microkernel import rank_update as _rank_update
from nbformer.kernels.cpu.rng import keep

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
def _fetch_add(typingctx, counter, idx, n):
    """Atomically c = counter[idx]; counter[idx] += n; return c (an int64 work queue)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and isinstance(idx, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i])
        inc = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, inc, "seq_cst")

    return types.int64(counter, idx, n), codegen


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


_PAD = 8  # row padding (floats) of the S^T and Q^T scratch: 1 KiB row strides alias in L1
_KC = 64  # P @ V: keys per chunk, so that the V chunk stays in L1 ...
_QC = 48  # ... across query stripes of this many rows (a multiple of the 6-row micro-tile)


# The work item is its own cached kernel, called by the core through its native address
# (precompile.native_caller), not linked into it: its code is then compiled once, in parallel with
# the core, instead of once more in the core's parallel loop and once more in the core itself.
_ITEM_SIG = (F3, F3, RA3, I64, RA3, I64, I64, RU2, I64, I64, BOOL, I64, I64, I64, F32) + (F1,) * 9 + (F64, U64, I64)
_call_item = native_caller(_ITEM_SIG)


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _attention_forward_core(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS,
                            causal, scale, bq, bk, n_threads, p_drop, seed, group, item_fn):
    B = q_buf.shape[0]
    Tq = q_buf.shape[1]
    nqt = (Tq + bq - 1) // bq
    qscale = np.float32(scale * _LOG2E)  # scores kept in log2 units: exp2 instead of exp
    n_items = B * NH * nqt
    # dynamic schedule: one prange iteration per thread, each pulling work items from an
    # atomic counter. Balances causal tiles and survives a thread being descheduled; the
    # result does not depend on which thread took an item (items never share output).
    n_workers = max(1, min(n_threads, n_items))  # (numba.get_num_threads() in here blocks caching)
    counter = np.zeros(1, np.int64)
    # items are claimed `grab` at a time: the counter's cache line moves between cores at every
    # claim (~0.2 us on 2 cores), which was a tenth of a 64 x 20-token embedding batch's attention;
    # the last claims hold the lightest causal items, and at most 1/16 of a worker's share each
    grab = max(1, n_items // (16 * n_workers))
    ld = bq + _PAD
    for _w in prange(n_workers):
        # per-worker scratch, O(bq*bk + (bq + bk)*HS) floats, nothing grows with T
        qt = np.empty(HS * ld, np.float32)     # (HS, ld) Q^T * scale * log2(e)
        st = np.empty(bk * ld, np.float32)     # (bk, ld) S^T, then P^T, of one key tile
        vs = np.empty(bk * HS, np.float32)     # (bk, HS) V tile, contiguous
        acc = np.empty(bq * HS, np.float32)    # (bq, HS) un-normalised output
        m = np.empty(bq, np.float32)   # running max (log2 units)
        l = np.empty(bq, np.float32)   # running sum of exp2(s - m)
        ma = np.empty(bq, np.float32)
        mb = np.empty(bq, np.float32)
        alpha = np.empty(bq, np.float32)
        while True:
            first = _fetch_add(counter, 0, grab)
            if first >= n_items:
                break
            for item in range(first, min(n_items, first + grab)):
                _call_item(item_fn, (out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS,
                                     causal, bq, bk, item, qscale, qt, st, vs, acc, m, l, ma, mb, alpha,
                                     p_drop, seed, group))


@kernel(_ITEM_SIG, cost=6.0)
@njit(cache=True, fastmath=_FASTMATH)
def _attention_item(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, causal, bq,
                    bk, item, qscale, qt, st, vs, acc, m, l, ma, mb, alpha, p_drop, seed, group):
    """One (batch, head, query tile) work item; items are numbered heaviest-first for causal.
    group: query heads per key/value head (grouped-query attention; 1 = one kv head per head)."""
    B = q_buf.shape[0]
    Tq = q_buf.shape[1]
    Tk = kv_buf.shape[1]
    shift = Tk - Tq  # causal: query i sees key j iff j <= i + shift
    nqt = (Tq + bq - 1) // bq
    ld = bq + _PAD
    kv_s0 = kv_buf.strides[0] // 4  # kv_buf is addressed in elements from its data pointer
    kv_s1 = kv_buf.strides[1] // 4
    qtile = nqt - 1 - item // (B * NH)  # last query tiles (most causal work) first
    bh = item % (B * NH)
    b = bh // NH
    h = bh - b * NH
    i0 = qtile * bq
    nq = min(bq, Tq - i0)
    for i in range(nq):
        m[i] = _NEG_INF
        l[i] = _ZERO
    for x in range(nq * HS):
        acc[x] = _ZERO
    qc = q_off + h * HS
    for i in range(nq):
        # row view first: the indices below are then provably >= 0 (no wraparound code)
        qrow = q_buf[b, i0 + i, qc:qc + HS]
        for d in range(HS):
            qt[d * ld + i] = qrow[d] * qscale
    # S^T's columns are computed in whole 8-float vectors when the tile's last ones would be 2-7
    # scalar columns of the micro-kernel (64 x 20-token batches: 2.9 -> 2.6 us an item): the
    # padding columns of Q^T are zeros (not scratch garbage, whose denormals would slow the FMAs)
    # and their scores are never read. A column's value does not depend on its block: same bits.
    nq_pad = nq if nq % 8 < 2 else min(ld, nq + 8 - nq % 8)
    for d in range(HS):
        for i in range(nq, nq_pad):
            qt[d * ld + i] = _ZERO
    # keys visible to the last query row of the tile; later key tiles are skipped
    j_end = Tk
    if causal:
        j_end = min(Tk, i0 + nq + shift)
    hk = h // group  # the key/value head of query head h
    k_base = b * kv_s0 + k_off + hk * HS
    for j0 in range(0, max(j_end, 0), bk):
        nk = min(bk, j_end - j0)
        n_valid = 0
        for j in range(nk):
            n_valid += key_mask[b, j0 + j] != 0
        if n_valid == 0:
            continue  # every key of this tile is padding
        # S^T (nk, nq) = K_tile (nk, HS) @ Q^T (HS, nq); K read in place from kv_buf.
        # Query stripes keep their slice of Q^T in L1 while the key rows stream past.
        for c0 in range(0, nq, _QC):
            w = min(_QC, nq - c0)
            rows = nk
            if causal:  # keys past the stripe's last query are masked anyway: not computed
                rows = min(nk, i0 + c0 + w + shift - j0)
            _rank_update(st, c0, ld, rows, min(_QC, nq_pad - c0), kv_buf, k_base + j0 * kv_s1, 1, kv_s1,
                         qt, c0, ld, HS, 0)
        # masks: padded keys are whole rows of S^T; causal hides queries i < j - shift - i0
        for j in range(nk):
            if key_mask[b, j0 + j] == 0:
                for i in range(nq):
                    st[j * ld + i] = _NEG_INF
            elif causal:
                for i in range(min(nq, j0 + j - shift - i0)):
                    st[j * ld + i] = _NEG_INF
        # new running max; ping-pong between two buffers (an in-place running max becomes
        # a masked store, which is very slow on AMD)
        for i in range(nq):
            ma[i] = m[i]
        for j in range(0, nk - 1, 2):
            r0 = st[j * ld:j * ld + nq]
            r1 = st[(j + 1) * ld:(j + 1) * ld + nq]
            for i in range(nq):
                mb[i] = max(ma[i], max(r0[i], r1[i]))
            for i in range(nq):
                ma[i] = mb[i]
        if nk % 2 == 1:
            r0 = st[(nk - 1) * ld:(nk - 1) * ld + nq]
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
            row = st[j * ld:j * ld + nq]
            for i in range(nq):
                p = _exp2(row[i] - mb[i])
                row[i] = p
                l[i] += p
        if p_drop > 0.0:
            # attention dropout after the normaliser: l sums the kept and the dropped alike, the
            # same counter-based mask as the backward pass (counter = ((b*NH+h)*Tq + i)*Tk + j)
            inv_keep = np.float32(1.0 / (1.0 - p_drop))
            base = (b * NH + h) * Tq + i0
            for j in range(nk):
                row = st[j * ld:j * ld + nq]
                for i in range(nq):
                    if keep(seed, (base + i) * Tk + j0 + j, p_drop):
                        row[i] *= inv_keep
                    else:
                        row[i] = _ZERO
        for i in range(nq):
            a = alpha[i]
            if a != np.float32(1.0):
                arow = acc[i * HS:(i + 1) * HS]
                for d in range(HS):
                    arow[d] *= a
        # V tile to contiguous scratch: strided rows alias in L1 when streamed repeatedly
        for j in range(nk):
            vrow = kv_buf[b, j0 + j, v_off + hk * HS:v_off + (hk + 1) * HS]
            for d in range(HS):
                vs[j * HS + d] = vrow[d]
        # acc (nq, HS) += P (nq, nk) @ V_tile (nk, HS), in L1-sized (keys x query-stripe) chunks
        for jc in range(0, nk, _KC):
            for c0 in range(0, nq, _QC):
                w = min(_QC, nq - c0)
                keys = min(_KC, nk - jc)
                if causal:  # P is exactly 0 past the stripe's last visible key
                    keys = min(keys, i0 + c0 + w + shift - j0 - jc)
                if keys > 0:
                    _rank_update(acc, c0 * HS, HS, w, HS, st, jc * ld + c0, ld, 1,
                                 vs, jc * HS, HS, keys, 1)
    oc = h * HS
    for i in range(nq):
        orow = out[b, i0 + i, oc:oc + HS]
        if l[i] != _ZERO:  # NaN inputs give NaN rows, not empty ones
            inv = np.float32(1.0) / l[i]
            for d in range(HS):
                orow[d] = acc[i * HS + d] * inv
            lse[b, h, i0 + i] = np.float32((np.float64(m[i]) + math.log2(np.float64(l[i]))) * _LN2)
        else:
            for d in range(HS):
                orow[d] = _ZERO
            lse[b, h, i0 + i] = _NEG_INF


def attention_flops(B, NH, Tq, Tk, HS, causal):
    """FLOPs by the usual convention: 4*B*NH*Tq*Tk*HS (two matmuls), half of that if causal."""
    f = 4 * B * NH * Tq * Tk * HS
    return f // 2 if causal else f


# ---------------------------------------------------------------- launcher
def _check_f32(name, a, ndim):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
        what = f"{a.dtype} array of {a.ndim} dims" if isinstance(a, np.ndarray) else type(a).__name__
        raise GraphError(f"attention_forward: {name} must be a {ndim}-d float32 array, got {what}")


def _addressable(kv):
    """The kernel reads key rows through raw element offsets from the data pointer: unit
    stride along the last axis and whole-float strides (any view along axes 0/1 qualifies,
    e.g. a KV-cache prefix); anything else is copied once by the launcher."""
    s0, s1, s2 = kv.strides
    return kv.flags.aligned and s2 == 4 and s0 % 4 == 0 and s1 % 4 == 0


BLOCK_Q = BLOCK_K = 256  # default tiles of attention_forward (tunable: nbformer/tuning/space.py)


def attention_forward(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, n_heads, head_size,
                      causal, scale, block_q=BLOCK_Q, block_k=BLOCK_K, dropout_p=0.0, seed=0, key_len=None,
                      n_kv_heads=None, threads=None):
    """Scaled dot-product attention forward, FlashAttention-2 style, into out and lse.

    out (B, Tq, NH*HS) float32 C-contiguous, written fully; lse (B, NH, Tq) float32, written:
    logsumexp of the scaled scores per query row (-inf, with out 0, for rows that see no key).
    q_buf (B, Tq, Wq): head h at columns q_off + h*HS; kv_buf (B, Tk, Wkv): keys at
    k_off + h*HS, values at v_off + h*HS (may be q_buf itself, or a view along axis 1).
    key_mask (B, Tk) uint8, 1 = attend. causal is bottom-right aligned: query i sees key j iff
    j <= i + (Tk - Tq). dropout_p/seed: attention dropout on the probabilities with the
    counter-based mask of rng.keep (regenerated by attention_backward, never stored); lse is that
    of the undropped scores. key_len: attend to the first key_len keys only (a KV-cache prefix;
    default all of kv_buf). block_q/block_k are the tile sizes (see benchmarks/bench_attention.py
    --sweep). Scratch per thread ~ 4*((bq + 8)*(bk + HS) + (bq + bk)*HS) bytes, whatever T.
    n_kv_heads: grouped-query attention, NKV key/value heads (dividing NH) at k_off/v_off + g*HS;
    query head h reads kv head h // (NH // NKV). None = NH (one kv head per query head).
    threads: Numba threads for this call (None: the current count); never changes the bits (items
    own disjoint outputs). block_q / block_k change the order of the online softmax, so they may
    change the last bits: the tuner (nbformer/tuning/space.py) validates them at the tests' tolerance.
    """
    from nbformer.kernels.cpu.gemm import check_threads, num_threads

    threads = check_threads("attention_forward", threads)
    NH, HS = int(n_heads), int(head_size)
    if NH < 1 or HS < 1:
        raise GraphError(f"attention_forward: n_heads and head_size must be >= 1, got {NH}, {HS}")
    NKV = NH if n_kv_heads is None else int(n_kv_heads)
    if NKV < 1 or NH % NKV:
        raise GraphError(f"attention_forward: n_kv_heads = {NKV} must be >= 1 and divide n_heads = {NH}")
    bq, bk = int(block_q), int(block_k)
    if bq < 1 or bk < 1:
        raise GraphError(f"attention_forward: block_q and block_k must be >= 1, got {bq}, {bk}")
    _check_f32("q_buf", q_buf, 3)
    _check_f32("kv_buf", kv_buf, 3)
    if key_len is not None:
        key_len = int(key_len)
        if not 0 <= key_len <= kv_buf.shape[1] or not isinstance(key_mask, np.ndarray) or key_mask.ndim != 2:
            raise GraphError(f"attention_forward: key_len {key_len} outside [0, {kv_buf.shape[1]}] (keys in kv_buf)")
        kv_full, mask_full = kv_buf, key_mask
        kv_buf, key_mask = kv_buf[:, :key_len], key_mask[:, :key_len]
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
        if off < 0 or off + NKV * HS > Wkv:
            raise GraphError(f"attention_forward: kv_buf width {Wkv} cannot hold {NKV} heads x "
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
    for name, a in (("out", out), ("lse", lse)):
        if not (a.flags.writeable and a.flags.aligned):
            raise GraphError(f"attention_forward: {name} must be writeable and aligned")
    if B == 0 or Tq == 0:
        return
    # tiles no larger than the problem: the same single tile (same bits), but per-thread scratch
    # sized to it. A decode step (Tq = 1, ~100 keys) with 256 x 256 tiles malloc'd and faulted in
    # ~330 KB per worker per call: 96 us of a 5 us job (SmolLM2, measured).
    bq, bk = min(bq, Tq), min(bk, max(Tk, 1))
    if not q_buf.flags.aligned:
        q_buf = np.ascontiguousarray(q_buf)
    if not _addressable(kv_buf):
        kv_buf = np.ascontiguousarray(kv_buf)
    if not key_mask.flags.c_contiguous:
        key_mask = np.ascontiguousarray(key_mask)  # (B, Tk) bytes
    if not 0.0 <= float(dropout_p) < 1.0:
        raise GraphError(f"attention_forward: dropout_p must be in [0, 1), got {dropout_p}")
    if Tq <= _decode_max_queries() and float(dropout_p) == 0.0:
        from nbformer.kernels.cpu.attention_decode import _attention_decode

        with num_threads(threads):
            if key_len is not None and kv_full.flags.c_contiguous and mask_full.flags.c_contiguous:
                kv_buf, key_mask = kv_full, mask_full  # the cache itself: C-contiguous, first Tk rows read
            _attention_decode(out, lse, np.ascontiguousarray(q_buf), q_off, np.ascontiguousarray(kv_buf), k_off,
                              v_off, Tk, np.ascontiguousarray(key_mask), NH, HS, bool(causal), float(scale), NH // NKV,
                              native_address("attention_decode._decode_item"))
        return
    with num_threads(threads):
        _core_entry()(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, bool(causal),
                      float(scale), bq, bk, numba.get_num_threads(), float(dropout_p),
                      np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), NH // NKV, native_address("attention._attention_item"))


def _decode_max_queries() -> int:
    from nbformer.kernels.cpu.attention_decode import MAX_QUERIES

    return MAX_QUERIES


_CORE = []


def _core_entry():
    """The core compiled once, for read-only 'A'-layout q/kv and mask: contiguous buffers,
    KV-cache views, strided views, writeable or not, all go through this one variant (numba
    would otherwise compile one per layout mix, ~20 s each). The launcher has checked dtypes
    and ranks (and made everything aligned), q/kv/mask are only read, so calling the compiled
    entry point directly is safe; out/lse are checked C-contiguous, aligned and writeable."""
    if not _CORE:
        _CORE.append(entry_point("attention._attention_forward_core"))  # (its signature: _core_sig())
    return _CORE[0]


def _core_sig():
    f32_3c = types.Array(types.float32, 3, "C")
    ro_3a = types.Array(types.float32, 3, "A", readonly=True)
    return (f32_3c, f32_3c, ro_3a, types.int64, ro_3a, types.int64, types.int64,
            types.Array(types.uint8, 2, "C", readonly=True), types.int64, types.int64,
            types.boolean, types.float64, types.int64, types.int64, types.int64, types.float64,
            types.uint64, types.int64, types.int64)


kernel(_core_sig(), cost=3.0)(_attention_forward_core)  # so that precompile.py compiles it ahead
