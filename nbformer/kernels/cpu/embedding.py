"""Embedding lookup: token + position + token-type rows summed into the residual stream."""
import numpy as np
from numba import njit, prange

from ...errors import GraphError


@njit(parallel=True, cache=True)
def _embedding_forward(out, ids, pos_ids, type_ids, wte, wpe, wtt, scale, use_pos, use_type):
    # out (B, T, C); ids/pos_ids/type_ids (B, T) int64, already range-checked by the launcher
    B, T, C = out.shape
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        tok = ids[b, t]
        for c in range(C):
            out[b, t, c] = wte[tok, c] * scale
        if use_pos:
            p = pos_ids[b, t]
            for c in range(C):
                out[b, t, c] += wpe[p, c]
        if use_type:
            y = type_ids[b, t]
            for c in range(C):
                out[b, t, c] += wtt[y, c]


def _check_ids(name, ids, shape, limit):
    if ids.shape != shape:
        raise GraphError(f"embedding: '{name}' has shape {ids.shape}, expected {shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        raise GraphError(f"embedding: '{name}' holds values outside [0, {limit})")


def embedding_forward(out, ids, wte, pos_ids=None, wpe=None, type_ids=None, wtt=None, scale=1.0):
    """out (B, T, C) = scale * wte[ids] + wpe[pos_ids] + wtt[type_ids] (missing tables skipped)."""
    B, T, C = out.shape
    _check_ids("ids", ids, (B, T), wte.shape[0])
    use_pos, use_type = wpe is not None, wtt is not None
    if use_pos:
        _check_ids("pos_ids", pos_ids, (B, T), wpe.shape[0])
    else:
        pos_ids, wpe = ids, wte
    if use_type:
        _check_ids("type_ids", type_ids, (B, T), wtt.shape[0])
    else:
        type_ids, wtt = ids, wte
    _embedding_forward(out, ids, pos_ids, type_ids, wte, wpe, wtt, np.float32(scale), use_pos, use_type)


def sinusoidal_table(n_pos: int, C: int) -> np.ndarray:
    """(n_pos, C) float32: PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(same)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    i2 = np.arange(0, C, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, i2 / C)
    pe = np.empty((n_pos, C), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe.astype(np.float32)
