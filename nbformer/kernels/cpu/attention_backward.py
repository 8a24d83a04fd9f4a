"""Attention backward on the CPU, FlashAttention-2 style, deterministic.

Probabilities are recomputed from the saved logsumexp (P = exp(scale * q.k - lse)), with
D = rowsum(dO * O). Two passes, so that no two threads ever add into the same row:
  pass 1, one work item per (batch, head, key tile):   dK, dV
  pass 2, one work item per (batch, head, query tile): dQ
Scratch per work item is O(tile * head_size); nothing grows with T^2. Causal tiles entirely
above the diagonal and key tiles whose keys are all padding are skipped.

Attention dropout: the kept probability of (b, h, i, j) is keep(seed, ((b*NH + h)*Tq + i)*Tk + j)
with scale 1/(1-p), the same counter the forward uses, so the mask is regenerated, not stored.
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .rng import keep

_FM = {"contract", "reassoc", "nsz", "arcp"}  # no nnan/ninf: lse can be -inf for empty rows


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


@njit(parallel=True, cache=True, fastmath=_FM)
def _dkdv(dkv, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
          p_drop, seed, bq, bk):
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq  # bottom-right causal alignment
    n_kt = (Tk + bk - 1) // bk
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    for w in prange(B * NH * n_kt):
        b = w // (NH * n_kt)
        h = (w // n_kt) % NH
        k0 = (w % n_kt) * bk
        k1 = min(k0 + bk, Tk)
        nk = k1 - k0
        kt = np.empty((nk, HS), np.float32)
        vt = np.empty((nk, HS), np.float32)
        dk = np.zeros((nk, HS), np.float32)
        dv = np.zeros((nk, HS), np.float32)
        qi = np.empty(HS, np.float32)
        gi = np.empty(HS, np.float32)
        if _tile_has_keys(key_mask, b, k0, k1):
            for jj in range(nk):
                for d in range(HS):
                    kt[jj, d] = kv_buf[b, k0 + jj, k_off + h * HS + d]
                    vt[jj, d] = kv_buf[b, k0 + jj, v_off + h * HS + d]
            i_first = 0
            if causal:
                i_first = max(0, k0 - shift)  # earlier queries see none of these keys
            for i in range(i_first, Tq):
                L = lse[b, h, i]
                if L == -np.inf:
                    continue
                for d in range(HS):
                    qi[d] = q_buf[b, i, q_off + h * HS + d]
                    gi[d] = dout[b, i, h * HS + d]
                Di = delta[b, h, i]
                j_end = min(nk, i + shift - k0 + 1) if causal else nk
                for jj in range(j_end):
                    if not key_mask[b, k0 + jj]:
                        continue
                    s = np.float32(0.0)
                    dp = np.float32(0.0)
                    for d in range(HS):
                        s += qi[d] * kt[jj, d]
                        dp += gi[d] * vt[jj, d]
                    p = np.float32(math.exp(s * scale - L))
                    pd = p
                    if p_drop > 0:
                        c = ((b * NH + h) * Tq + i) * Tk + k0 + jj
                        if keep(seed, c, p_drop):
                            pd = p * inv_keep
                            dp = dp * inv_keep
                        else:
                            pd = np.float32(0.0)
                            dp = np.float32(0.0)
                    ds = p * (dp - Di) * scale
                    for d in range(HS):
                        dv[jj, d] += pd * gi[d]
                        dk[jj, d] += ds * qi[d]
        for jj in range(nk):
            for d in range(HS):
                dkv[b, k0 + jj, k_off + h * HS + d] = dk[jj, d]
                dkv[b, k0 + jj, v_off + h * HS + d] = dv[jj, d]


@njit(parallel=True, cache=True, fastmath=_FM)
def _dq(dq, q_buf, q_off, kv_buf, k_off, v_off, dout, lse, delta, key_mask, NH, HS, causal, scale,
        p_drop, seed, bq, bk):
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1]
    shift = Tk - Tq
    n_qt = (Tq + bq - 1) // bq
    inv_keep = np.float32(1.0 / (1.0 - p_drop)) if p_drop > 0 else np.float32(1.0)
    for w in prange(B * NH * n_qt):
        b = w // (NH * n_qt)
        h = (w // n_qt) % NH
        i0 = (w % n_qt) * bq
        i1 = min(i0 + bq, Tq)
        nq = i1 - i0
        qt = np.empty((nq, HS), np.float32)
        gt = np.empty((nq, HS), np.float32)
        acc = np.zeros((nq, HS), np.float32)
        kj = np.empty(HS, np.float32)
        vj = np.empty(HS, np.float32)
        for ii in range(nq):
            for d in range(HS):
                qt[ii, d] = q_buf[b, i0 + ii, q_off + h * HS + d]
                gt[ii, d] = dout[b, i0 + ii, h * HS + d]
        j_stop = min(Tk, i1 - 1 + shift + 1) if causal else Tk
        for k0 in range(0, j_stop, bk):
            k1 = min(k0 + bk, j_stop)
            if not _tile_has_keys(key_mask, b, k0, k1):
                continue
            for j in range(k0, k1):
                if not key_mask[b, j]:
                    continue
                for d in range(HS):
                    kj[d] = kv_buf[b, j, k_off + h * HS + d]
                    vj[d] = kv_buf[b, j, v_off + h * HS + d]
                for ii in range(nq):
                    i = i0 + ii
                    if causal and j > i + shift:
                        continue
                    L = lse[b, h, i]
                    if L == -np.inf:
                        continue
                    s = np.float32(0.0)
                    dp = np.float32(0.0)
                    for d in range(HS):
                        s += qt[ii, d] * kj[d]
                        dp += gt[ii, d] * vj[d]
                    p = np.float32(math.exp(s * scale - L))
                    if p_drop > 0:
                        c = ((b * NH + h) * Tq + i) * Tk + j
                        dp = dp * inv_keep if keep(seed, c, p_drop) else np.float32(0.0)
                    ds = p * (dp - delta[b, h, i]) * scale
                    for d in range(HS):
                        acc[ii, d] += ds * kj[d]
        for ii in range(nq):
            for d in range(HS):
                dq[b, i0 + ii, q_off + h * HS + d] = acc[ii, d]


def attention_backward(dq_buf, dkv_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                       n_heads, head_size, causal, scale, dropout_p=0.0, seed=0, block_q=32, block_k=32):
    """Gradients of attention_forward.

    dq_buf (shape of q_buf): columns q_off + h*HS written with dQ; dkv_buf (shape of kv_buf):
    columns k_off/v_off + h*HS written with dK/dV. For self-attention on a fused QKV buffer pass
    the same array as dq_buf and dkv_buf: the three column ranges are disjoint. delta (B, NH, Tq)
    is scratch (rowsum(dO * O)). Other arguments as in attention_forward; dropout_p/seed must be
    those of the forward call.
    """
    NH, HS = int(n_heads), int(head_size)
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
    if q_off + C > Wq or max(k_off, v_off) + C > Wkv:
        raise GraphError("attention_backward: buffer widths cannot hold the heads at the given offsets")
    if not 0.0 <= dropout_p < 1.0:
        raise GraphError(f"attention_backward: dropout_p must be in [0, 1), got {dropout_p}")
    if B == 0 or Tq == 0 or Tk == 0:
        return
    sc, pd, sd = np.float32(scale), float(dropout_p), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    _delta(delta, out, dout, NH, HS)
    _dkdv(dkv_buf, q_buf, int(q_off), kv_buf, int(k_off), int(v_off), dout, lse, delta, key_mask, NH, HS,
          bool(causal), sc, pd, sd, int(block_q), int(block_k))
    _dq(dq_buf, q_buf, int(q_off), kv_buf, int(k_off), int(v_off), dout, lse, delta, key_mask, NH, HS,
        bool(causal), sc, pd, sd, int(block_q), int(block_k))
