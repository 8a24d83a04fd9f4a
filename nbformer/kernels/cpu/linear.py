"""Linear layers: BLAS GEMM (np.dot inside njit) plus our fused bias/activation/residual epilogue.

Weights use the nn.Linear layout w (M, K): out (N, M) = act(x (N, K) @ w.T + b) + residual.
"""
import math

import numpy as np
from numba import njit, prange

ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2, 3
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(inline="always")
def activate(v, act):
    if act == ACT_RELU:
        return v if v > 0.0 else 0.0 * v
    if act == ACT_GELU:
        return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
    if act == ACT_GELU_TANH:
        return 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    return v


@njit(parallel=True, cache=True)
def _linear_forward(out, x, w, b, act, residual, use_bias, use_residual):
    np.dot(x, w.T, out)  # (N, K) @ (K, M) -> (N, M), sgemm
    N, M = out.shape
    if not use_bias and act == ACT_NONE and not use_residual:
        return
    for i in prange(N):
        for j in range(M):
            v = out[i, j]
            if use_bias:
                v += b[j]
            v = activate(v, act)
            if use_residual:
                v += residual[i, j]
            out[i, j] = v


def linear_forward(out, x, w, b=None, act="none", residual=None):
    """out (..., M) = act(x (..., K) @ w.T + b) [+ residual (..., M)]; out must not alias x or residual (BLAS writes it first)."""
    K, M = x.shape[-1], w.shape[0]
    out2, x2 = out.reshape(-1, M), x.reshape(-1, K)
    use_bias, use_res = b is not None, residual is not None
    _linear_forward(out2, x2, w, b if use_bias else w[0], ACT_CODES[act],
                    residual.reshape(-1, M) if use_res else out2, use_bias, use_res)
