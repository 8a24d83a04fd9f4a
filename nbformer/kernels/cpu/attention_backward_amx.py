"""Attention backward on Intel AMX: attention_backward.py's algorithm and schedules with the five
products of a (query tile, key tile) pair on tiles, fp32-accurate from three-part bfloat16 splits
(amx_tiles.py says why), the softmax gradient between them in AVX-512.

Per pair (nq query rows from i0, nk keys from k0; a "block" is 32 rows or keys, zero-padded):
    S  = Q (K^T * scale * log2 e)         A: Q rows          B: K^T (VNNI: pairs of head dims)
    dP = dO V^T                           A: dO rows         B: V^T
    P  = exp2(min(S - lse log2 e, 0)) * allow,  dS = P * (dP - D) * scale   (attention_backward._pair's
         formula, masked entries and padding exactly 0)
    dV^T += dO^T P                        A: dO^T rows       B: P  (VNNI: pairs of query rows)
    dK^T += Q^T dS                        A: Q^T rows        B: dS
    dQ   += dS K                          A: dS rows         B: K  (VNNI: pairs of key rows)
dK and dV accumulate transposed (head dims x keys, so that P and dS, produced queries x keys, are
B operands without a transpose) and are written out transposed once, at the end of a work item.
The key side (K^T, V^T, K) is packed once per work item, the query side (Q, dO, Q^T, dO^T) once
per query chunk (one pass) or tile (two passes), P and dS per pair.

Bits: every element is a sum over 32-wide chunks (head dims, queries or keys; chunk boundaries at
multiples of 32 from 0) in increasing order, each chunk one TDPBF16PS sequence of the six split
products, partial sums through fp32 memory (exact). So block_q / block_k, rounded up here to
multiples of 32, the query chunk, the schedule (one or two passes) and the thread count change no
bit, as in attention_backward.py (tests/test_attention_backward_cpu.py checks both modes). The bits
differ from the AVX-512 path's (another summation order); the error against a float64 reference is
of the same size. Edge cases as gemm_amx.py's: an inf operand gives NaN where it meets a zero split
part, magnitudes below 2^-100 lose their low parts.

Where the time goes (one thread, B=1 NH=12 T=1024 HS=64, per 64 x 64 tile pair, cycle counters):
S and dP ~2.6 us, the softmax gradient with its packs (attention_backward_amx_tile) ~5 us, dV/dK 3.5 us,
dQ 1.4 us, the key and query packs ~1.8 us: ~16 us against ~19 us for the AVX-512 path's pair. What
mattered: panels and C tiles on 64-byte boundaries (numba's 32-byte ones made every TDPBF16PS 3-4x
slower), the blocked dK^T / dV^T layout, and VCVTNEPS2BF16 for the splits (bf16_split).

Scratch per work item (one pass): the packed key side 3 * 1.5 * Tk * HS * 2 bytes and dK^T, dV^T
(2 * 4 * HS * Tk bytes), the packed chunk (4 * 1.5 * query_chunk * HS * 2 bytes) and its dQ rows:
linear in T. The two-pass schedule packs the query side once per pair (2.6x the one-pass time on one
thread, attention_backward._TWO_PASS_COST_AMX).

Only on hosts with AMX (gemm_amx.HOST_HAS_AMX); attention_backward.attention_backward takes it where
gemm_amx.available() and the head size is at least AMX_MIN_HEAD (uses_amx).
"""
import numpy as np
from numba import njit

from .amx_tiles import CHUNK, aligned, amx_block32, amx_config, amx_release
from .attention_backward_amx_tile import pds_pack16
from .attention_backward import (_FM, _ITEM_SIG, _LOG2E, _LOG2E_F, _ZERO, _delta_rows, _dropout_row, _spread,
                                 _tile_has_keys, _visible_keys)
from .bf16_split import split16, split_pairs16
from .gemm_amx import HOST_HAS_AMX
from .precompile import kernel

_LDP = 16  # row padding (floats) of the S/P and dP/dS tiles


