"""Cutting length-sorted texts into padded batches: as few padded rows as a batch's fixed cost allows.

A batch of B texts padded to its longest, T tokens, runs B * T rows through every linear layer, the
padding included. The usual cut (sentence-transformers: consecutive runs of batch_size texts of the
length-sorted list) pads every text to the longest of its run. plan_batches instead minimises

    sum over batches of (B * T + BATCH_COST_ROWS)

over all cuts of the sorted list into consecutive batches of at most max_batch texts (dynamic
programming, O(n * max_batch) with numpy). BATCH_COST_ROWS prices one more batch in padded rows:
executor and launcher overhead (~1-2 ms for a 6-layer encoder on 2 cores, ~10 rows' worth), the less
efficient GEMMs of a smaller batch and, the first time, a new batch shape's graph (~10 ms). Texts of
one length are never split across batches needlessly; equal lengths never get padded.

Each text's result does not depend on its batch beyond rounding (attention masks its padding).
"""
from __future__ import annotations

import numpy as np

BATCH_COST_ROWS = 32  # padded rows one extra batch is worth (see the module docstring)


def plan_batches(lengths, max_batch: int, batch_cost_rows: float = BATCH_COST_ROWS) -> list:
    """lengths: token counts sorted in non-increasing order -> [(start, end), ...] covering 0..n,
    each batch at most max_batch long, minimising padded rows + batch_cost_rows per batch."""
    L = np.asarray(lengths, dtype=np.float64)
    n = len(L)
    if n == 0:
        return []
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if np.any(L[1:] > L[:-1]):
        raise ValueError("plan_batches: lengths must be sorted in non-increasing order")
    best = np.zeros(n + 1)  # best[i]: cheapest cost of texts i..n-1
    cut = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        ends = np.arange(i + 1, min(n, i + max_batch) + 1)
        # a batch i..j-1 is padded to L[i], its longest (the list is sorted)
        cost = (ends - i) * L[i] + batch_cost_rows + best[ends]
        k = int(np.argmin(cost[::-1]))  # ties: the longest batch (fewer batches, fewer shapes)
        j = len(ends) - 1 - k
        best[i], cut[i] = cost[j], ends[j]
    out, i = [], 0
    while i < n:
        out.append((i, int(cut[i])))
        i = int(cut[i])
    return out
