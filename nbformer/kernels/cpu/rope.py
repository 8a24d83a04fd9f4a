"""Rotary position embeddings (RoPE), in place on the query and key columns of a fused qkv buffer.

Layout (Hugging Face "rotate half"): within each head of HS columns, dimension i pairs with
i + HS/2 and the pair is rotated by angle pos * inv_freq[i]:
    x'[i]        = x[i] cos - x[i + HS/2] sin
    x'[i + HS/2] = x[i + HS/2] cos + x[i] sin
The rotation is orthogonal, so the backward pass is the same kernel with the angle negated.

qkv (B, T, W) holds NH query heads at columns [0, NH*HS) and NKV key heads right after them at
[NH*HS, (NH + NKV)*HS) (the value heads that follow are left alone). Angles and the products are
computed in float64 and rounded once; rows are independent, so results do not depend on the thread
count.
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .precompile import F3, F64, I64, RI2, array, kernel

_RD1 = array(F64, 1, readonly=True)  # inv_freq: float64 (HS/2,)


@njit(inline="always")
def _rope_row(qkv, pos_ids, inv_freq, n_rot, HS, sign, bt):
    T = qkv.shape[1]
    half = HS // 2
    b = bt // T
    t = bt - b * T
    row = qkv[b, t]
    p = np.float64(pos_ids[b, t])
    for i in range(half):
        ang = p * inv_freq[i]
        c = math.cos(ang)
        s = sign * math.sin(ang)
        for h in range(n_rot):
            j = h * HS + i
            x1 = np.float64(row[j])
            x2 = np.float64(row[j + half])
            row[j] = np.float32(x1 * c - x2 * s)
            row[j + half] = np.float32(x2 * c + x1 * s)


@kernel((F3, RI2, _RD1, I64, I64, F64), cost=1.0)
@njit(parallel=True, cache=True, nogil=True)
def _rope(qkv, pos_ids, inv_freq, n_rot, HS, sign):
    # qkv (B, T, W): heads 0 .. n_rot-1 of HS columns from column 0 rotated in place
    for bt in prange(qkv.shape[0] * qkv.shape[1]):
        _rope_row(qkv, pos_ids, inv_freq, n_rot, HS, sign, bt)


@kernel((F3, RI2, _RD1, I64, I64, F64), cost=0.5)
@njit(cache=True, nogil=True)
def _rope_serial(qkv, pos_ids, inv_freq, n_rot, HS, sign):
    # the same rows on the calling thread, for a few positions (decoding: starting the pool cost more)
    for bt in range(qkv.shape[0] * qkv.shape[1]):
        _rope_row(qkv, pos_ids, inv_freq, n_rot, HS, sign, bt)


SERIAL_MAX_ROWS = 8  # (batch x position) rows from which the pool is used


def _launch(op, qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, sign):
    NH, NKV, HS = int(n_heads), int(n_kv_heads), int(head_size)
    if NH < 1 or NKV < 1 or HS < 2 or HS % 2:
        raise GraphError(f"{op}: need n_heads, n_kv_heads >= 1 and an even head_size >= 2, got {NH}, {NKV}, {HS}")
    if not isinstance(qkv, np.ndarray) or qkv.dtype != np.float32 or qkv.ndim != 3:
        raise GraphError(f"{op}: 'qkv' must be a 3-d float32 array (B, T, W)")
    if not (qkv.flags.writeable and qkv.strides[2] == 4):
        raise GraphError(f"{op}: 'qkv' must be writeable with unit stride along its last axis")
    B, T, W = qkv.shape
    if (NH + NKV) * HS > W:
        raise GraphError(f"{op}: qkv width {W} cannot hold {NH} query + {NKV} key heads of {HS}")
    pos = np.asarray(pos_ids)
    if pos.shape != (B, T) or pos.dtype.kind not in "iu":
        raise GraphError(f"{op}: 'pos_ids' must be integers of shape {(B, T)}, got {pos.dtype}{pos.shape}")
    inv = np.ascontiguousarray(inv_freq, dtype=np.float64)
    if inv.shape != (HS // 2,):
        raise GraphError(f"{op}: 'inv_freq' must have {HS // 2} entries (head_size / 2), got {inv.shape}")
    if B == 0 or T == 0:
        return
    fn = _rope_serial if B * T <= SERIAL_MAX_ROWS else _rope
    fn(qkv, np.ascontiguousarray(pos, dtype=np.int64), inv, NH + NKV, HS, float(sign))


def rope_forward(qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size):
    """Rotate the NH query and NKV key heads of qkv (B, T, W) in place by pos_ids (B, T) * inv_freq (HS/2,)."""
    _launch("rope_forward", qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, 1.0)


def rope_backward(dqkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size):
    """Adjoint of rope_forward, in place on the gradient dqkv (B, T, W): the rotation by -angle
    (value columns pass through untouched)."""
    _launch("rope_backward", dqkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, -1.0)
