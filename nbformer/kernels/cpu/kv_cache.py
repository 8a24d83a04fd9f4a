"""KV-cache kernels: append the keys/values of new tokens, and reorder rows for beam search.

A cache is (B, Tmax, 2C) float32: keys in columns [0, C), values in [C, 2C), one row per
decoded position. The qkv buffer of the new tokens is (B, Tq, 3C) with K, V at [C, 3C).
"""
import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .precompile import F3, I64, R3, RI1, kernel


@njit(inline="always")
def _kv_write_row(cache, qkv, offset, pos, bt):
    Tq = qkv.shape[1]
    b, t = bt // Tq, bt % Tq
    dst = cache[b, pos + t]
    src = qkv[b, t]
    for j in range(cache.shape[2]):
        dst[j] = src[offset + j]


@kernel((F3, R3, I64, I64), cost=1.0)
@njit(parallel=True, cache=True, nogil=True)
def _kv_write(cache, qkv, offset, pos):
    # cache (B, Tmax, 2C) <- qkv (B, Tq, W)[:, :, offset:offset + 2C] at rows [pos, pos + Tq)
    for bt in prange(qkv.shape[0] * qkv.shape[1]):
        _kv_write_row(cache, qkv, offset, pos, bt)


@kernel((F3, R3, I64, I64), cost=0.5)
@njit(cache=True, nogil=True)
def _kv_write_serial(cache, qkv, offset, pos):
    # the same copy on the calling thread: one decoded token's row is ~1.5K floats per layer
    for bt in range(qkv.shape[0] * qkv.shape[1]):
        _kv_write_row(cache, qkv, offset, pos, bt)


SERIAL_MAX_FLOATS = 65536  # copies of fewer floats than this run on the calling thread


def kv_write(cache, qkv, offset, pos):
    """Copy the keys/values of Tq new tokens into cache rows [pos, pos + Tq); checked first,
    since Numba does no bounds checks."""
    B, Tmax, W2 = cache.shape
    Bq, Tq, W = qkv.shape
    pos, offset = int(pos), int(offset)
    if Bq != B or offset < 0 or offset + W2 > W:
        raise GraphError(f"kv_write: qkv {qkv.shape} (keys/values at column {offset}) does not fit cache "
                         f"{cache.shape}")
    if pos < 0 or pos + Tq > Tmax:
        raise GraphError(f"kv_write: writing {Tq} positions at {pos} overflows the cache of {Tmax} positions")
    fn = _kv_write_serial if B * Tq * W2 <= SERIAL_MAX_FLOATS else _kv_write
    fn(cache, qkv, offset, pos)


@kernel((F3, R3, RI1, I64), cost=1.3)
@njit(parallel=True, cache=True, nogil=True)
def _gather_rows(dst, src, rows, length):
    # dst (B, Tmax, W)[b, :length] = src[rows[b], :length]
    B, W = dst.shape[0], dst.shape[2]
    for bt in prange(B * length):
        b, t = bt // length, bt % length
        d = dst[b, t]
        s = src[rows[b], t]
        for j in range(W):
            d[j] = s[j]


def reorder_rows(cache, scratch, rows, length):
    """cache[b, :length] = old cache[rows[b], :length] (beam search), through scratch (same shape)."""
    B = cache.shape[0]
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.shape != (B,) or (B and (rows.min() < 0 or rows.max() >= B)):
        raise GraphError(f"reorder_rows: rows must be {B} indices in [0, {B})")
    length = int(length)
    if not 0 <= length <= cache.shape[1]:
        raise GraphError(f"reorder_rows: length {length} outside [0, {cache.shape[1]}]")
    if length == 0:
        return
    scratch[:, :length] = cache[:, :length]
    _gather_rows(cache, scratch, rows, length)
