"""Embedding lookup: token + position + token-type rows summed into the residual stream."""
import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .precompile import BOOL, F2, F3, F32, F64, I64, R2, RI1, RI2, kernel
from ...weights.positions import position_table, sinusoidal_table  # noqa: F401  (host tables, re-exported)


@kernel((F3, RI2, RI2, RI2, R2, R2, R2, F32, BOOL, BOOL), cost=1.3)
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


# ---------------------------------------------------------------- backward
COLS_PER_ITEM = 128  # work item = (distinct id, block of columns): parallel even for tiny tables


@kernel((F2, R2, RI1, RI1, RI1, F64, I64), cost=2.3)
@njit(parallel=True, cache=True)
def _embedding_backward_table(dtab, dout, order, starts, uniq, scale, cb):
    # dtab (V, C) written; dout (N, C); order (N,) positions sorted by id (stable);
    # positions of uniq[k] are order[starts[k]:starts[k+1]], summed in that fixed order
    V, C = dtab.shape
    for r in prange(V):
        for c in range(C):
            dtab[r, c] = 0.0
    nu = uniq.shape[0]
    ncb = (C + cb - 1) // cb
    for item in prange(nu * ncb):
        k = item // ncb
        c0 = (item - k * ncb) * cb
        c1 = min(C, c0 + cb)
        acc = np.zeros(c1 - c0)  # float64
        for s in range(starts[k], starts[k + 1]):
            row = order[s]
            for c in range(c0, c1):
                acc[c - c0] += dout[row, c]
        r = uniq[k]
        for c in range(c0, c1):
            dtab[r, c] = acc[c - c0] * scale


def _check_grad(name, a, ncols):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or a.shape[1] != ncols:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise GraphError(f"embedding_backward: '{name}' is {got}, expected float32 (rows, {ncols})")
    if not a.flags.c_contiguous:
        raise GraphError(f"embedding_backward: '{name}' must be C-contiguous")


def _scatter_rows(dtab, dout2, ids, scale):
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    keys = flat[order]
    if keys.size:
        starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1, [keys.size]))
    else:
        starts = np.zeros(1, np.int64)
    uniq = np.ascontiguousarray(keys[starts[:-1]])
    _embedding_backward_table(dtab, dout2, order, starts.astype(np.int64), uniq, np.float64(scale), COLS_PER_ITEM)


def embedding_backward(dwte, dwpe, dwtt, dout, ids, pos_ids=None, type_ids=None, scale=1.0):
    """Exact adjoint of embedding_forward: dwte (V, C) = scale * scatter-add of dout (..., C) rows by
    ids (...); dwpe by pos_ids, dwtt by type_ids (unscaled). Any table gradient may be None (skipped).
    Written, not accumulated: rows whose id never occurs are zero. Deterministic: each row sums its
    positions in increasing position order, whatever the thread count."""
    if not isinstance(dout, np.ndarray) or dout.dtype != np.float32 or dout.ndim < 1:
        raise GraphError("embedding_backward: 'dout' must be a float32 array (..., C)")
    if not dout.flags.c_contiguous:
        raise GraphError("embedding_backward: 'dout' must be C-contiguous")
    C = dout.shape[-1]
    lead = dout.shape[:-1]
    dout2 = dout.reshape(-1, C)
    # forward scales wte rows by float32(scale); the adjoint uses the same float32 value
    for tab, name, idx, idx_name, s in ((dwte, "dwte", ids, "ids", np.float32(scale)),
                                         (dwpe, "dwpe", pos_ids, "pos_ids", 1.0),
                                         (dwtt, "dwtt", type_ids, "type_ids", 1.0)):
        if tab is None:
            continue
        _check_grad(name, tab, C)
        if idx is None:
            raise GraphError(f"embedding_backward: '{idx_name}' is required when '{name}' is given")
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise GraphError(f"embedding_backward: '{idx_name}' must hold integers, got {idx.dtype}")
        _check_ids(idx_name, idx, lead, tab.shape[0])
        _scatter_rows(tab, dout2, idx, s)
