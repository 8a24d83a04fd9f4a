"""Counter-based dropout on the GPU (CUDA twin of kernels/cpu/dropout.py, same launchers).

Element i of the flattened tensor is kept iff rng.keep(seed, offset + i, p) (uint64 counter,
wrapping like the CPU's), and kept elements are scaled by float32(1 / (1 - p)): the mask and the
values are bit-identical to the CPU's for the same (p, seed, offset), on any grid. Backward
regenerates the forward mask from the same (p, seed, offset) instead of storing it.
"""
from __future__ import annotations

import numpy as np
from numba import uint64

from ...errors import GraphError
from ._jit import SIMULATOR, cuda, kernel
from .elementwise import _copy_kernel, check_device_array, grid_blocks, launch_threads
from .rng import add64, keep

# threads per block and a cap on the grid (grid-stride loop; the bits never depend on them);
# launcher keywords override. Smaller blocks under the simulator (one Python thread per CUDA thread).
_T = 64 if SIMULATOR else 256
TUNABLES = {
    "dropout_forward": {"threads": _T, "max_blocks": 8192},
    "dropout_backward": {"threads": _T, "max_blocks": 8192},
}

_U64 = 1 << 64


@kernel(cache=True)
def _dropout_kernel(out, x, p, scale, seed, offset):
    # out, x (n,) flat; out may alias x (each element is read before it is written, by one thread)
    n = x.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        if keep(seed, add64(offset, uint64(i)), p):
            out[i] = x[i] * scale
        else:
            out[i] = 0.0


def _launch(op, out_name, out, in_name, x, p, seed, offset, threads, max_blocks):
    check_device_array(op, in_name, x)
    check_device_array(op, out_name, out, x.shape)
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise GraphError(f"{op}: 'p' is {p}, expected 0 <= p < 1")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < _U64:
            raise GraphError(f"{op}: '{name}' is {v!r}, expected an int in [0, 2**64)")
    tun = TUNABLES[op]
    t = launch_threads(op, tun, threads)
    n = int(x.size)
    if n == 0:
        return
    nb = grid_blocks(op, tun, n, t, max_blocks)
    if p == 0.0:
        if out is not x:
            _copy_kernel[nb, t](out.reshape(n), x.reshape(n))
        return
    _dropout_kernel[nb, t](out.reshape(n), x.reshape(n), np.float32(p), np.float32(1.0 / (1.0 - p)),
                           np.uint64(int(seed)), np.uint64(int(offset)))


def dropout_forward(out, x, p, seed, offset=0, *, threads=None, max_blocks=None):
    """out = x * keep / (1 - p) elementwise over the flattened array; p = 0 copies. out may alias x.

    out, x: float32 C-contiguous device arrays of one shape; seed, offset: ints in [0, 2**64)."""
    _launch("dropout_forward", "out", out, "x", x, p, seed, offset, threads, max_blocks)


def dropout_backward(dx, dout, p, seed, offset=0, *, threads=None, max_blocks=None):
    """dx = dout * keep / (1 - p) with the mask of the forward call that used the same (p, seed, offset)."""
    _launch("dropout_backward", "dx", dx, "dout", dout, p, seed, offset, threads, max_blocks)
