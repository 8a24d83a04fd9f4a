"""Next-token choice from one row of logits: greedy, temperature, top-k and top-p (nucleus).

Randomness comes in as a uniform number u in [0, 1) so the kernel is a pure function:
the same logits, options and u always give the same token.
"""
import math

import numpy as np
from numba import njit

from .precompile import F64, I64, R1, kernel


@njit(inline="always")
def _lt(a, b):
    # numpy's sort order for floats: NaN after everything
    return a < b or (b != b and a == a)


@njit
def _argsort_stable(key):
    """np.argsort(key, kind="mergesort"): the same permutation (a stable sort with numpy's order),
    as a bottom-up merge sort over insertion-sorted runs of 16; Numba's own argsort compiled for
    longer than the rest of this kernel."""
    n = key.shape[0]
    idx = np.arange(n)
    run = 16
    for lo in range(0, n, run):
        hi = min(lo + run, n)
        for i in range(lo + 1, hi):
            v = idx[i]
            kv = key[v]
            j = i - 1
            while j >= lo and _lt(kv, key[idx[j]]):
                idx[j + 1] = idx[j]
                j -= 1
            idx[j + 1] = v
    tmp = np.empty(n, np.int64)
    width = run
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if _lt(key[idx[j]], key[idx[i]]):  # strictly smaller from the right: stable
                    tmp[k] = idx[j]
                    j += 1
                else:
                    tmp[k] = idx[i]
                    i += 1
                k += 1
            while i < mid:
                tmp[k] = idx[i]
                i += 1
                k += 1
            while j < hi:
                tmp[k] = idx[j]
                j += 1
                k += 1
        idx, tmp = tmp, idx
        width *= 2
    return idx


@kernel((R1, F64, I64, F64, F64), cost=1.8)
@njit(cache=True)
def _sample(logits, temperature, top_k, top_p, u):
    # logits (V,) float32. HF order: temperature -> top-k -> top-p -> draw.
    V = logits.shape[0]
    if temperature <= 0.0:
        best = 0
        for j in range(1, V):
            if logits[j] > logits[best]:
                best = j
        return best
    scaled = np.empty(V, dtype=np.float64)
    for j in range(V):
        scaled[j] = logits[j] / temperature
    order = _argsort_stable(-scaled)  # stable: ties keep the lower id first
    k = V if top_k <= 0 or top_k > V else top_k
    m = scaled[order[0]]
    probs = np.empty(k, dtype=np.float64)
    total = 0.0
    for r in range(k):
        probs[r] = math.exp(scaled[order[r]] - m)
        total += probs[r]
    keep = k
    if top_p < 1.0:
        cum = 0.0
        for r in range(k):
            cum += probs[r] / total
            if cum >= top_p:  # keep the smallest prefix whose mass reaches top_p (at least one)
                keep = r + 1
                break
    mass = 0.0
    for r in range(keep):
        mass += probs[r]
    target = u * mass
    acc = 0.0
    for r in range(keep):
        acc += probs[r]
        if target < acc:
            return order[r]
    return order[keep - 1]


def sample_token(logits, temperature=0.0, top_k=None, top_p=None, u=0.0) -> int:
    """logits (V,) -> token id. temperature 0 means greedy (argmax, lowest id on ties)."""
    return int(_sample(np.ascontiguousarray(logits, dtype=np.float32), float(temperature),
                       int(top_k or 0), float(1.0 if top_p is None else top_p), float(u)))


def sample_rows(logits, temperature=0.0, top_k=None, top_p=None, u=None) -> np.ndarray:
    """logits (N, V), u (N,) uniforms -> (N,) int64 ids: sample_token row by row (the CUDA twin
    chooses all rows on the device and copies back only the ids)."""
    N = logits.shape[0]
    u = np.zeros(N) if u is None else np.asarray(u, dtype=np.float64)
    if u.shape != (N,):
        raise ValueError(f"sample_rows: u must have shape ({N},), got {u.shape}")
    return np.array([sample_token(logits[r], temperature, top_k, top_p, u[r]) for r in range(N)], dtype=np.int64)
