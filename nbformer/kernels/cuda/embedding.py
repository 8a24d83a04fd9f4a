"""Embedding lookup on the GPU: token + position + token-type rows summed into the residual stream,
and its backward, the deterministic scatter-add into the table gradients (CUDA twin of
kernels/cpu/embedding.py, same launchers and argument order).

Forward: the launcher checks shapes, dtypes and contiguity only: the ids arrive on the device already
range-checked on the host by the model (checking their values here would need a copy back).

Backward: the plan is made on the host, like the CPU's: a stable sort of the flat ids, the distinct
ids and the start of each one's run. The ids may be host integer arrays (used as they are) or
int64 device arrays (copied back: B*T int64, small next to dout); either way their values are
range-checked there, naming the argument. The plan travels in one upload. Then two kernels per
table: one zeroes the whole table (written, not accumulated: rows whose id never occurs are 0,
like the CPU), one thread per (distinct id, column) sums that id's dout rows in increasing
position order in float64 and writes the row. That is the CPU's order and arithmetic, so the
gradients are bit-identical to the CPU's, on every run and any grid; no atomics.
"""
from __future__ import annotations

import numpy as np

from numba import float64

from ...errors import GraphError
from ._jit import SIMULATOR, cuda, kernel
from .elementwise import check_device_array, grid_blocks, is_device_array, launch_threads

TUNABLES = {
    "embedding_forward": {"threads": 256, "max_blocks": 8192},
    # both backward kernels (grid-stride; the bits never depend on them); smaller under the simulator
    "embedding_backward": {"threads": 64 if SIMULATOR else 256, "max_blocks": 8192},
}


@kernel(cache=True)
def _embedding_kernel(out, ids, pos_ids, type_ids, wte, wpe, wtt, scale, use_pos, use_type):
    # out (N, C); ids/pos_ids/type_ids (N,) int64; one thread per output element (grid-stride).
    # Same float32 operations in the same order as the CPU: wte * scale, + wpe, + wtt.
    N, C = out.shape
    for i in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        r = i // C
        c = i - r * C
        v = wte[ids[r], c] * scale
        if use_pos:
            v += wpe[pos_ids[r], c]
        if use_type:
            v += wtt[type_ids[r], c]
        out[r, c] = v


def _check_table(name, tab, C):
    check_device_array("embedding", name, tab, ndim=2)
    if tab.shape[1] != C:
        raise GraphError(f"embedding: '{name}' has shape {tuple(tab.shape)}, expected (rows, {C})")


def embedding_forward(out, ids, wte, pos_ids=None, wpe=None, type_ids=None, wtt=None, scale=1.0, *,
                      threads=None, max_blocks=None):
    """out (B, T, C) = scale * wte[ids] + wpe[pos_ids] + wtt[type_ids] (missing tables skipped).

    All arguments are device arrays: out and the tables float32, the id arrays (B, T) int64, all
    C-contiguous. Only shapes and dtypes are checked: id values must already lie in range."""
    op, tun = "embedding", TUNABLES["embedding_forward"]
    check_device_array(op, "out", out, ndim=3)
    B, T, C = out.shape
    check_device_array(op, "ids", ids, (B, T), np.int64)
    _check_table("wte", wte, C)
    use_pos, use_type = wpe is not None, wtt is not None
    if use_pos:
        if pos_ids is None:
            raise GraphError("embedding: 'pos_ids' is required when 'wpe' is given")
        check_device_array(op, "pos_ids", pos_ids, (B, T), np.int64)
        _check_table("wpe", wpe, C)
    else:
        pos_ids, wpe = ids, wte
    if use_type:
        if type_ids is None:
            raise GraphError("embedding: 'type_ids' is required when 'wtt' is given")
        check_device_array(op, "type_ids", type_ids, (B, T), np.int64)
        _check_table("wtt", wtt, C)
    else:
        type_ids, wtt = ids, wte
    t = launch_threads(op, tun, threads)
    N = B * T
    if N * C == 0:
        return
    _embedding_kernel[grid_blocks(op, tun, N * C, t, max_blocks), t](
        out.reshape(N, C), ids.reshape(N), pos_ids.reshape(N), type_ids.reshape(N), wte, wpe, wtt,
        np.float32(scale), use_pos, use_type)


# ---------------------------------------------------------------- backward
@kernel(cache=True)
def _zero_table_kernel(dtab):
    # dtab (V, C): every element 0
    V, C = dtab.shape
    for e in range(cuda.grid(1), V * C, cuda.gridsize(1)):
        r = e // C
        dtab[r, e - r * C] = 0.0


