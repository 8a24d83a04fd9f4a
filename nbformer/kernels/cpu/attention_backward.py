"""Attention backward on the CPU, FlashAttention-2 style, deterministic.

Probabilities are recomputed from the saved logsumexp (P = exp(scale * q.k - lse)), with
D = rowsum(dO * O). Per (query tile, key tile) pair the five products
    S = Q K^T,  dP = dO V^T,  dS = P * (dP - D) * scale,  dV += P^T dO,  dK += dS^T Q,  dQ += dS K
run through register-blocked micro-kernels (blocks of C held in vector registers across the whole t loop,
no packing): S, dP, P and dS of a tile pair in one fused kernel (attention_backward_tile.pds_tile: S and dP
never leave the registers; with dropout, two rank updates and an element-wise pass), the three
accumulating products through the forward's microkernel.rank_update (12 x 32 with AVX-512, else 6 x 16).
Operands are contiguous scratch:
K^T (pre-scaled to log2 units) and V^T of the key tile with padded row strides, the K tile, Q and dO
(of a chunk of query_chunk query rows in one pass, else of the query tile), S/P and dP/dS tiles (queries
x keys); dQ (and in one pass dK/dV) accumulate in place in the output buffers.

Two schedules, chosen by the launcher (choose_passes: shapes and thread count); both give the same bits:
  one pass  (passes=1), one work item per (batch, kv head), see _one_pass: per query head of the group
            and chunk of query rows, the key tiles, and per key tile the chunk's query tiles; dK/dV/dQ
            accumulate in place (the item owns those rows x columns): 5 products per tile pair;
  two passes (passes=2), when there are too few (batch, kv head) items for the threads:
            pass 1, one item per (batch, kv head, key tile): dK, dV;
            pass 2, one item per (batch, head, query tile): dQ (S and dP recomputed: 7 products).
No two threads ever add into the same row, and every sum is a per-element FMA chain in one fixed order:
dK/dV of a key over (query head of the group, query row) increasing, dQ of a query over keys increasing,
each element of S / dP over the head dimension in order (fp32 stores between micro-kernel calls are
exact, so where the loops are cut into tiles changes no bit). The result is the same whatever the thread
count, the schedule or the tile sizes (tests/test_attention_backward_cpu.py checks all three bit for bit).
Scratch per work item is O((block_q + block_k) * (block_k + head_size)) floats, plus in one pass a
chunk's Q and dO (2 * query_chunk * head_size floats): independent of T, nothing grows with T^2.
Causal tile pairs entirely above the diagonal and key tiles whose keys are all padding are skipped;
static prange chunks see light and heavy causal tiles mixed (_spread).

Grouped-query attention (n_kv_heads = NKV < NH): query head h reads key/value head h // (NH // NKV);
dK/dV of a kv head are the sums over its query heads in increasing head order.

Attention dropout: the kept probability of (b, h, i, j) is keep(seed, ((b*NH + h)*Tq + i)*Tk + j)
with scale 1/(1-p), the same counter the forward uses, so the mask is regenerated, not stored.
On a host with Intel AMX, heads of 32 dims and more run the same schedules with the tile products on
tiles (attention_backward_amx.py, fp32-accurate from bfloat16 splits; its own bits, as independent of
schedule, tiles and threads); amx=False keeps this module's path there.
Speed vs torch SDPA's backward: benchmarks/bench_attention_backward.py, results in
benchmarks/results/attention_backward.md.
"""
import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .attention import _exp2
from .attention_backward_tile import pds_tile as _pds
from .microkernel import rank_update as _mm
from .precompile import BOOL, F3, F32, F64, I64, R3, RU2, U64, kernel, native_address, native_caller
from . import gemm_amx
from .gemm import check_threads, num_threads
from .rng import keep

_LOG2E = 1.4426950408889634
_LOG2E_F = np.float32(_LOG2E)
_ZERO = np.float32(0.0)
_PAD = 16  # row padding (floats) of the K^T/V^T and S/dP tiles: rows 64-byte aligned when bk is a multiple of 16
# P = exp2(s*log2e - lse*log2e) through the forward's vectorisable exp2. The argument is <= 0 for every
# visible key (lse >= its score); padded keys are multiplied by 0 afterwards, and the clamp at 0 keeps
# their (possibly large) scores from overflowing exp2 into inf * 0 = NaN.

