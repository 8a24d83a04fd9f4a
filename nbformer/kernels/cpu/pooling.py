"""Sentence pooling over the token axis (sentence-transformers semantics) and L2 normalisation."""
import math

import numpy as np
from numba import njit, prange

from .precompile import F2, I64, R3, RU2, kernel

MODES = {"mean": 0, "cls": 1, "max": 2, "mean_sqrt_len": 3, "lasttoken": 4}


@kernel((F2, R3, RU2, I64), cost=1.5)
@njit(parallel=True, cache=True)
def _pool(out, x, mask, mode):
    # out (B, C); x (B, T, C); mask (B, T) u8 with 1 = real token
    B, T, C = x.shape
    for b in prange(B):
        n = 0
        last = 0
        for t in range(T):
            if mask[b, t]:
                n += 1
                last = t
        for c in range(C):
            if mode == 1:
                out[b, c] = x[b, 0, c]
            elif mode == 4:
                out[b, c] = x[b, last, c]
            elif mode == 2:
                m = -np.inf
                for t in range(T):
                    if mask[b, t] and x[b, t, c] > m:
                        m = x[b, t, c]
                out[b, c] = m if n > 0 else 0.0
            else:
                s = 0.0
                for t in range(T):
                    if mask[b, t]:
                        s += x[b, t, c]
                d = max(n, 1e-9) if mode == 0 else math.sqrt(max(n, 1e-9))
                out[b, c] = s / d


@kernel((F2,), cost=1.0)
@njit(parallel=True, cache=True)
def _l2_normalize(x):
    # x (N, C) in place; torch.nn.functional.normalize semantics (eps 1e-12)
    N, C = x.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += x[i, c] * x[i, c]
        inv = 1.0 / max(math.sqrt(s), 1e-12)
        for c in range(C):
            x[i, c] = x[i, c] * inv


def pool(out, x, mask, mode="mean"):
    _pool(out, x, mask, MODES[mode])


def l2_normalize(x):
    _l2_normalize(x)
