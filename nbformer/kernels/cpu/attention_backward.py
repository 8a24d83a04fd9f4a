"""Attention backward on the CPU, FlashAttention-2 style, deterministic.

Probabilities are recomputed from the saved logsumexp (P = exp(scale * q.k - lse)), with
D = rowsum(dO * O). Two passes, so that no two threads ever add into the same row:
  pass 1, one work item per (batch, head, key tile):   dK, dV
  pass 2, one work item per (batch, head, query tile): dQ
Scratch per work item is O(tile * head_size); nothing grows with T^2. Causal tiles entirely
above the diagonal and key tiles whose keys are all padding are skipped.

Grouped-query attention (n_kv_heads = NKV < NH): query head h reads key/value head h // (NH // NKV);
a pass-1 work item is then (batch, kv head, key tile) and sums the dK/dV of its group's query
heads in increasing head order, so the result is still deterministic.

Attention dropout: the kept probability of (b, h, i, j) is keep(seed, ((b*NH + h)*Tq + i)*Tk + j)
with scale 1/(1-p), the same counter the forward uses, so the mask is regenerated, not stored.
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .attention import _exp2
from .precompile import BOOL, F3, F32, F64, I64, R3, RU2, U64, kernel, native_address, native_caller
from .rng import keep

_LOG2E_F = np.float32(1.4426950408889634)
# P = exp(s - lse) through the forward's vectorisable exp2. The argument is <= 0 for every visible
# key (lse >= its score); padded keys are multiplied by 0 afterwards, and the clamp at 0 keeps their
# (possibly large) scores from overflowing exp2 into inf * 0 = NaN.

_FM = {"contract", "reassoc", "nsz", "arcp"}  # no nnan/ninf: lse can be -inf for empty rows


@kernel((F3, R3, R3, I64, I64), cost=1.5)
@njit(parallel=True, cache=True)
def _delta(delta, out, dout, NH, HS):
    # delta (B, NH, Tq) = rowsum(dO * O) per head
    B, Tq, _ = out.shape
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        for i in range(Tq):
            s = 0.0
            for d in range(HS):
                s += dout[b, i, h * HS + d] * out[b, i, h * HS + d]
            delta[b, h, i] = s


@njit(inline="always")
def _tile_has_keys(key_mask, b, k0, k1):
    for j in range(k0, k1):
        if key_mask[b, j]:
            return True
    return False


@njit(inline="always", fastmath=_FM)
def _row_products(s, dp, qrow, grow, kt, vt, n, HS):
    """s[:n] = K_tile q and dp[:n] = V_tile dO for one query row, from the transposed tiles
    kt, vt (HS, bk): axpy form, unit stride, no horizontal reductions."""
    for jj in range(n):
        s[jj] = np.float32(0.0)
        dp[jj] = np.float32(0.0)
    for d in range(HS):
        qd, gd = qrow[d], grow[d]
        ktd, vtd = kt[d], vt[d]
        for jj in range(n):
            s[jj] += qd * ktd[jj]
            dp[jj] += gd * vtd[jj]


_BWD_SIG = (F3, R3, I64, R3, I64, I64, R3, R3, R3, RU2, I64, I64, BOOL, F32, F64, U64, I64, I64, I64)
# Each work item is its own cached kernel (first argument: the item index), called by the parallel
# loop through its native address (precompile.native_caller) instead of being linked into it: its
# code is compiled once, in parallel with the loop around it.
_ITEM_SIG = (I64,) + _BWD_SIG


@kernel(_ITEM_SIG, cost=2.8)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _dkdv_item(w, dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
          p_drop, seed, bq, bk, group):
    # one work item of _dkdv (see _ITEM_SIG)
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq  # bottom-right causal alignment
    n_kt = (Tk + bk - 1) // bk
    NKV = NH // group
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    b = w // (NKV * n_kt)
    hk = (w // n_kt) % NKV
    k0 = (w % n_kt) * bk
    k1 = min(k0 + bk, Tk)
    nk = k1 - k0
    kt = np.empty((HS, nk), np.float32)  # K tile, transposed
    vt = np.empty((HS, nk), np.float32)  # V tile, transposed
    dk = np.zeros((nk, HS), np.float32)
    dv = np.zeros((nk, HS), np.float32)
    allow = np.empty(nk, np.float32)  # 1 where the key is not padding, else 0
    s = np.empty(nk, np.float32)
    dp = np.empty(nk, np.float32)
    pd = np.empty(nk, np.float32)
    ds = np.empty(nk, np.float32)
    if _tile_has_keys(key_mask, b, k0, k1):
        for jj in range(nk):
            allow[jj] = np.float32(1.0) if key_mask[b, k0 + jj] else np.float32(0.0)
            for d in range(HS):
                kt[d, jj] = kv_buf[b, k0 + jj, k_off + hk * HS + d]
                vt[d, jj] = kv_buf[b, k0 + jj, v_off + hk * HS + d]
        i_first = max(0, k0 - shift) if causal else 0  # earlier queries see none of these keys
        for ih in range(group * Tq):  # query heads of the group in order, then their rows
            h = hk * group + ih // Tq
            i = ih % Tq
            if i < i_first:
                continue
            L = lse[b, h, i]
            if L == -np.inf:
                continue
            j_end = min(nk, i + shift - k0 + 1) if causal else nk
            if j_end <= 0:
                continue
            qrow = q_buf[b, i, q_off + h * HS:q_off + (h + 1) * HS]
            grow = dout[b, i, h * HS:(h + 1) * HS]
            _row_products(s, dp, qrow, grow, kt, vt, j_end, HS)
            Di = delta[b, h, i]
            for jj in range(j_end):
                pd[jj] = _exp2(min((s[jj] * scale - L) * _LOG2E_F, np.float32(0.0))) * allow[jj]  # P, undropped
            if p_drop > 0:  # dV uses P * keep / (1 - p); dP = (dO V^T) * keep / (1 - p)
                base = ((b * NH + h) * Tq + i) * Tk + k0
                for jj in range(j_end):
                    p = pd[jj]
                    if keep(seed, base + jj, p_drop):
                        ds[jj] = p * (dp[jj] * inv_keep - Di) * scale
                        pd[jj] = p * inv_keep
                    else:
                        ds[jj] = -p * Di * scale
                        pd[jj] = np.float32(0.0)
            else:
                for jj in range(j_end):
                    ds[jj] = pd[jj] * (dp[jj] - Di) * scale
            for jj in range(j_end):
                a, c = pd[jj], ds[jj]
                dvr, dkr = dv[jj], dk[jj]
                for d in range(HS):
                    dvr[d] += a * grow[d]
                    dkr[d] += c * qrow[d]
    for jj in range(nk):
        for d in range(HS):
            dkv[b, k0 + jj, k_off + hk * HS + d] = dk[jj, d]
            dkv[b, k0 + jj, v_off + hk * HS + d] = dv[jj, d]


_call_dkdv_item = native_caller(_ITEM_SIG)


@kernel(_BWD_SIG + (I64,), cost=1.2)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _dkdv(dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
          p_drop, seed, bq, bk, group, item_fn):
    # One work item per (b, kv head, key tile), over the `group` query heads of that kv head in
    # increasing order. Per query row i, the scores of the whole key tile are computed in axpy form
    # over the transposed tile (s[:] += q[d] * Kt[d, :]): unit stride, no horizontal reductions, so
    # the loops vectorise.
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq  # bottom-right causal alignment
    n_kt = (Tk + bk - 1) // bk
    NKV = NH // group
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    for w in prange(B * NKV * n_kt):
        _call_dkdv_item(item_fn, (np.int64(w), dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale, p_drop, seed, bq, bk, group))


@kernel(_ITEM_SIG, cost=2.8)
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _dq_item(w, dq, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
        p_drop, seed, bq, bk, group):
    # one work item of _dq (see _ITEM_SIG)
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    n_qt = (Tq + bq - 1) // bq
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    b = w // (NH * n_qt)
    h = (w // n_qt) % NH
    hk = h // group  # the key/value head of query head h
    i0 = (w % n_qt) * bq
    i1 = min(i0 + bq, Tq)
    nq = i1 - i0
    acc = np.zeros((nq, HS), np.float32)
    kt = np.empty((HS, bk), np.float32)
    vt = np.empty((HS, bk), np.float32)
    kr = np.empty((bk, HS), np.float32)
    allow = np.empty(bk, np.float32)
    s = np.empty(bk, np.float32)
    dp = np.empty(bk, np.float32)
    ds = np.empty(bk, np.float32)
    j_stop = min(Tk, i1 + shift) if causal else Tk
    for k0 in range(0, max(j_stop, 0), bk):
        k1 = min(k0 + bk, j_stop)
        nk = k1 - k0
        if not _tile_has_keys(key_mask, b, k0, k1):
            continue
        for jj in range(nk):
            allow[jj] = np.float32(1.0) if key_mask[b, k0 + jj] else np.float32(0.0)
            for d in range(HS):
                x = kv_buf[b, k0 + jj, k_off + hk * HS + d]
                kt[d, jj] = x
                kr[jj, d] = x
                vt[d, jj] = kv_buf[b, k0 + jj, v_off + hk * HS + d]
        for ii in range(nq):
            i = i0 + ii
            L = lse[b, h, i]
            if L == -np.inf:
                continue
            j_end = min(nk, i + shift - k0 + 1) if causal else nk
            if j_end <= 0:
                continue
            qrow = q_buf[b, i, q_off + h * HS:q_off + (h + 1) * HS]
            grow = dout[b, i, h * HS:(h + 1) * HS]
            _row_products(s, dp, qrow, grow, kt, vt, j_end, HS)
            Di = delta[b, h, i]
            if p_drop > 0:
                base = ((b * NH + h) * Tq + i) * Tk + k0
                for jj in range(j_end):
                    dp[jj] = dp[jj] * inv_keep if keep(seed, base + jj, p_drop) else np.float32(0.0)
            for jj in range(j_end):
                p = _exp2(min((s[jj] * scale - L) * _LOG2E_F, np.float32(0.0))) * allow[jj]
                ds[jj] = p * (dp[jj] - Di) * scale
            arow = acc[ii]
            for jj in range(j_end):
                c = ds[jj]
                krow = kr[jj]
                for d in range(HS):
                    arow[d] += c * krow[d]
    for ii in range(nq):
        for d in range(HS):
            dq[b, i0 + ii, q_off + h * HS + d] = acc[ii, d]


_call_dq_item = native_caller(_ITEM_SIG)


@kernel(_BWD_SIG + (I64,), cost=1.5)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _dq(dq, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
        p_drop, seed, bq, bk, group, item_fn):
    # One work item per (b, h, query tile); key tiles transposed as in _dkdv.
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    n_qt = (Tq + bq - 1) // bq
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    for w in prange(B * NH * n_qt):
        _call_dq_item(item_fn, (np.int64(w), dq, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale, p_drop, seed, bq, bk, group))


def attention_backward(dq_buf, dkv_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                       n_heads, head_size, causal, scale, dropout_p=0.0, seed=0, block_q=32, block_k=32,
                       n_kv_heads=None):
    """Gradients of attention_forward.

    dq_buf (shape of q_buf): columns q_off + h*HS written with dQ; dkv_buf (shape of kv_buf):
    columns k_off/v_off + h*HS written with dK/dV. For self-attention on a fused QKV buffer pass
    the same array as dq_buf and dkv_buf: the three column ranges are disjoint. delta (B, NH, Tq)
    is scratch (rowsum(dO * O)). Other arguments as in attention_forward; dropout_p/seed must be
    those of the forward call. n_kv_heads: grouped-query attention as in attention_forward (dK/dV of
    a kv head are the sums over its query heads, in head order).
    """
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
    if key_mask.dtype != np.uint8 or key_mask.shape != (B, Tk):
        raise GraphError(f"attention_backward: key_mask must be uint8 {(B, Tk)}, got {key_mask.dtype}{key_mask.shape}")
    if q_off + C > Wq or max(k_off, v_off) + NKV * HS > Wkv:
        raise GraphError("attention_backward: buffer widths cannot hold the heads at the given offsets")
    if not 0.0 <= dropout_p < 1.0:
        raise GraphError(f"attention_backward: dropout_p must be in [0, 1), got {dropout_p}")
    if B == 0 or Tq == 0 or Tk == 0:
        return
    sc, pd, sd = np.float32(scale), float(dropout_p), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    _delta(delta, out, dout, NH, HS)
    _dkdv(dkv_buf, q_buf, int(q_off), kv_buf, int(k_off), int(v_off), dout, lse, delta, key_mask, NH, HS,
          bool(causal), sc, pd, sd, int(block_q), int(block_k), NH // NKV,
          native_address("attention_backward._dkdv_item"))
    _dq(dq_buf, q_buf, int(q_off), kv_buf, int(k_off), int(v_off), dout, lse, delta, key_mask, NH, HS,
        bool(causal), sc, pd, sd, int(block_q), int(block_k), NH // NKV,
        native_address("attention_backward._dq_item"))
