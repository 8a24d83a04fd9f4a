"""Counter-based dropout: element i of the flattened tensor is kept iff
rng.keep(seed, offset + i, p), so backward regenerates the mask instead of storing it and the
mask is the same on any thread layout. Give each dropout site its own offset range (or seed)."""
import numpy as np
from numba import njit, prange, uint64

from ...errors import GraphError
from .precompile import F1, F32, R1, U64, kernel
from .rng import keep

_U64 = 1 << 64


@kernel((F1, R1, F32, F32, U64, U64), cost=0.8)
@njit(parallel=True, cache=True)
def _dropout(out, x, p, scale, seed, offset):
    # out, x (n,) flat; out may alias x
    for i in prange(x.shape[0]):
        if keep(seed, offset + uint64(i), p):
            out[i] = x[i] * scale
        else:
            out[i] = 0.0


def _launch(op, out_name, out, in_name, x, p, seed, offset):
    for name, a in ((in_name, x), (out_name, out)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise GraphError(f"{op}: '{name}' is {got}, expected a float32 array")
        if not a.flags.c_contiguous:
            raise GraphError(f"{op}: '{name}' must be C-contiguous")
    if out.shape != x.shape:
        raise GraphError(f"{op}: '{out_name}' has shape {out.shape}, expected {x.shape}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise GraphError(f"{op}: 'p' is {p}, expected 0 <= p < 1")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < _U64:
            raise GraphError(f"{op}: '{name}' is {v!r}, expected an int in [0, 2**64)")
    if p == 0.0:
        if out is not x:
            np.copyto(out, x)
        return
    _dropout(out.reshape(-1), x.reshape(-1), np.float32(p), np.float32(1.0 / (1.0 - p)),
             np.uint64(int(seed)), np.uint64(int(offset)))


def dropout_forward(out, x, p, seed, offset=0):
    """out = x * keep / (1 - p) elementwise over the flattened array; p = 0 copies. out may alias x."""
    _launch("dropout_forward", "out", out, "x", x, p, seed, offset)


def dropout_backward(dx, dout, p, seed, offset=0):
    """dx = dout * keep / (1 - p) with the mask of the forward call that used the same (p, seed, offset)."""
    _launch("dropout_backward", "dx", dx, "dout", dout, p, seed, offset)
