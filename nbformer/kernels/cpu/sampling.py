"""Next-token choice from one row of logits: greedy, temperature, top-k and top-p (nucleus).

Randomness comes in as a uniform number u in [0, 1) so the kernel is a pure function:
the same logits, options and u always give the same token.
"""
import math

import numpy as np
from numba import njit


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
    order = np.argsort(-scaled, kind="mergesort")  # stable: ties keep the lower id first
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