@njit(inline="always")
def _tile_config():
    # amx_tiles.config_bytes(): palette 1, tiles 0-7 of 16 rows x 64 bytes
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    return cfg


@njit(inline="always")
def round32(n):
    return max(32, (n + 31) // 32 * 32)


@njit(fastmath=_FM)
def _copy_rows(dst, d_off, src, b, i0, T, c0, HS, HSP):
    # dst[d_off:] (32, HSP) = src[b, i0:i0 + 32, c0:c0 + HS], zero-padded past T rows and HS columns
    for r in range(32):
        row = dst[d_off + r * HSP:d_off + (r + 1) * HSP]
        if i0 + r < T:
            x = src[b, i0 + r, c0:c0 + HS]
            for d in range(HS):
                row[d] = x[d]
            for d in range(HS, HSP):
                row[d] = _ZERO
        else:
            for d in range(HSP):
                row[d] = _ZERO


@njit(fastmath=_FM)
def _transpose32(dst, d_off, src, s_off, HSP, scale):
    # dst[d_off:] (HSP, 32) = src[s_off:] (32, HSP)^T * scale, in 8 x 8 blocks
    for d0 in range(0, HSP, 8):
        for r0 in range(0, 32, 8):
            for d in range(d0, d0 + 8):
                out = dst[d_off + d * 32 + r0:d_off + d * 32 + r0 + 8]
                for r in range(8):
                    out[r] = src[s_off + (r0 + r) * HSP + d] * scale


@njit(fastmath=_FM)
def _pack_keys(kS, vP, kQ, rows, cols, kv_buf, b, jb0, jb1, j_base, nkb, Tk, kc, vc, HS, nh, kscale):
    """Key blocks jb0 <= jb < jb1 of kv head columns kc (K) / vc (V), stored at block jb - j_base:
    kS (block, head chunk) = B panels of K^T * kscale, vP likewise of V^T; kQ (head block, key chunk)
    = B panels of K, nkb key chunks per head block. rows (32, HSP), cols (2, HSP, 32): scratch."""
    HSP = 32 * nh
    for jb in range(jb0, jb1):
        jl = jb - j_base
        _copy_rows(rows, 0, kv_buf, b, jb * 32, Tk, kc, HS, HSP)
        _copy_rows(rows, 32 * HSP, kv_buf, b, jb * 32, Tk, vc, HS, HSP)
        _transpose32(cols, 0, rows, 0, HSP, kscale)
        _transpose32(cols, HSP * 32, rows, 32 * HSP, HSP, np.float32(1.0))
        for c in range(nh):
            o = (jl * nh + c) * CHUNK
            for kp in range(16):
                d = 32 * c + 2 * kp
                for half in range(2):
                    off = o + half * 512 + kp * 32
                    split_pairs16(cols, d * 32 + 16 * half, (d + 1) * 32 + 16 * half, kS, off)
                    split_pairs16(cols, (HSP + d) * 32 + 16 * half, (HSP + d + 1) * 32 + 16 * half, vP, off)
        for n in range(nh):
            o = (n * nkb + jl) * CHUNK
            for kp in range(16):
                for half in range(2):
                    c0 = 32 * n + 16 * half
                    split_pairs16(rows, 2 * kp * HSP + c0, (2 * kp + 1) * HSP + c0, kQ, o + half * 512 + kp * 32)


@njit(fastmath=_FM)
def _pack_queries(qA, gA, qT, gT, rows, cols, q_buf, dout, b, ib0, ib1, nqb, Tq, qc, gc, HS, nh):
    """Query blocks ib0 <= ib < ib1 (rows 32 ib ..) of head columns qc (Q) / gc (dO), stored at
    block ib - ib0: qA / gA (block, head chunk) = A panels of Q / dO; qT / gT (head block, query
    chunk) = A panels of Q^T / dO^T, nqb query chunks per head block. rows (2, 32, HSP),
    cols (2, HSP, 32): scratch."""
    HSP = 32 * nh
    for ib in range(ib0, ib1):
        il = ib - ib0
        _copy_rows(rows, 0, q_buf, b, ib * 32, Tq, qc, HS, HSP)
        _copy_rows(rows, 32 * HSP, dout, b, ib * 32, Tq, gc, HS, HSP)
        _transpose32(cols, 0, rows, 0, HSP, np.float32(1.0))
        _transpose32(cols, HSP * 32, rows, 32 * HSP, HSP, np.float32(1.0))
        for c in range(nh):
            o = (il * nh + c) * CHUNK
            for rr in range(32):
                off = o + (rr // 16) * 512 + (rr % 16) * 32
                for half in range(2):
                    split16(rows, rr * HSP + 32 * c + 16 * half, qA, off + 16 * half)
                    split16(rows, (32 + rr) * HSP + 32 * c + 16 * half, gA, off + 16 * half)
        for m in range(nh):
            o = (m * nqb + il) * CHUNK
            for rr in range(32):
                off = o + (rr // 16) * 512 + (rr % 16) * 32
                for half in range(2):
                    split16(cols, (32 * m + rr) * 32 + 16 * half, qT, off + 16 * half)
                    split16(cols, (HSP + 32 * m + rr) * 32 + 16 * half, gT, off + 16 * half)


@njit(inline="always")
def _row_terms(lse, delta, b, h, i, nq_end, k0, nk, shift, causal):
    # (visible keys of the tile, lse * log2 e, D) of query row i; rows past the tile see none
    if i >= nq_end:
        return 0, _ZERO, _ZERO
    jv = _visible_keys(lse, b, h, i, k0, nk, shift, causal)
    if jv == 0:
        return 0, _ZERO, _ZERO
    return jv, lse[b, h, i] * _LOG2E_F, delta[b, h, i]


@njit(fastmath=_FM, error_model="numpy")
def _softmax_grad_dropout(sp, dp, ld, nqt, nkt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, causal, scale,
                          p_drop, seed):
    """With dropout: S (log2 units) -> P, dP -> dS * scale in place on the (32 nqt, 32 nkt) tile, as
    attention_backward._pair; everything a row must not see, and the padding, exactly 0."""
    shift = Tk - Tq
    inv_keep = np.float32(1.0 / (1.0 - p_drop))
    w = 32 * nkt
    for ii in range(32 * nqt):
        i = i0 + ii
        jv, L2, Di = _row_terms(lse, delta, b, h, i, i0 + nq, k0, nk, shift, causal)
        _dropout_row(sp[ii * ld:ii * ld + w], dp[ii * ld:ii * ld + w], jv, w, L2, Di, allow,
                     ((b * NH + h) * Tq + i) * Tk + k0, seed, p_drop, inv_keep, scale)


@njit(fastmath=_FM, error_model="numpy")
def _softmax_grad_packed(sp, dp, ld, pB, dB, dA, nqt, nkt, allow, lse, delta, b, h, Tq, Tk, i0, nq, k0, nk, causal,
                         scale):
    """Without dropout: the P and dS of _softmax_grad_dropout (no mask), packed straight into pB / dB /
    dA (attention_backward_amx_tile.pds_pack16, two query rows x 16 keys a call)."""
    shift = Tk - Tq
    for i in range(nqt):
        for kp in range(16):
            r = 32 * i + 2 * kp
            jv0, l0, d0 = _row_terms(lse, delta, b, h, i0 + r, i0 + nq, k0, nk, shift, causal)
            jv1, l1, d1 = _row_terms(lse, delta, b, h, i0 + r + 1, i0 + nq, k0, nk, shift, causal)
            for j in range(nkt):
                for half in range(2):
                    c = 32 * j + 16 * half
                    v0 = min(16, max(0, jv0 - c))
                    v1 = min(16, max(0, jv1 - c))
                    pds_pack16(sp, r * ld + c, ld, dp, l0, l1, d0, d1, v0, v1, allow, c, scale, pB,
                               (j * nqt + i) * CHUNK + half * 512 + kp * 32, dB,
                               dA, (i * nkt + j) * CHUNK + (r % 32 // 16) * 512 + (r % 16) * 32 + half * 16)


@njit(fastmath=_FM, error_model="numpy")
def _pair(sp, dp, ld, pB, dB, dA, qA, gA, qbl, kS, vP, kbl, nh, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk,
          causal, scale, p_drop, seed):
    """S, dP of the pair on tiles (query blocks from qbl of qA / gA, key blocks from kbl of kS / vP),
    P and dS (_softmax_grad_packed; with dropout _softmax_grad_dropout, then the packs): pB / dB
    (key block, query chunk) B panels, dA (query block, key chunk) A panels."""
    nqt, nkt = (nq + 31) // 32, (nk + 31) // 32
    for i in range(nqt):
        for j in range(nkt):
            o = i * 32 * ld + j * 32
            amx_block32(sp, o, ld, sp, o, ld, qA, (qbl + i) * nh * CHUNK, kS, (kbl + j) * nh * CHUNK, nh, False)
            amx_block32(dp, o, ld, dp, o, ld, gA, (qbl + i) * nh * CHUNK, vP, (kbl + j) * nh * CHUNK, nh, False)
    if p_drop == 0:
        _softmax_grad_packed(sp, dp, ld, pB, dB, dA, nqt, nkt, allow, lse, delta, b, h, Tq, Tk, i0, nq, k0, nk, causal,
                             scale)
        return
    _softmax_grad_dropout(sp, dp, ld, nqt, nkt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, causal, scale,
                          p_drop, seed)
    for j in range(nkt):
        for i in range(nqt):
            o = (j * nqt + i) * CHUNK
            for kp in range(16):
                r0 = (32 * i + 2 * kp) * ld + 32 * j
                for half in range(2):
                    off = o + half * 512 + kp * 32
                    split_pairs16(sp, r0 + 16 * half, r0 + ld + 16 * half, pB, off)
                    split_pairs16(dp, r0 + 16 * half, r0 + ld + 16 * half, dB, off)
    for i in range(nqt):
        for j in range(nkt):
            o = (i * nkt + j) * CHUNK
            for rr in range(32):
                off = o + (rr // 16) * 512 + (rr % 16) * 32
                r0 = (32 * i + rr) * ld + 32 * j
                split16(dp, r0, dA, off)
                split16(dp, r0 + 16, dA, off + 16)


@njit(fastmath=_FM, error_model="numpy")
def _accumulate_kv(dkt, dvt, kb0, pB, dB, qT, gT, qcl, nqb, nq, nk, nh):
    """dV^T += dO^T P, dK^T += Q^T dS for the pair's keys from block kb0 of the accumulators (blocked:
    key block jb is an (HSP, 32) panel at jb * HSP * 32, so a C tile's 16 rows are 2 KB in a row;
    rows of all keys, 4 KB apart, shared L1 sets and TLB entries: 8.9 vs 6-7 ns a TDPBF16PS); the
    pair's query chunks from qcl of qT / gT, whose head blocks hold nqb chunks each."""
    nqt, nkt = (nq + 31) // 32, (nk + 31) // 32
    HSP = 32 * nh
    for j in range(nkt):
        for m in range(nh):
            o = ((kb0 + j) * HSP + 32 * m) * 32
            a = (m * nqb + qcl) * CHUNK
            amx_block32(dvt, o, 32, dvt, o, 32, gT, a, pB, j * nqt * CHUNK, nqt, True)
            amx_block32(dkt, o, 32, dkt, o, 32, qT, a, dB, j * nqt * CHUNK, nqt, True)


@njit(fastmath=_FM, error_model="numpy")
def _accumulate_q(dqs, row, dA, kQ, kcl, nkb, nq, nk, nh):
    """dQ[row:] += dS K ((rows, HSP) accumulator; the pair's key chunks from kcl of kQ, whose head
    blocks hold nkb chunks each)."""
    nqt, nkt = (nq + 31) // 32, (nk + 31) // 32
    HSP = 32 * nh
    for i in range(nqt):
        for n in range(nh):
            o = (row + 32 * i) * HSP + 32 * n
            amx_block32(dqs, o, HSP, dqs, o, HSP, dA, i * nkt * CHUNK, kQ, (n * nkb + kcl) * CHUNK, nkt, True)


@njit(fastmath=_FM)
def _allow(allow, key_mask, b, k0, nk, w):
    for jj in range(w):
        allow[jj] = np.float32(1.0) if jj < nk and key_mask[b, k0 + jj] else _ZERO


@njit(fastmath=_FM)
def _store_kv(dkv, dkt, dvt, b, k0, nk, kc, vc, HS, HSP):
    # dK / dV rows k0 .. k0 + nk - 1 of the kv head = keys 0 .. nk - 1 of the blocked accumulators
    for jj in range(nk):
        dkr = dkv[b, k0 + jj, kc:kc + HS]
        dvr = dkv[b, k0 + jj, vc:vc + HS]
        o = (jj // 32) * HSP * 32 + jj % 32
        for d in range(HS):
            dkr[d] = dkt[o + d * 32]
            dvr[d] = dvt[o + d * 32]


@njit(fastmath=_FM)
def _store_q(dq, dqs, row, b, i0, nq, qc, HS, HSP):
    for ii in range(nq):
        r = dq[b, i0 + ii, qc:qc + HS]
        for d in range(HS):
            r[d] = dqs[(row + ii) * HSP + d]


@njit(inline="always")
def _scratch(n_kb, n_qb, nh, bq, bk):
    """A work item's packed operands and tiles: the key side of n_kb key blocks (kS, vP, kQ), the query
    side of n_qb query blocks (qA, gA, qT, gT), row / column scratch, the S / dP tiles (bq, bk + _LDP),
    the pair's packed P and dS (pB, dB, dA) and the keys' allow mask."""
    HSP = 32 * nh
    ld = bk + _LDP
    nt = (bq // 32) * (bk // 32) * CHUNK
    return (aligned(n_kb * nh * CHUNK, np.uint16), aligned(n_kb * nh * CHUNK, np.uint16),
            aligned(n_kb * nh * CHUNK, np.uint16), aligned(64 * HSP, np.float32), aligned(64 * HSP, np.float32),
            aligned(n_qb * nh * CHUNK, np.uint16), aligned(n_qb * nh * CHUNK, np.uint16),
            aligned(n_qb * nh * CHUNK, np.uint16), aligned(n_qb * nh * CHUNK, np.uint16),
            aligned(bq * ld, np.float32), aligned(bq * ld, np.float32), aligned(nt, np.uint16),
            aligned(nt, np.uint16), aligned(nt, np.uint16), aligned(bk, np.float32))


@njit(fastmath=_FM, error_model="numpy")
def _one_pass(b, hk, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
              scale, p_drop, seed, bq, bk, group, qchunk):
    """attention_backward._one_pass on tiles: all of dQ, dK, dV of (batch b, kv head hk)."""
    B, Tq, Wq = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    bq, bk = round32(bq), round32(bk)
    qch = max(bq, (qchunk // bq) * bq)
    nh = (HS + 31) // 32
    HSP = 32 * nh
    NKB = (Tk + 31) // 32
    ld = bk + _LDP
    kscale = np.float32(scale * _LOG2E)
    kc, vc = k_off + hk * HS, v_off + hk * HS
    for g in range(group):
        _delta_rows(delta, out, dout, b, hk * group + g, HS)
    nqb = min(qch, (Tq + 31) // 32 * 32) // 32  # query blocks of a chunk
    kS, vP, kQ, rows, cols, qA, gA, qT, gT, sp, dp, pB, dB, dA, allow = _scratch(NKB, nqb, nh, bq, bk)
    dkt = aligned(HSP * 32 * NKB, np.float32, True)  # dK^T, blocked (_accumulate_kv)
    dvt = aligned(HSP * 32 * NKB, np.float32, True)  # dV^T
    dqs = aligned(32 * nqb * HSP, np.float32)  # (chunk rows, HSP) dQ of the chunk
    amx_config(_tile_config())
    _pack_keys(kS, vP, kQ, rows, cols, kv_buf, b, 0, NKB, 0, NKB, Tk, kc, vc, HS, nh, kscale)
    for g in range(group):
        h = hk * group + g
        qc = q_off + h * HS
        for c0 in range(0, Tq, qch):
            c1 = min(Tq, c0 + qch)
            _pack_queries(qA, gA, qT, gT, rows, cols, q_buf, dout, b, c0 // 32, (c1 + 31) // 32, nqb, Tq, qc, h * HS,
                          HS, nh)
            dqs[:] = _ZERO
            k_stop = min(Tk, c1 + shift) if causal else Tk
            for k0 in range(0, max(k_stop, 0), bk):
                nk = min(bk, Tk - k0)
                if not _tile_has_keys(key_mask, b, k0, k0 + nk):
                    continue
                _allow(allow, key_mask, b, k0, nk, bk)
                i_start = c0
                if causal:
                    i_start = c0 + (max(0, k0 - shift - c0) // bq) * bq
                for i0 in range(i_start, c1, bq):
                    nq = min(bq, c1 - i0)
                    ql = (i0 - c0) // 32
                    _pair(sp, dp, ld, pB, dB, dA, qA, gA, ql, kS, vP, k0 // 32, nh, allow, lse, delta, b, h, NH, Tq,
                          Tk, i0, nq, k0, nk, causal, scale, p_drop, seed)
                    _accumulate_kv(dkt, dvt, k0 // 32, pB, dB, qT, gT, ql, nqb, nq, nk, nh)
                    _accumulate_q(dqs, i0 - c0, dA, kQ, k0 // 32, NKB, nq, nk, nh)
            _store_q(dq, dqs, 0, b, c0, c1 - c0, qc, HS, HSP)
    amx_release()
    _store_kv(dkv, dkt, dvt, b, 0, Tk, kc, vc, HS, HSP)


def _one_pass_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
                   scale, p_drop, seed, bq, bk, group, qchunk):
    # one pass: item w = (b, kv head)
    NKV = NH // group
    _one_pass(w // NKV, w % NKV, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH,
              HS, causal, scale, p_drop, seed, bq, bk, group, qchunk)


def _dkdv_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
               scale, p_drop, seed, bq, bk, group, qchunk):
    # pass 1 of two: item w = (b, kv head, key tile in _spread order), dK/dV of the key tile
    B, Tq, Wq = q_buf.shape
    Tk = kv_buf.shape[1]
    NKV = NH // group
    shift = Tk - Tq
    bq, bk = round32(bq), round32(bk)
    n_kt = (Tk + bk - 1) // bk
    nh = (HS + 31) // 32
    HSP = 32 * nh
    ld = bk + _LDP
    kscale = np.float32(scale * _LOG2E)
    b = w // (NKV * n_kt)
    hk = (w // n_kt) % NKV
    k0 = _spread(w % n_kt, n_kt) * bk
    nk = min(bk, Tk - k0)
    kc, vc = k_off + hk * HS, v_off + hk * HS
    nkb = bk // 32
    nqb = bq // 32
    kS, vP, kQ, rows, cols, qA, gA, qT, gT, sp, dp, pB, dB, dA, allow = _scratch(nkb, nqb, nh, bq, bk)
    dkt = aligned(HSP * bk, np.float32, True)
    dvt = aligned(HSP * bk, np.float32, True)
    if _tile_has_keys(key_mask, b, k0, k0 + nk):
        amx_config(_tile_config())
        _pack_keys(kS, vP, kQ, rows, cols, kv_buf, b, k0 // 32, (k0 + nk + 31) // 32, k0 // 32, nkb, Tk, kc, vc, HS,
                   nh, kscale)
        _allow(allow, key_mask, b, k0, nk, bk)
        i_first = max(0, k0 - shift) if causal else 0
        for g in range(group):
            h = hk * group + g
            for i0 in range((i_first // bq) * bq, Tq, bq):
                nq = min(bq, Tq - i0)
                _pack_queries(qA, gA, qT, gT, rows, cols, q_buf, dout, b, i0 // 32, (i0 + nq + 31) // 32, nqb, Tq,
                              q_off + h * HS, h * HS, HS, nh)
                _pair(sp, dp, ld, pB, dB, dA, qA, gA, 0, kS, vP, 0, nh, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq,
                      k0, nk, causal, scale, p_drop, seed)
                _accumulate_kv(dkt, dvt, 0, pB, dB, qT, gT, 0, nqb, nq, nk, nh)
        amx_release()
    _store_kv(dkv, dkt, dvt, b, k0, nk, kc, vc, HS, HSP)


def _dq_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal, scale,
             p_drop, seed, bq, bk, group, qchunk):
    # pass 2 of two: item w = (b, head, query tile in _spread order), dQ of the tile
    B, Tq, Wq = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    bq, bk = round32(bq), round32(bk)
    n_qt = (Tq + bq - 1) // bq
    nh = (HS + 31) // 32
    HSP = 32 * nh
    ld = bk + _LDP
    kscale = np.float32(scale * _LOG2E)
    b = w // (NH * n_qt)
    h = (w // n_qt) % NH
    hk = h // group
    i0 = _spread(w % n_qt, n_qt) * bq
    nq = min(bq, Tq - i0)
    qc = q_off + h * HS
    kc, vc = k_off + hk * HS, v_off + hk * HS
    nkb = bk // 32
    nqb = bq // 32
    kS, vP, kQ, rows, cols, qA, gA, qT, gT, sp, dp, pB, dB, dA, allow = _scratch(nkb, nqb, nh, bq, bk)
    dqs = aligned(bq * HSP, np.float32, True)
    amx_config(_tile_config())
    _pack_queries(qA, gA, qT, gT, rows, cols, q_buf, dout, b, i0 // 32, (i0 + nq + 31) // 32, nqb, Tq, qc, h * HS, HS,
                  nh)
    j_stop = min(Tk, i0 + nq + shift) if causal else Tk
    for k0 in range(0, max(j_stop, 0), bk):
        nk = min(bk, Tk - k0)
        if not _tile_has_keys(key_mask, b, k0, k0 + nk):
            continue
        _pack_keys(kS, vP, kQ, rows, cols, kv_buf, b, k0 // 32, (k0 + nk + 31) // 32, k0 // 32, nkb, Tk, kc, vc, HS,
                   nh, kscale)
        _allow(allow, key_mask, b, k0, nk, bk)
        _pair(sp, dp, ld, pB, dB, dA, qA, gA, 0, kS, vP, 0, nh, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk,
              causal, scale, p_drop, seed)
        _accumulate_q(dqs, 0, dA, kQ, 0, nkb, nq, nk, nh)
    amx_release()
    _store_q(dq, dqs, 0, b, i0, nq, qc, HS, HSP)


if HOST_HAS_AMX:  # (tile instructions do not compile for other hosts)
    _one_pass_item = kernel(_ITEM_SIG, cost=8.0)(njit(cache=True, fastmath=_FM, error_model="numpy")(_one_pass_item))
    _dkdv_item = kernel(_ITEM_SIG, cost=6.0)(njit(cache=True, fastmath=_FM, error_model="numpy")(_dkdv_item))
    _dq_item = kernel(_ITEM_SIG, cost=6.0)(njit(cache=True, fastmath=_FM, error_model="numpy")(_dq_item))
else:
    _one_pass_item = _dkdv_item = _dq_item = None
