"""Attention for a few query rows against a KV cache (decoding): one work item per (batch, kv head).

The tiled kernel (attention.py) is built for query tiles of hundreds of rows. With Tq = 1 its
per-key loops run over one query each and its tiles' scratch has to be set up per call: a
SmolLM2 step (9 heads, 3 kv heads, ~100 keys) took 48-96 us there for ~0.2 MFLOP. Here an item
takes every query head of one kv head (grouped-query attention shares K/V rows across the group)
and every query row. K is first copied transposed, K^T (HS, Tk), so that the scores of a query
row are HS rank-1 updates along the keys (contiguous: vectorised); then the probability-weighted
sum of the V rows (each V row read once for the whole group). Scratch per item: K^T (HS, Tk),
scores (R, Tk) and the accumulator (R, HS), R = group * Tq. From Tq ~ 8 on the tiled kernel is
faster (B=64, 12 heads, T=21: 1.4 ms tiled vs 4.7 ms here), hence MAX_QUERIES.

Softmax in log2 units with the same exp2 as the tiled kernel; the max over all visible keys is
taken before any exponent (no running rescale), so the result agrees with the tiled kernel to
rounding, not bit for bit. Items own disjoint outputs: bits do not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from nbformer.kernels.cpu.attention import _FASTMATH, _LN2, _LOG2E, _NEG_INF, _ZERO, _exp2
from nbformer.kernels.cpu.precompile import BOOL, F3, F64, I64, R3, RU2, kernel, native_caller

MAX_QUERIES = 4  # the launcher routes Tq <= this (and no dropout) here


_SIG = (F3, F3, R3, I64, R3, I64, I64, I64, RU2, I64, I64, BOOL, F64, I64)
# (out, lse, q_buf, q_off, kv_buf, k_off, v_off, Tk, key_mask, NH, HS, causal, scale, group)
_ITEM_SIG = (I64,) + _SIG


# The work item is its own cached kernel, called by the parallel loop through its native address
# (precompile.native_caller) instead of being linked into it: one parallel function with this body
# took 4.3 CPU s to compile (parfor lowering and the gufunc), the longest of a cold `generate` after
# the linear layer's; the item alone is compiled once, in parallel with the loop around it.
@kernel(_ITEM_SIG, cost=2.5)
@njit(cache=True, fastmath=_FASTMATH)
def _decode_item(item, out, lse, q_buf, q_off, kv_buf, k_off, v_off, Tk, key_mask, NH, HS, causal, scale, group):
    # one (batch, kv head): every query head of its group and every query row
    Tq = q_buf.shape[1]
    NKV = NH // group
    R = group * Tq  # query rows of one item: r = g_local * Tq + i
    shift = Tk - Tq  # causal: query i sees key j iff j <= i + shift
    qscale = np.float32(scale * _LOG2E)
    b = item // NKV
    hk = item - b * NKV
    kc = k_off + hk * HS
    vc = v_off + hk * HS
    # K^T (HS, Tk) of this kv head: the score loops then run along the keys (contiguous, vectorised)
    kt = np.empty((HS, Tk), np.float32)
    for j in range(Tk):
        krow = kv_buf[b, j, kc:kc + HS]
        for d in range(HS):
            kt[d, j] = krow[d]
    sc = np.empty((R, Tk), np.float32)
    mx = np.empty(R, np.float32)
    l = np.zeros(R, np.float32)
    for r in range(R):
        h = hk * group + r // Tq
        i = r % Tq
        qrow = q_buf[b, i, q_off + h * HS:q_off + (h + 1) * HS]
        srow = sc[r]
        for j in range(Tk):
            srow[j] = _ZERO
        for d in range(HS):
            qd = qrow[d] * qscale
            ktd = kt[d]
            for j in range(Tk):
                srow[j] += qd * ktd[j]
        m = _NEG_INF
        j_end = min(Tk, i + shift + 1) if causal else Tk  # causal: keys after i + shift are hidden
        for j in range(Tk):
            if key_mask[b, j] == 0 or j >= j_end:
                srow[j] = _NEG_INF
            m = max(m, srow[j])
        mx[r] = m
        mu = m if m != _NEG_INF else _ZERO  # no visible key: every p is 0
        t = _ZERO
        for j in range(Tk):
            p = _exp2(srow[j] - mu)
            srow[j] = p
            t += p
        l[r] = t
    acc = np.zeros((R, HS), np.float32)
    for j in range(Tk):
        if key_mask[b, j] == 0:
            continue
        vrow = kv_buf[b, j, vc:vc + HS]
        for r in range(R):
            p = sc[r, j]
            if p != _ZERO:
                arow = acc[r]
                for d in range(HS):
                    arow[d] += p * vrow[d]
    for r in range(R):
        h = hk * group + r // Tq
        i = r % Tq
        orow = out[b, i, h * HS:(h + 1) * HS]
        if l[r] != _ZERO:
            inv = np.float32(1.0) / l[r]
            for d in range(HS):
                orow[d] = acc[r, d] * inv
            lse[b, h, i] = np.float32((np.float64(mx[r]) + math.log2(np.float64(l[r]))) * _LN2)
        else:
            for d in range(HS):
                orow[d] = _ZERO
            lse[b, h, i] = _NEG_INF


_call_item = native_caller(_ITEM_SIG)


@kernel(_SIG + (I64,), cost=1.0)
@njit(parallel=True, cache=True)
def _attention_decode(out, lse, q_buf, q_off, kv_buf, k_off, v_off, Tk, key_mask, NH, HS, causal, scale, group,
                      item_fn):
    # out (B, Tq, NH*HS); lse (B, NH, Tq); q_buf (B, Tq, Wq); kv_buf (B, >= Tk, Wkv) C-contiguous (a whole
    # KV cache: its first Tk rows are attended, so the rows are contiguous and the dots vectorise);
    # key_mask (B, >= Tk); item_fn: native_address("attention_decode._decode_item")
    B = q_buf.shape[0]
    for item in prange(B * (NH // group)):
        _call_item(item_fn, (np.int64(item), out, lse, q_buf, q_off, kv_buf, k_off, v_off, Tk, key_mask, NH, HS,
                             causal, scale, group))