_FM = {"contract", "reassoc", "nsz", "arcp"}  # no nnan/ninf: lse can be -inf for empty rows




@njit  # no fastmath: the same bits wherever it is linked (the _delta kernel, one-pass items)
def _delta_rows(delta, out, dout, b, h, HS):
    # delta[b, h, :] = rowsum(dO * O) of head h, summed in float64
    for i in range(out.shape[1]):
        s = 0.0
        for d in range(HS):
            s += dout[b, i, h * HS + d] * out[b, i, h * HS + d]
        delta[b, h, i] = s


@kernel((F3, R3, R3, I64, I64), cost=1.5)
@njit(parallel=True, cache=True)
def _delta(delta, out, dout, NH, HS):
    # delta (B, NH, Tq) = rowsum(dO * O) per head (two passes; one-pass items compute their own heads')
    B = out.shape[0]
    for bh in prange(B * NH):
        _delta_rows(delta, out, dout, bh // NH, bh % NH, HS)


@njit(inline="always")
def _tile_has_keys(key_mask, b, k0, k1):
    for j in range(k0, k1):
        if key_mask[b, j]:
            return True
    return False


@njit(inline="always")
def _spread(t, n):
    """Tile order 0, n-1, 1, n-2, ...: a contiguous chunk of work items (numba's static prange
    split) then mixes the light and the heavy causal tiles."""
    return t // 2 if t % 2 == 0 else n - 1 - t // 2


@njit(fastmath=_FM)
def _load_kv_tile(kt, vt, ks, allow, kv_buf, key_mask, b, k0, nk, kc, vc, HS, ldk, kscale):
    """kt (HS, ldk) = K_tile^T * kscale, vt (HS, ldk) = V_tile^T, ks (nk, HS) = K_tile,
    allow[:nk] = 1 where the key is not padding, else 0."""
    for jj in range(nk):
        allow[jj] = np.float32(1.0) if key_mask[b, k0 + jj] else _ZERO
        krow = kv_buf[b, k0 + jj, kc:kc + HS]
        vrow = kv_buf[b, k0 + jj, vc:vc + HS]
        for d in range(HS):
            x = krow[d]
            ks[jj * HS + d] = x
            kt[d * ldk + jj] = x * kscale
            vt[d * ldk + jj] = vrow[d]


@njit(fastmath=_FM)
def _load_q_tile(qs, gs, q_buf, dout, b, i0, nq, qc, gc, HS):
    """qs (nq, HS) = Q tile, gs (nq, HS) = dO tile, contiguous."""
    for ii in range(nq):
        qrow = q_buf[b, i0 + ii, qc:qc + HS]
        grow = dout[b, i0 + ii, gc:gc + HS]
        for d in range(HS):
            qs[ii * HS + d] = qrow[d]
            gs[ii * HS + d] = grow[d]


@njit(inline="always")
def _visible_keys(lse, b, h, i, k0, nk, shift, causal):
    """Keys k0 .. k0 + jv - 1 of the tile that query row i sees: causal (bottom-right) cuts the tile,
    a row that sees no key at all (lse = -inf) sees none of it."""
    if lse[b, h, i] == -np.inf:
        return 0
    return max(0, min(nk, i + shift - k0 + 1)) if causal else nk


@njit(inline="always")
def _dropout_row(srow, prow, jv, w, L2, Di, allow, base, seed, p_drop, inv_keep, scale):
    """One query row of a tile with attention dropout: srow S -> P (kept, rescaled), prow dP -> dS * scale
    for its jv visible keys (counters base + j), exactly 0 from there to w."""
    for jj in range(jv):
        p = _exp2(min(srow[jj] - L2, _ZERO)) * allow[jj]
        if keep(seed, base + jj, p_drop):
            prow[jj] = p * (prow[jj] * inv_keep - Di) * scale
            srow[jj] = p * inv_keep
        else:
            prow[jj] = -p * Di * scale
            srow[jj] = _ZERO
    for jj in range(jv, w):
        srow[jj] = _ZERO
        prow[jj] = _ZERO


@njit(fastmath=_FM, error_model="numpy")
def _pair(sp, dp, qs, gs, qo, kt, vt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, HS, ld, ldk, causal,
          scale, p_drop, seed):
    """One (query tile, key tile) pair, the Q / dO tiles at offset qo of qs / gs (rows of HS floats):
    sp (nq, ld) = P (dropped and rescaled when p_drop > 0) and
    dp (nq, ld) = dS * scale, both exactly 0 where a key is masked, causal-hidden or padding, and on
    rows that see no key (lse = -inf). Without dropout one fused kernel (attention_backward_tile)
    computes S, dP, P and dS of the whole tile; the entries a row must not see are zeroed after it."""
    shift = Tk - Tq
    Z, O = np.int64(0), np.int64(1)  # not literals: one compiled _mm serves every call
    if p_drop == 0:
        _pds(sp, dp, Z, ld, nq, nk, qs, gs, qo, O, HS, kt, vt, ldk, HS, lse, delta, (b * NH + h) * Tq + i0, allow,
             scale)
        for ii in range(nq):
            jv = _visible_keys(lse, b, h, i0 + ii, k0, nk, shift, causal)
            for jj in range(jv, nk):
                sp[ii * ld + jj] = _ZERO
                dp[ii * ld + jj] = _ZERO
        return
    _mm(sp, Z, ld, nq, nk, qs, qo, O, HS, kt, Z, ldk, HS, Z)  # S (log2 units) = Q (K^T * c)
    _mm(dp, Z, ld, nq, nk, gs, qo, O, HS, vt, Z, ldk, HS, Z)  # dP = dO V^T
    inv_keep = np.float32(1.0 / (1.0 - p_drop))
    for ii in range(nq):
        i = i0 + ii
        L = lse[b, h, i]
        jv = _visible_keys(lse, b, h, i, k0, nk, shift, causal)
        L2 = L * _LOG2E_F
        Di = delta[b, h, i]
        _dropout_row(sp[ii * ld:ii * ld + nk], dp[ii * ld:ii * ld + nk], jv, nk, L2, Di, allow,
                     ((b * NH + h) * Tq + i) * Tk + k0, seed, p_drop, inv_keep, scale)


_BWD_SIG = (F3, F3, R3, I64, R3, I64, I64, R3, R3, F3, R3, RU2, I64, I64, BOOL, F32, F64, U64, I64, I64, I64, I64)
# (dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal, scale, p_drop,
#  seed, bq, bk, group, qchunk): qchunk = 0: two passes, else one pass with chunks of qchunk query rows
# Each work item is its own cached kernel (first argument: the item index), called by the parallel
# loop through its native address (precompile.native_caller) instead of being linked into it: its
# code is compiled once, in parallel with the loop around it.
_ITEM_SIG = (I64,) + _BWD_SIG


@njit(fastmath=_FM)
def _zero_rows(a, b, i0, i1, c0, n):
    for i in range(i0, i1):
        row = a[b, i, c0:c0 + n]
        for d in range(n):
            row[d] = _ZERO


@njit(fastmath=_FM, error_model="numpy")
def _one_pass(b, hk, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
              scale, p_drop, seed, bq, bk, group, qchunk):
    """All of dQ, dK, dV of (batch b, kv head hk), in place in dq / dkv (this item owns those rows x
    columns). Loops: query head g of the group, query chunk (qchunk rows rounded to block_q, its Q / dO copied once to
    contiguous scratch so that chunk, its dQ rows and the tiles stay in L2), key tile (K^T, V^T, K
    copied), query tile of the chunk. dK/dV of a key thus add up over (g, query row) increasing and
    dQ of a query over keys increasing: the order of the two-pass schedule."""
    B, Tq, Wq = q_buf.shape
    Tk, Wkv = kv_buf.shape[1], kv_buf.shape[2]
    shift = Tk - Tq  # bottom-right causal alignment
    ld = bk + _PAD
    kscale = np.float32(scale * _LOG2E)
    qch = max(bq, (qchunk // bq) * bq)
    kc, vc = k_off + hk * HS, v_off + hk * HS
    Z, O = np.int64(0), np.int64(1)
    dkv1, dq1 = dkv.reshape(dkv.size), dq.reshape(dq.size)  # flat views: _mm's one signature
    for g in range(group):
        _delta_rows(delta, out, dout, b, hk * group + g, HS)
    _zero_rows(dkv, b, Z, Tk, kc, HS)
    _zero_rows(dkv, b, Z, Tk, vc, HS)
    kt = np.empty(HS * ld, np.float32)   # (HS, ld) K tile^T * scale * log2(e)
    vt = np.empty(HS * ld, np.float32)   # (HS, ld) V tile^T
    ks = np.empty(bk * HS, np.float32)   # (bk, HS) K tile
    qs = np.empty(min(qch, Tq) * HS, np.float32)  # (chunk, HS) Q rows of the chunk
    gs = np.empty(min(qch, Tq) * HS, np.float32)  # (chunk, HS) dO rows of the chunk
    sp = np.empty(bq * ld, np.float32)   # (bq, ld) S, then P
    dp = np.empty(bq * ld, np.float32)   # (bq, ld) dP, then dS * scale
    allow = np.empty(bk, np.float32)
    for g in range(group):
        h = hk * group + g
        qc = q_off + h * HS
        _zero_rows(dq, b, Z, Tq, qc, HS)
        for c0 in range(0, Tq, qch):
            c1 = min(Tq, c0 + qch)
            _load_q_tile(qs, gs, q_buf, dout, b, c0, c1 - c0, qc, h * HS, HS)
            k_stop = min(Tk, c1 + shift) if causal else Tk  # keys seen by the chunk's last row
            for k0 in range(0, max(k_stop, 0), bk):
                nk = min(bk, Tk - k0)
                if not _tile_has_keys(key_mask, b, k0, k0 + nk):
                    continue
                _load_kv_tile(kt, vt, ks, allow, kv_buf, key_mask, b, k0, nk, kc, vc, HS, ld, kscale)
                i_start = c0
                if causal:  # earlier query tiles see none of these keys
                    i_start = c0 + (max(0, k0 - shift - c0) // bq) * bq
                for i0 in range(i_start, c1, bq):
                    nq = min(bq, c1 - i0)
                    qo = (i0 - c0) * HS
                    _pair(sp, dp, qs, gs, qo, kt, vt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, HS, ld,
                          ld, causal, scale, p_drop, seed)
                    _mm(dkv1, (b * Tk + k0) * Wkv + vc, Wkv, nk, HS, sp, Z, ld, O, gs, qo, HS, nq, O)  # dV += P^T dO
                    _mm(dkv1, (b * Tk + k0) * Wkv + kc, Wkv, nk, HS, dp, Z, ld, O, qs, qo, HS, nq, O)  # dK += dS^T Q
                    _mm(dq1, (b * Tq + i0) * Wq + qc, Wq, nq, HS, dp, Z, O, ld, ks, Z, HS, nk, O)  # dQ += dS K


# Compile CPU s (fresh process, Zen 4): one pass 15.4 (with the pass-1 code in the same item) -> 7.8, once
# _mm (and _pair) got one signature each (literal 0 / 1 arguments and 1-d vs 3-d C arrays had made five
# of _mm, each compiled and optimised again) and the two schedules got an item kernel each; a graph's
# precompile builds only the schedule its shapes choose (precompile.kernels_for).
@kernel(_ITEM_SIG, cost=8.0)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _one_pass_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
                   scale, p_drop, seed, bq, bk, group, qchunk):
    # one pass (qchunk > 0): item w = (b, kv head), everything (_one_pass)
    NKV = NH // group
    _one_pass(w // NKV, w % NKV, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH,
              HS, causal, scale, p_drop, seed, bq, bk, group, qchunk)


@kernel(_ITEM_SIG, cost=4.0)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _dkdv_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal,
               scale, p_drop, seed, bq, bk, group, qchunk):
    # pass 1 of two (qchunk = 0): item w = (b, kv head, key tile in _spread order), dK/dV of the key tile only
    B, Tq, Wq = q_buf.shape
    Tk = kv_buf.shape[1]
    NKV = NH // group
    Z, O = np.int64(0), np.int64(1)
    shift = Tk - Tq  # bottom-right causal alignment
    n_kt = (Tk + bk - 1) // bk
    ld = bk + _PAD
    kscale = np.float32(scale * _LOG2E)
    b = w // (NKV * n_kt)
    hk = (w // n_kt) % NKV
    k0 = _spread(w % n_kt, n_kt) * bk
    nk = min(bk, Tk - k0)
    kt = np.empty(HS * ld, np.float32)
    vt = np.empty(HS * ld, np.float32)
    ks = np.empty(bk * HS, np.float32)
    qs = np.empty(bq * HS, np.float32)   # (bq, HS) Q tile
    gs = np.empty(bq * HS, np.float32)   # (bq, HS) dO tile
    sp = np.empty(bq * ld, np.float32)
    dp = np.empty(bq * ld, np.float32)
    dk = np.zeros(nk * HS, np.float32)   # (nk, HS) dK of the key tile
    dv = np.zeros(nk * HS, np.float32)   # (nk, HS) dV of the key tile
    allow = np.empty(bk, np.float32)
    if _tile_has_keys(key_mask, b, k0, k0 + nk):
        _load_kv_tile(kt, vt, ks, allow, kv_buf, key_mask, b, k0, nk, k_off + hk * HS, v_off + hk * HS, HS, ld,
                      kscale)
        i_first = max(0, k0 - shift) if causal else 0  # earlier queries see none of these keys
        for g in range(group):  # query heads of the group in order, then their rows
            h = hk * group + g
            for i0 in range((i_first // bq) * bq, Tq, bq):
                nq = min(bq, Tq - i0)
                _load_q_tile(qs, gs, q_buf, dout, b, i0, nq, q_off + h * HS, h * HS, HS)
                _pair(sp, dp, qs, gs, Z, kt, vt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, HS, ld, ld,
                      causal, scale, p_drop, seed)
                _mm(dv, Z, HS, nk, HS, sp, Z, ld, O, gs, Z, HS, nq, O)  # dV += P^T dO
                _mm(dk, Z, HS, nk, HS, dp, Z, ld, O, qs, Z, HS, nq, O)  # dK += dS^T Q
    for jj in range(nk):
        dkr = dkv[b, k0 + jj, k_off + hk * HS:k_off + (hk + 1) * HS]
        dvr = dkv[b, k0 + jj, v_off + hk * HS:v_off + (hk + 1) * HS]
        for d in range(HS):
            dkr[d] = dk[jj * HS + d]
            dvr[d] = dv[jj * HS + d]


_call_dkdv_item = native_caller(_ITEM_SIG)


@kernel(_BWD_SIG + (I64,), cost=1.2)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _dkdv(dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal, scale,
          p_drop, seed, bq, bk, group, qchunk, item_fn):
    # the only pass (items (b, kv head), _one_pass_item) or pass 1 (items (b, kv head, key tile), _dkdv_item)
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    NKV = NH // group
    n_items = B * NKV if qchunk > 0 else B * NKV * ((Tk + bk - 1) // bk)
    for w in prange(n_items):
        _call_dkdv_item(item_fn, (np.int64(w), dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta,
                                  out, key_mask, NH, HS, causal, scale, p_drop, seed, bq, bk, group, qchunk))


@kernel(_ITEM_SIG, cost=4.0)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _dq_item(w, dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal, scale,
             p_drop, seed, bq, bk, group, qchunk):
    # pass 2 of two: item w = (b, head, query tile in _spread order); dQ of the tile's rows, in place
    B, Tq, Wq = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    n_qt = (Tq + bq - 1) // bq
    ld = bk + _PAD
    kscale = np.float32(scale * _LOG2E)
    b = w // (NH * n_qt)
    h = (w // n_qt) % NH
    hk = h // group  # the key/value head of query head h
    i0 = _spread(w % n_qt, n_qt) * bq
    nq = min(bq, Tq - i0)
    qc = q_off + h * HS
    Z, O = np.int64(0), np.int64(1)
    dq1 = dq.reshape(dq.size)
    _zero_rows(dq, b, i0, i0 + nq, qc, HS)
    kt = np.empty(HS * ld, np.float32)
    vt = np.empty(HS * ld, np.float32)
    ks = np.empty(bk * HS, np.float32)
    qs = np.empty(bq * HS, np.float32)
    gs = np.empty(bq * HS, np.float32)
    sp = np.empty(bq * ld, np.float32)
    dp = np.empty(bq * ld, np.float32)
    allow = np.empty(bk, np.float32)
    _load_q_tile(qs, gs, q_buf, dout, b, i0, nq, qc, h * HS, HS)
    j_stop = min(Tk, i0 + nq + shift) if causal else Tk  # keys visible to the tile's last row
    for k0 in range(0, max(j_stop, 0), bk):
        nk = min(bk, Tk - k0)
        if not _tile_has_keys(key_mask, b, k0, k0 + nk):
            continue
        _load_kv_tile(kt, vt, ks, allow, kv_buf, key_mask, b, k0, nk, k_off + hk * HS, v_off + hk * HS, HS, ld,
                      kscale)
        _pair(sp, dp, qs, gs, Z, kt, vt, allow, lse, delta, b, h, NH, Tq, Tk, i0, nq, k0, nk, HS, ld, ld, causal,
              scale, p_drop, seed)
        _mm(dq1, (b * Tq + i0) * Wq + qc, Wq, nq, HS, dp, Z, O, ld, ks, Z, HS, nk, O)  # dQ += dS K


_call_dq_item = native_caller(_ITEM_SIG)


@kernel(_BWD_SIG + (I64,), cost=1.5)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _dq(dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, out, key_mask, NH, HS, causal, scale,
        p_drop, seed, bq, bk, group, qchunk, item_fn):
    # pass 2 of two: items (b, head, query tile), see _dq_item
    B, Tq, _ = q_buf.shape
    n_items = B * NH * ((Tq + bq - 1) // bq)
    for w in prange(n_items):
        _call_dq_item(item_fn, (np.int64(w), dq, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta,
                                out, key_mask, NH, HS, causal, scale, p_drop, seed, bq, bk, group, qchunk))


_TWO_PASS_COST = 1.9  # two passes / one pass, one thread, B=1 NH=12 T=1024 HS=64 (measured: 128 / 69 ms)
_TWO_PASS_COST_AMX = 2.6  # ... on AMX, where two passes pack the query side once per pair (128 / 48.5 ms)
_TWO_PASS_GAIN = 0.8  # ... and taken only if they promise to finish in < 80% of the one-pass time: on this
# 2-vCPU machine B=1 NH=1 T=2048 measured 30 ms in one pass (one item, one thread busy) vs 49 ms in two
# passes on both threads (the two vCPUs do not scale like two cores on FMA-bound code)
AMX_MIN_HEAD = 32  # smaller heads would pad every tile product to 32 head dims: the AVX path then
# Fewer query x key pairs than this and AMX's fixed costs per work item (packing the key side, the
# transposed accumulators) outweigh its faster products. In-process A/Bs, B=1 NH=12 HS=64, 2 threads,
# AMX / AVX-512 time ratio: full T=128 0.80, 256 1.01, 384 1.09, 512 1.09, 768 1.19; causal T=256 0.89,
# 384 1.00, 512 0.97, 768 1.09, 1024 1.06-1.13, 2048 1.20.
AMX_MIN_AREA, AMX_MIN_AREA_CAUSAL = 384 * 384, 640 * 640


def uses_amx(head_size, Tq, Tk, causal):
    """Whether attention_backward (amx=None) runs these shapes' tile products on AMX."""
    area = int(Tq) * int(Tk)
    big = area >= (AMX_MIN_AREA_CAUSAL if causal else AMX_MIN_AREA)
    return int(head_size) >= AMX_MIN_HEAD and big and gemm_amx.available()


def choose_passes(B, NKV, threads, amx=False):
    """1 unless the two-pass schedule (better balanced, _TWO_PASS_COST times the work, or
    _TWO_PASS_COST_AMX on AMX) should finish clearly (_TWO_PASS_GAIN) before the (batch, kv head)
    items do in rounds of `threads`."""
    items = B * NKV
    one = -(-items // threads)
    two = (_TWO_PASS_COST_AMX if amx else _TWO_PASS_COST) * items / threads
    return 2 if two < _TWO_PASS_GAIN * one else 1


def attention_backward(dq_buf, dkv_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                       n_heads, head_size, causal, scale, dropout_p=0.0, seed=0, block_q=64, block_k=64,
                       n_kv_heads=None, passes=None, query_chunk=512, threads=None, amx=None):
    """Gradients of attention_forward.

    dq_buf (shape of q_buf): columns q_off + h*HS written with dQ; dkv_buf (shape of kv_buf):
    columns k_off/v_off + h*HS written with dK/dV. For self-attention on a fused QKV buffer pass
    the same array as dq_buf and dkv_buf: the three column ranges are disjoint. delta (B, NH, Tq)
    is scratch (rowsum(dO * O)). Other arguments as in attention_forward; dropout_p/seed must be
    those of the forward call. n_kv_heads: grouped-query attention as in attention_forward (dK/dV of
    a kv head are the sums over its query heads, in head order). passes: 1 or 2 (see the module
    doc; None: choose_passes from the shapes and the Numba thread count); it never changes the bits,
    nor do block_q / block_k / query_chunk or the thread count. query_chunk: one pass, query rows whose
    Q / dO / dQ stay in L2 while the key tiles stream past (rounded down to a multiple of block_q).
    threads: the Numba threads for this call (None: unchanged; choose_passes then sees this count);
    work items own disjoint rows, so it never changes the bits either (the tuner's
    cpu.attention_backward family declares all five as bit-exact, nbformer/tuning/space.py).
    amx: run the tile products on Intel AMX (attention_backward_amx.py; block sizes rounded up to
    multiples of 32); None: where gemm_amx.available(), head_size >= 32 and Tq * Tk large enough
    (uses_amx). Its bits differ from the AVX-512 path's, and are as independent of the schedule,
    tiles and threads.
    """
    import numba

    NH, HS = int(n_heads), int(head_size)
    NKV = NH if n_kv_heads is None else int(n_kv_heads)
    if NKV < 1 or NH % NKV:
        raise GraphError(f"attention_backward: n_kv_heads = {NKV} must be >= 1 and divide n_heads = {NH}")
    C = NH * HS
    B, Tq, Wq = q_buf.shape
    Tk, Wkv = kv_buf.shape[1], kv_buf.shape[2]
    for name, a, shape in (("dout", dout, (B, Tq, C)), ("out", out, (B, Tq, C)), ("lse", lse, (B, NH, Tq)),
                           ("delta", delta, (B, NH, Tq)), ("dq_buf", dq_buf, q_buf.shape),
                           ("dkv_buf", dkv_buf, kv_buf.shape)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or tuple(a.shape) != tuple(shape):
            got = f"{a.dtype}{a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise GraphError(f"attention_backward: {name} must be float32 {tuple(shape)}, got {got}")
    if not (dq_buf.flags.c_contiguous and dkv_buf.flags.c_contiguous):
        raise GraphError("attention_backward: dq_buf and dkv_buf must be C-contiguous")
    if key_mask.dtype != np.uint8 or key_mask.shape != (B, Tk):
        raise GraphError(f"attention_backward: key_mask must be uint8 {(B, Tk)}, got {key_mask.dtype}{key_mask.shape}")
    if q_off + C > Wq or max(k_off, v_off) + NKV * HS > Wkv:
        raise GraphError("attention_backward: buffer widths cannot hold the heads at the given offsets")
    if not 0.0 <= dropout_p < 1.0:
        raise GraphError(f"attention_backward: dropout_p must be in [0, 1), got {dropout_p}")
    bq, bk = int(block_q), int(block_k)
    if bq < 1 or bk < 1:
        raise GraphError(f"attention_backward: block_q and block_k must be >= 1, got {bq}, {bk}")
    threads = check_threads("attention_backward", threads)
    if amx is None:
        amx = uses_amx(HS, Tq, Tk, causal)
    elif amx and not gemm_amx.available():
        raise GraphError("attention_backward: amx=True on a host or process without AMX (gemm_amx.available())")
    if passes is None:
        passes = choose_passes(B, NKV, numba.get_num_threads() if threads is None else threads, bool(amx))
    qch = int(query_chunk)
    if qch < 1:
        raise GraphError(f"attention_backward: query_chunk must be >= 1, got {query_chunk}")
    if passes not in (1, 2):
        raise GraphError(f"attention_backward: passes must be 1 or 2, got {passes!r}")
    if B == 0 or Tq == 0 or Tk == 0:
        return
    if amx:  # whole 32-row / 32-key blocks of tiles (the items and the parallel loops count the same tiles)
        bq, bk = -(-bq // 32) * 32, -(-bk // 32) * 32
    sc, pd, sd = np.float32(scale), float(dropout_p), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    args = (dq_buf, dkv_buf, q_buf, int(q_off), kv_buf, int(k_off), int(v_off), dout, lse, delta, out, key_mask, NH, HS,
            bool(causal), sc, pd, sd, bq, bk, NH // NKV, qch if passes == 1 else 0)
    with num_threads(threads):
        if passes == 2:
            _delta(delta, out, dout, NH, HS)
        mod = "attention_backward_amx" if amx else "attention_backward"
        item = "_one_pass_item" if passes == 1 else "_dkdv_item"
        _dkdv(*args, native_address(f"{mod}.{item}"))
        if passes == 2:
            _dq(*args, native_address(f"{mod}._dq_item"))
