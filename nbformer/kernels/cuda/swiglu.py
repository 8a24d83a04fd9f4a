"""Gated FFN input layer on the GPU (SwiGLU and friends): out = act(x @ Wg.T + bg) * (x @ Wu.T + bu)
(CUDA twin of kernels/cpu/swiglu.py: same launchers, same fused weight layout).

The gate and up projections are one fused weight w (2F, K): rows [0, F) gate, [F, 2F) up. The
(N, 2F) gate|up GEMM runs on cuda/linear.py's kernels (tiled SGEMM, or the few-row path when
decoding) with act='none', into `pre` (training: the caller's buffer, kept for backward) or a
scratch allocated per call (inference); then a small grid-stride kernel applies the GLU product
act(gate) * up. Both are deterministic (fixed summation orders, one writer per element), so the
same inputs give the same bits on every run; they agree with the CPU twin to rounding.

Activation formulas are those of cuda/linear.py (_activate / _activate_grad, the CPU's float32
formulas): silu (SwiGLU, Llama), gelu_tanh / gelu (GeGLU), relu (ReGLU), none (bilinear).
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import GraphError
from ._jit import cuda, kernel
from .elementwise import check_device_array, grid_blocks, launch_threads
from .linear import (ACT_CODES, ACT_NONE, ACT_RELU, ACT_SILU, FORWARD_TUNABLES, _activate, _activate_grad,
                     linear_forward)

# the GLU kernels' threads per block and grid cap (grid-stride); linear_forward's tunables (BM, ...,
# fr_*) pass through the linear launchers' keywords to cuda/linear.py
TUNABLES = {"swiglu": {"threads": 256, "max_blocks": 8192}}
BIT_CHANGING = {"swiglu": {"threads": False, "max_blocks": False}}

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

_GLU_FWD: dict = {}
_GLU_BWD: dict = {}


def _glu_fwd_kernel(act):
    """out (N, F) = act(pre[:, :F]) * pre[:, F:] (grid-stride; one variant per activation)."""
    fn = _GLU_FWD.get(act)
    if fn is not None:
        return fn
    ACT = act

    @kernel(cache=True)
    def glu_forward(out, pre):
        N = out.shape[0]
        F = out.shape[1]
        for e in range(cuda.grid(1), N * F, cuda.gridsize(1)):
            i = e // F
            j = e - i * F
            out[i, j] = _activate(pre[i, j], ACT) * pre[i, F + j]

    _GLU_FWD[act] = glu_forward
    return glu_forward


def _glu_bwd_kernel(act):
    """dpre (N, 2F) = [dout * up * act'(gate) | dout * act(gate)] (the CPU's formulas)."""
    fn = _GLU_BWD.get(act)
    if fn is not None:
        return fn
    ACT = act

    @kernel(cache=True)
    def glu_backward(dpre, dout, pre):
        N = dout.shape[0]
        F = dout.shape[1]
        for e in range(cuda.grid(1), N * F, cuda.gridsize(1)):
            i = e // F
            j = e - i * F
            g = pre[i, j]
            u = pre[i, F + j]
            d = dout[i, j]
            if ACT == ACT_SILU:
                t = math.exp(-abs(g))  # the sigmoid from exp of a non-positive argument
                sg = _F1 / (_F1 + t)
                if g < _F0:
                    sg = sg * t
                dpre[i, F + j] = d * (g * sg)
                dpre[i, j] = d * u * (sg * (_F1 + g * (_F1 - sg)))
            elif ACT == ACT_RELU:
                if g > _F0:
                    dpre[i, F + j] = d * g
                    dpre[i, j] = d * u
                else:
                    dpre[i, F + j] = _F0
                    dpre[i, j] = _F0
            elif ACT == ACT_NONE:
                dpre[i, F + j] = d * g
                dpre[i, j] = d * u
            else:
                dpre[i, F + j] = d * _activate(g, ACT)
                dpre[i, j] = d * u * _activate_grad(g, ACT)

    _GLU_BWD[act] = glu_backward
    return glu_backward


# ---------------------------------------------------------------- launchers
def _act_code(op, act):
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    return ACT_CODES[act]


def _split(op, tunables):
    """(GLU kernel tunables, linear_forward tunables) from the launcher keywords."""
    own = {k: v for k, v in tunables.items() if k in TUNABLES["swiglu"]}
    lin = {k: v for k, v in tunables.items() if k not in own}
    unknown = sorted(set(lin) - set(FORWARD_TUNABLES))
    if unknown:
        raise GraphError(f"{op}: unknown tunable(s) {unknown}, expected some of "
                         f"{sorted(set(TUNABLES['swiglu']) | set(FORWARD_TUNABLES))}")
    return own, lin


def _check_linear(op, out, x, w, b):
    check_device_array(op, "x", x)
    check_device_array(op, "w", w)
    xs, ws = tuple(x.shape), tuple(w.shape)
    if len(xs) < 1:
        raise GraphError(f"{op}: 'x' must have shape (..., K), got a 0-d array")
    if len(ws) != 2 or ws[1] != xs[-1] or ws[0] % 2:
        raise GraphError(f"{op}: 'w' has shape {ws}, expected (2F, {xs[-1]}) (gate rows, then up rows)")
    F = ws[0] // 2
    check_device_array(op, "out", out, xs[:-1] + (F,))
    if b is not None:
        check_device_array(op, "b", b, (2 * F,))
    return F


def _glu(op, out, pre, code, own):
    F = int(tuple(out.shape)[-1])
    N = int(out.size) // F if F else 0
    tun = TUNABLES["swiglu"]
    t = launch_threads(op, tun, own.get("threads"))
    if N * F == 0:
        return
    _glu_fwd_kernel(code)[grid_blocks(op, tun, N * F, t, own.get("max_blocks")), t](
        out.reshape(N, F), pre.reshape(N, 2 * F))


def swiglu_linear_forward(out, x, w, b=None, act="silu", **tunables):
    """out (..., F) = act(x @ w[:F].T + b[:F]) * (x @ w[F:].T + b[F:]); x (..., K), w (2F, K), b (2F,).

    Device arrays, float32, C-contiguous; out must not alias x or w. The gate|up GEMM goes to a
    scratch (..., 2F) allocated for the call. Keywords: threads / max_blocks (the GLU kernel) and
    cuda/linear.py's forward tunables (BM, BN, ..., fr_kc). Asynchronous (default stream)."""
    op = "swiglu_linear_forward"
    F = _check_linear(op, out, x, w, b)
    code = _act_code(op, act)
    own, lin = _split(op, tunables)
    pre = cuda.device_array(tuple(x.shape)[:-1] + (2 * F,), np.float32)
    linear_forward(pre, x, w, b, "none", None, **lin)
    _glu(op, out, pre, code, own)


