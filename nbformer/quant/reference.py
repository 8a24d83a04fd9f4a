"""Float64 reference of the quantized linear layer: the oracle of the quantized kernels (CPU and
CUDA), used by the tests and available to a tuner to validate candidates before timing them.

out (N, M) = act(x (N, K) @ W.T + b) [+ residual], W the exact values d * q + m of the blocks
(fp16 d and m as stored), all in float64. GLU: act(x @ Wg.T + bg) * (x @ Wu.T + bu), W = Wg | Wu.
"""
from __future__ import annotations

import math

import numpy as np

from .formats import QuantizedTensor, dequantize64

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate64(v, act: str):
    v = np.asarray(v, dtype=np.float64)
    if act == "none":
        return v
    if act == "relu":
        return np.maximum(v, 0.0)
    if act == "gelu":
        return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))
    if act == "gelu_tanh":
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    if act == "silu":
        return 0.5 * v * (1.0 + np.tanh(0.5 * v))  # v * sigmoid(v), without overflow
    raise ValueError(f"unknown activation {act!r}")


def qlinear_reference(x, w: QuantizedTensor, b=None, act: str = "none", residual=None) -> np.ndarray:
    """float64 (..., M) = act(x @ W.T + b) [+ residual]."""
    x = np.asarray(x, dtype=np.float64)
    y = x @ dequantize64(w).T
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64)
    y = activate64(y, act)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    return y


def qlinear_glu_reference(x, w: QuantizedTensor, b=None, act: str = "silu") -> np.ndarray:
    """float64 (..., F) = act(x @ Wg.T + bg) * (x @ Wu.T + bu), w (2F, K) = gate rows | up rows."""
    y = qlinear_reference(x, w, b)
    F = w.shape[0] // 2
    return activate64(y[..., :F], act) * y[..., F:]
