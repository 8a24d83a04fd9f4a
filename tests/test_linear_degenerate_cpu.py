"""CPU linear layers on degenerate shapes (no input features, no rows, no outputs) and bad arguments.

A layer with K = 0 inputs computes act(b) [+ residual], as torch's nn.Linear(0, M) does; no rows or
no outputs launch nothing; the backward writes zeros where a gradient is a sum over nothing. Bad
arguments are GraphErrors that name the argument, before any kernel runs."""
import math

import numpy as np
import pytest

from nbformer.errors import GraphError
from nbformer.kernels.cpu.linear import linear_backward, linear_forward, linear_forward_train
from nbformer.kernels.cpu.swiglu import swiglu_linear_forward, swiglu_linear_forward_train

# (leading shape of x, K, M): no inputs, no rows (two ways), no outputs
SHAPES = [((3, 4), 0, 5), ((0,), 6, 5), ((2, 0), 6, 5), ((2, 3), 6, 0)]


def _data(rng, lead, K, M):
    x = rng.standard_normal(lead + (K,)).astype(np.float32)
    w = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    r = rng.standard_normal(lead + (M,)).astype(np.float32)
    return x, w, b, r


def _pre64(x, w, b):
    n = math.prod(x.shape[:-1])
    p = x.reshape(n, x.shape[-1]).astype(np.float64) @ w.T.astype(np.float64) + b
    return p.reshape(x.shape[:-1] + (w.shape[0],))


@pytest.mark.parametrize("lead,K,M", SHAPES)
def test_linear_forward_and_train_on_degenerate_shapes(rng, lead, K, M):
    x, w, b, r = _data(rng, lead, K, M)
    pre64 = _pre64(x, w, b)
    expected = np.maximum(pre64, 0.0) + r
    out = np.full(lead + (M,), np.nan, np.float32)
    linear_forward(out, x, w, b, "relu", r)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    out_t, pre = np.full_like(out, np.nan), np.full_like(out, np.nan)
    linear_forward_train(out_t, pre, x, w, b, "relu", r)
    np.testing.assert_allclose(out_t, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pre, pre64, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lead,K,M", SHAPES)
def test_linear_backward_on_degenerate_shapes(rng, lead, K, M):
    x, w, b, _ = _data(rng, lead, K, M)
    pre = _pre64(x, w, b).astype(np.float32)
    dout = rng.standard_normal(pre.shape).astype(np.float32)
    dx, dw, db = (np.full(s, np.nan, np.float32) for s in (x.shape, w.shape, (M,)))
    linear_backward(dx, dw, db, dout, x, w, pre, "relu")
    n = math.prod(lead)
    g = (dout * (pre > 0)).reshape(n, M).astype(np.float64)
    np.testing.assert_allclose(dx.reshape(n, K), g @ w.astype(np.float64), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dw, g.T @ x.reshape(n, K).astype(np.float64), rtol=0, atol=1e-5)
    np.testing.assert_allclose(db, g.sum(axis=0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lead,K,F", [((3,), 0, 4), ((0,), 5, 4), ((2,), 5, 0)])
def test_swiglu_linear_on_degenerate_shapes(rng, lead, K, F):
    x, w, b, _ = _data(rng, lead, K, 2 * F)
    p = _pre64(x, w, b)
    gate, up = p[..., :F], p[..., F:]
    expected = gate / (1.0 + np.exp(-gate)) * up
    out = np.full(lead + (F,), np.nan, np.float32)
    swiglu_linear_forward(out, x, w, b)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    out_t, pre = np.full_like(out, np.nan), np.full(lead + (2 * F,), np.nan, np.float32)
    swiglu_linear_forward_train(out_t, pre, x, w, b)
    np.testing.assert_allclose(out_t, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pre, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change,message", [
    (dict(out=np.zeros((4, 3), np.float32)), "'out' has shape (4, 3), expected (4, 5)"),
    (dict(out=np.zeros((4, 5), np.float64)), "'out' has dtype float64, expected float32"),
    (dict(w=np.ones((5, 7), np.float32)), "'w' has shape (5, 7), expected (M, 8)"),
    (dict(b=np.ones(3, np.float32)), "'b' has shape (3,), expected (5,)"),
    (dict(residual=np.ones((4, 4), np.float32)), "'residual' has shape (4, 4), expected (4, 5)"),
    (dict(x=np.ones((8, 4), np.float32).T), "'x' must be C-contiguous"),
    (dict(x=np.float32(1.0)), "'x' must be a numpy array"),
    (dict(act="tanh"), "'act' is 'tanh'"),
])
def test_linear_forward_rejects_bad_arguments_by_name(change, message):
    args = dict(out=np.zeros((4, 5), np.float32), x=np.ones((4, 8), np.float32), w=np.ones((5, 8), np.float32),
                b=np.ones(5, np.float32), act="none", residual=None)
    args.update(change)
    with pytest.raises(GraphError, match="linear_forward: " + message.replace("(", r"\(").replace(")", r"\)")):
        linear_forward(**args)