def swiglu_linear_forward_train(out, pre, x, w, b=None, act="silu", **tunables):
    """As swiglu_linear_forward, and also writes pre (..., 2F) = x @ w.T + b (gate | up) for backward
    (pre must not alias out, x or w)."""
    op = "swiglu_linear_forward_train"
    F = _check_linear(op, out, x, w, b)
    check_device_array(op, "pre", pre, tuple(x.shape)[:-1] + (2 * F,))
    code = _act_code(op, act)
    own, lin = _split(op, tunables)
    linear_forward(pre, x, w, b, "none", None, **lin)
    _glu(op, out, pre, code, own)


def swiglu_forward(out, pre, act="silu", *, threads=None, max_blocks=None):
    """The epilogue on its own: out (..., F) = act(pre[..., :F]) * pre[..., F:], pre (..., 2F)."""
    op = "swiglu_forward"
    check_device_array(op, "pre", pre)
    ps = tuple(pre.shape)
    if len(ps) < 1 or ps[-1] % 2:
        raise GraphError(f"{op}: 'pre' has shape {ps}, expected (..., 2F) (gate | up)")
    check_device_array(op, "out", out, ps[:-1] + (ps[-1] // 2,))
    own = {k: v for k, v in (("threads", threads), ("max_blocks", max_blocks)) if v is not None}
    _glu(op, out, pre, _act_code(op, act), own)


def swiglu_backward(dpre, dout, pre, act="silu", *, threads=None, max_blocks=None):
    """Backward of the epilogue: dpre (..., 2F) = [dout * up * act'(gate) | dout * act(gate)] from the
    saved pre (..., 2F) = gate | up and dout (..., F). Written, not accumulated; the fused weight's
    gradients then come from linear_backward(dx, dw, db, dpre, x, w). dpre must not alias pre or dout."""
    op = "swiglu_backward"
    check_device_array(op, "pre", pre)
    ps = tuple(pre.shape)
    if len(ps) < 1 or ps[-1] % 2:
        raise GraphError(f"{op}: 'pre' has shape {ps}, expected (..., 2F) (gate | up)")
    F = ps[-1] // 2
    check_device_array(op, "dout", dout, ps[:-1] + (F,))
    check_device_array(op, "dpre", dpre, ps)
    code = _act_code(op, act)
    tun = TUNABLES["swiglu"]
    t = launch_threads(op, tun, threads)
    N = int(dout.size) // F if F else 0
    if N * F == 0:
        return
    _glu_bwd_kernel(code)[grid_blocks(op, tun, N * F, t, max_blocks), t](
        dpre.reshape(N, 2 * F), dout.reshape(N, F), pre.reshape(N, 2 * F))
