"""KV-cache kernels on the GPU: append the keys/values of new tokens, and reorder rows for beam
search (CUDA twin of kernels/cpu/kv_cache.py).

A cache is (B, Tmax, 2C) float32: keys in columns [0, C), values in [C, 2C), one row per
decoded position. The qkv buffer of the new tokens is (B, Tq, W) with the keys/values at
[offset, offset + 2C). Everything is checked on the host before a launch.
"""
from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import check_device_array, grid_blocks, is_device_array, launch_threads

TUNABLES = {
    "kv_write": {"threads": 256, "max_blocks": 8192},  # grid-stride over the copied elements
    "reorder_rows": {"threads": 256, "max_blocks": 8192},
}


@kernel(cache=True)
def _kv_write_kernel(cache, qkv, offset, pos):
    # cache (B, Tmax, W2)[:, pos:pos + Tq] <- qkv (B, Tq, W)[:, :, offset:offset + W2]
    B, Tq = qkv.shape[0], qkv.shape[1]
    W2 = cache.shape[2]
    for i in range(cuda.grid(1), B * Tq * W2, cuda.gridsize(1)):
        bt = i // W2
        j = i - bt * W2
        b = bt // Tq
        t = bt - b * Tq
        cache[b, pos + t, j] = qkv[b, t, offset + j]


@kernel(cache=True)
def _copy_prefix_kernel(dst, src, length):
    # dst (B, Tmax, W)[:, :length] = src[:, :length]
    B, W = dst.shape[0], dst.shape[2]
    for i in range(cuda.grid(1), B * length * W, cuda.gridsize(1)):
        bt = i // W
        j = i - bt * W
        b = bt // length
        t = bt - b * length
        dst[b, t, j] = src[b, t, j]


@kernel(cache=True)
def _gather_rows_kernel(dst, src, rows, length):
    # dst (B, Tmax, W)[b, :length] = src[rows[b], :length]
    B, W = dst.shape[0], dst.shape[2]
    for i in range(cuda.grid(1), B * length * W, cuda.gridsize(1)):
        bt = i // W
        j = i - bt * W
        b = bt // length
        t = bt - b * length
        dst[b, t, j] = src[rows[b], t, j]


def kv_write(cache, qkv, offset, pos, *, threads=None, max_blocks=None):
    """Copy the keys/values of Tq new tokens into cache rows [pos, pos + Tq); checked first,
    since a device kernel does no bounds checks."""
    op, tun = "kv_write", TUNABLES["kv_write"]
    check_device_array(op, "cache", cache, ndim=3)
    check_device_array(op, "qkv", qkv, ndim=3)
    B, Tmax, W2 = cache.shape
    Bq, Tq, W = qkv.shape
    pos, offset = int(pos), int(offset)
    if Bq != B or offset < 0 or offset + W2 > W:
        raise GraphError(f"kv_write: qkv {tuple(qkv.shape)} (keys/values at column {offset}) does not fit cache "
                         f"{tuple(cache.shape)}")
    if pos < 0 or pos + Tq > Tmax:
        raise GraphError(f"kv_write: writing {Tq} positions at {pos} overflows the cache of {Tmax} positions")
    t = launch_threads(op, tun, threads)
    n = B * Tq * W2
    if n == 0:
        return
    _kv_write_kernel[grid_blocks(op, tun, n, t, max_blocks), t](cache, qkv, offset, pos)


def reorder_rows(cache, scratch, rows, length, *, threads=None, max_blocks=None):
    """cache[b, :length] = old cache[rows[b], :length] (beam search), through scratch (same shape).

    rows: (B,) int64, a host array or a device array (copied back to be validated on the host:
    B indices in [0, B))."""
    op, tun = "reorder_rows", TUNABLES["reorder_rows"]
    check_device_array(op, "cache", cache, ndim=3)
    check_device_array(op, "scratch", scratch, cache.shape)
    B = cache.shape[0]
    if is_device_array(rows):
        check_device_array(op, "rows", rows, (B,), np.int64)
        rows_dev, rows_host = rows, rows.copy_to_host()
    else:
        rows_host = np.asarray(rows)
        if rows_host.dtype.kind not in "iu":
            raise GraphError(f"reorder_rows: 'rows' must hold integers, got {rows_host.dtype}")
        rows_host = np.ascontiguousarray(rows_host, dtype=np.int64)
        rows_dev = None
    if rows_host.shape != (B,) or (B and (rows_host.min() < 0 or rows_host.max() >= B)):
        raise GraphError(f"reorder_rows: rows must be {B} indices in [0, {B})")
    length = int(length)
    if not 0 <= length <= cache.shape[1]:
        raise GraphError(f"reorder_rows: length {length} outside [0, {cache.shape[1]}]")
    t = launch_threads(op, tun, threads)
    n = B * length * cache.shape[2]
    if n == 0:
        return
    if rows_dev is None:
        rows_dev = cuda.to_device(rows_host)
    g = grid_blocks(op, tun, n, t, max_blocks)
    _copy_prefix_kernel[g, t](scratch, cache, length)
    _gather_rows_kernel[g, t](cache, scratch, rows_dev, length)
