"""Embedding lookup on the GPU: token + position + token-type rows summed into the residual stream
(CUDA twin of kernels/cpu/embedding.py, same launcher and argument order).

The CUDA launcher checks shapes, dtypes and contiguity only: the ids arrive on the device already
range-checked on the host by the model (checking their values here would need a copy back).
"""
from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import check_device_array, grid_blocks, launch_threads

TUNABLES = {"embedding_forward": {"threads": 256, "max_blocks": 8192}}


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
