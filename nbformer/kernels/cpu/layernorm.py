"""LayerNorm forward over the last axis; saves mean and rstd for the backward pass."""
import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _layernorm_forward(out, mean, rstd, x, w, b, eps):
    # x, out (N, C); mean, rstd (N,); row statistics accumulated in float64
    N, C = x.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += x[i, c]
        m = s / C
        v = 0.0
        for c in range(C):
            d = x[i, c] - m
            v += d * d
        r = 1.0 / math.sqrt(v / C + eps)
        mf = np.float32(m)
        rf = np.float32(r)
        for c in range(C):
            out[i, c] = (x[i, c] - mf) * rf * w[c] + b[c]
        mean[i] = mf
        rstd[i] = rf


def layernorm_forward(out, mean, rstd, x, w, b, eps):
    """out (..., C) = (x - mean) * rstd * w + b; mean, rstd (...) written for backward."""
    C = x.shape[-1]
    _layernorm_forward(out.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1), x.reshape(-1, C), w, b, float(eps))