@kernel(cache=True)
def _scatter_rows_kernel(dtab, dout, order, starts, uniq, scale):
    # dtab (V, C), zeroed first; dout (N, C); order (N,) positions sorted by id (stable);
    # positions of uniq[k] are order[starts[k]:starts[k+1]], summed in that fixed order in float64.
    # Work item (k, c), consecutive threads on consecutive columns (coalesced dout reads).
    C = dtab.shape[1]
    nu = uniq.shape[0]
    for e in range(cuda.grid(1), nu * C, cuda.gridsize(1)):
        k = e // C
        c = e - k * C
        acc = float64(0.0)
        for s in range(starts[k], starts[k + 1]):
            acc += dout[order[s], c]
        dtab[uniq[k], c] = acc * scale


def _host_ids(name, ids, lead, limit):
    """ids (host integers, or an int64 device array copied back) -> flat int64 host ids, range-checked."""
    if is_device_array(ids):
        check_device_array("embedding_backward", name, ids, dtype=np.int64)
        ids = ids.copy_to_host()
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise GraphError(f"embedding_backward: '{name}' must hold integers, got {ids.dtype}")
    if tuple(ids.shape) != tuple(lead):
        raise GraphError(f"embedding: '{name}' has shape {tuple(ids.shape)}, expected {tuple(lead)}")
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= limit):
        raise GraphError(f"embedding: '{name}' holds values outside [0, {limit})")
    return flat


def _plan(flat):
    """(order, starts, uniq) as slices of one uploaded int64 array: the CPU's sorted plan."""
    order = np.argsort(flat, kind="stable")
    keys = flat[order]
    if keys.size:
        starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1, [keys.size]))
    else:
        starts = np.zeros(1, np.int64)
    uniq = keys[starts[:-1]]
    N, nu = order.size, uniq.size
    d = cuda.to_device(np.concatenate((order, starts, uniq)).astype(np.int64))
    return d[:N], d[N:N + nu + 1], d[N + nu + 1:], nu


def embedding_backward(dwte, dwpe, dwtt, dout, ids, pos_ids=None, type_ids=None, scale=1.0, *,
                       threads=None, max_blocks=None):
    """Exact adjoint of embedding_forward: dwte (V, C) = scale * scatter-add of dout (..., C) rows by
    ids (...); dwpe by pos_ids, dwtt by type_ids (unscaled). Any table gradient may be None (skipped).
    Written, not accumulated: rows whose id never occurs are zero. Deterministic and bit-identical
    to the CPU: each row sums its positions in increasing position order in float64.

    dout and the table gradients: float32 C-contiguous device arrays. The id arrays: host integer
    arrays or int64 device arrays (copied back for the host plan); their values are checked."""
    op, tun = "embedding_backward", TUNABLES["embedding_backward"]
    check_device_array(op, "dout", dout)
    if len(dout.shape) < 1:
        raise GraphError("embedding_backward: 'dout' must be a float32 array (..., C)")
    C = tuple(dout.shape)[-1]
    lead = tuple(dout.shape)[:-1]
    N = int(np.prod(lead, dtype=np.int64))
    t = launch_threads(op, tun, threads)
    dout2 = dout.reshape(N, C)
    # forward scales wte rows by float32(scale); the adjoint uses the same float32 value (in float64)
    for tab, name, idx, idx_name, s in ((dwte, "dwte", ids, "ids", float(np.float32(scale))),
                                         (dwpe, "dwpe", pos_ids, "pos_ids", 1.0),
                                         (dwtt, "dwtt", type_ids, "type_ids", 1.0)):
        if tab is None:
            continue
        check_device_array(op, name, tab, ndim=2)
        if tab.shape[1] != C:
            raise GraphError(f"{op}: '{name}' has shape {tuple(tab.shape)}, expected (rows, {C})")
        if idx is None:
            raise GraphError(f"{op}: '{idx_name}' is required when '{name}' is given")
        flat = _host_ids(idx_name, idx, lead, tab.shape[0])
        V = int(tab.shape[0])
        if V * C == 0:
            continue
        _zero_table_kernel[grid_blocks(op, tun, V * C, t, max_blocks), t](tab)
        if N == 0:
            continue
        order, starts, uniq, nu = _plan(flat)
        _scatter_rows_kernel[grid_blocks(op, tun, nu * C, t, max_blocks), t](tab, dout2, order, starts, uniq,
                                                                            np.float64(s))
