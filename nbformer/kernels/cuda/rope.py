"""Rotary position embeddings (RoPE) on the GPU, in place on the query and key columns of a fused
qkv buffer (CUDA twin of kernels/cpu/rope.py: same layout, same launchers).

Layout (Hugging Face "rotate half"): within each head of HS columns, dimension i pairs with
i + HS/2 and the pair is rotated by angle pos * inv_freq[i]:
    x'[i]        = x[i] cos - x[i + HS/2] sin
    x'[i + HS/2] = x[i + HS/2] cos + x[i] sin
The backward pass is the same kernel with the angle negated (the rotation is orthogonal).

qkv (B, T, W) holds NH query heads at columns [0, NH*HS) and NKV key heads right after them
(the value heads that follow are left alone). One thread per (row, pair, head) (grid-stride):
the angle, its cosine and sine and the products in float64, rounded once, like the CPU; every
element is written by exactly one thread, so results are the same on every run.

inv_freq is a host float64 (HS/2,) array (a graph attribute): uploaded once per distinct table
and kept (a few hundred bytes each); a float64 device array is used as it is. pos_ids: a (B, T)
int64 device array (host integers are uploaded per call).
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import check_device_array, grid_blocks, is_device_array, launch_threads

TUNABLES = {"rope_forward": {"threads": 256, "max_blocks": 8192},
            "rope_backward": {"threads": 256, "max_blocks": 8192}}
BIT_CHANGING = {"rope_forward": {"threads": False, "max_blocks": False},
                "rope_backward": {"threads": False, "max_blocks": False}}


@kernel(cache=True)
def _rope_kernel(qkv, pos_ids, inv_freq, n_rot, HS, sign):
    # qkv (N, W); pos_ids (N,) int64; inv_freq (HS/2,) float64; heads 0 .. n_rot-1 rotated in place
    N = qkv.shape[0]
    half = HS // 2
    per_row = half * n_rot
    for e in range(cuda.grid(1), N * per_row, cuda.gridsize(1)):
        r = e // per_row
        rem = e - r * per_row
        i = rem // n_rot
        h = rem - i * n_rot
        ang = float64(pos_ids[r]) * inv_freq[i]
        c = math.cos(ang)
        s = sign * math.sin(ang)
        j = h * HS + i
        x1 = float64(qkv[r, j])
        x2 = float64(qkv[r, j + half])
        qkv[r, j] = float32(x1 * c - x2 * s)
        qkv[r, j + half] = float32(x2 * c + x1 * s)


_INV_FREQ: dict = {}  # bytes of a host table -> its device copy (one per model config)


def _inv_freq_device(op, inv_freq, half):
    if is_device_array(inv_freq):
        check_device_array(op, "inv_freq", inv_freq, (half,), np.float64)
        return inv_freq
    inv = np.ascontiguousarray(inv_freq, dtype=np.float64)
    if inv.shape != (half,):
        raise GraphError(f"{op}: 'inv_freq' must have {half} entries (head_size / 2), got {inv.shape}")
    key = inv.tobytes()
    d = _INV_FREQ.get(key)
    if d is None:
        d = _INV_FREQ[key] = cuda.to_device(inv)
    return d


def _launch(op, qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, sign, threads, max_blocks):
    NH, NKV, HS = int(n_heads), int(n_kv_heads), int(head_size)
    if NH < 1 or NKV < 1 or HS < 2 or HS % 2:
        raise GraphError(f"{op}: need n_heads, n_kv_heads >= 1 and an even head_size >= 2, got {NH}, {NKV}, {HS}")
    check_device_array(op, "qkv" if sign > 0 else "dqkv", qkv, ndim=3)
    B, T, W = (int(s) for s in qkv.shape)
    if (NH + NKV) * HS > W:
        raise GraphError(f"{op}: qkv width {W} cannot hold {NH} query + {NKV} key heads of {HS}")
    if is_device_array(pos_ids):
        check_device_array(op, "pos_ids", pos_ids, (B, T), np.int64)
        pos = pos_ids
    else:
        p = np.asarray(pos_ids)
        if p.shape != (B, T) or p.dtype.kind not in "iu":
            raise GraphError(f"{op}: 'pos_ids' must be integers of shape {(B, T)}, got {p.dtype}{p.shape}")
        pos = cuda.to_device(np.ascontiguousarray(p, dtype=np.int64))
    inv = _inv_freq_device(op, inv_freq, HS // 2)
    tun = TUNABLES[op]
    t = launch_threads(op, tun, threads)
    n = B * T * (HS // 2) * (NH + NKV)
    if n == 0:
        return
    _rope_kernel[grid_blocks(op, tun, n, t, max_blocks), t](qkv.reshape(B * T, W), pos.reshape(B * T), inv,
                                                            NH + NKV, HS, float(sign))


def rope_forward(qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, *, threads=None, max_blocks=None):
    """Rotate the NH query and NKV key heads of qkv (B, T, W) in place by pos_ids (B, T) * inv_freq (HS/2,).

    qkv: a float32 C-contiguous device array. Asynchronous: launched on the default stream."""
    _launch("rope_forward", qkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, 1.0, threads, max_blocks)


def rope_backward(dqkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, *, threads=None, max_blocks=None):
    """Adjoint of rope_forward, in place on the gradient dqkv (B, T, W): the rotation by -angle
    (value columns pass through untouched)."""
    _launch("rope_backward", dqkv, pos_ids, inv_freq, n_heads, n_kv_heads, head_size, -1.0, threads, max_blocks)
