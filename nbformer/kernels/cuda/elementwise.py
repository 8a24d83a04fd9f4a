"""Small data-movement kernels of the residual stream (CUDA twin of kernels/cpu/elementwise.py).

Also holds the argument checks that every CUDA launcher of this package runs before a launch
(`check_device_array`, `launch_threads`): a device kernel does no bounds checks, so shapes,
dtypes and contiguity are checked on the host, naming the argument at fault.
"""
from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ._jit import blocks, cuda, device_function, kernel

MAX_THREADS = 1024  # CUDA's limit of threads per block

# threads per block and a cap on the grid (grid-stride loops cover the rest); launcher keywords override
TUNABLES = {
    "add_forward": {"threads": 256, "max_blocks": 8192},
    "take_rows": {"threads": 256, "max_blocks": 8192},
    "copy": {"threads": 256, "max_blocks": 8192},
    "zero_row": {"threads": 256, "max_blocks": 1024},
}


# ---------------------------------------------------------------- checks shared by the CUDA launchers
def is_device_array(a) -> bool:
    """A numba device array (real, or the simulator's stand-in); numpy arrays are not."""
    return hasattr(a, "copy_to_host") and hasattr(a, "is_c_contiguous") and not isinstance(a, np.ndarray)


def check_device_array(op, name, a, shape=None, dtype=np.float32, ndim=None):
    """a must be a C-contiguous numba device array of dtype (and shape / ndim unless None)."""
    if not is_device_array(a):
        raise GraphError(f"{op}: '{name}' must be a CUDA device array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise GraphError(f"{op}: '{name}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and len(a.shape) != ndim:
        raise GraphError(f"{op}: '{name}' has shape {tuple(a.shape)}, expected {ndim} dimensions")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise GraphError(f"{op}: '{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.is_c_contiguous():
        raise GraphError(f"{op}: '{name}' must be C-contiguous")


def launch_threads(op, tunables, threads=None, pow2=False) -> int:
    """Threads per block from an override or the family's TUNABLES entry, checked: 1..1024
    (and a power of two for the kernels that reduce through a shared-memory tree)."""
    t = int(tunables["threads"] if threads is None else threads)
    if not 1 <= t <= MAX_THREADS or (pow2 and t & (t - 1)):
        need = "a power of two in [1, 1024]" if pow2 else "in [1, 1024]"
        raise GraphError(f"{op}: threads per block must be {need}, got {t}")
    return t


def grid_blocks(op, tunables, n, threads, max_blocks=None) -> int:
    """Blocks of a grid-stride launch over n items: enough to cover n, at most max_blocks."""
    mb = int(tunables["max_blocks"] if max_blocks is None else max_blocks)
    if mb < 1:
        raise GraphError(f"{op}: max_blocks must be >= 1, got {mb}")
    return min(blocks(n, threads), mb)


# ---------------------------------------------------------------- block reductions shared by the kernels
# A fixed-order shared-memory tree over the block's threads (a power of two): the same inputs give
# the same bits on every run and under the simulator (which has no warp shuffles). Every thread of
# the block must call them (they hold syncthreads); each returns the result to every thread and
# leaves the shared scratch free for the next call. The scratch `sh` holds one float64 per thread:
# the kernels take it as dynamic shared memory sized at launch (8 * threads bytes), which also keeps
# clear of the simulator's unlocked first-touch allocation of static shared arrays (threads of one
# block can race there and get different arrays).
@device_function
def block_sum_f64(sh, val, tid, nt):
    sh[tid] = val
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            sh[tid] = sh[tid] + sh[tid + s]
        cuda.syncthreads()
        s //= 2
    total = sh[0]
    cuda.syncthreads()
    return total


@device_function
def block_max_f64(sh, val, tid, nt):
    # NaN never wins (like the CPU's `if x > m`): a NaN-only block gives what its threads passed in
    sh[tid] = val
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            if sh[tid + s] > sh[tid]:
                sh[tid] = sh[tid + s]
        cuda.syncthreads()
        s //= 2
    m = sh[0]
    cuda.syncthreads()
    return m


# Segmented variants: the block is `rows` groups of L consecutive threads (L a power of two dividing
# the block), group r = tid // L reducing its own values (lane = tid - r * L). Same fixed-order tree,
# same contract (every thread of the block calls, syncthreads inside, scratch free again on return);
# each thread gets its group's result.
@device_function
def group_sum_f64(sh, val, tid, lane, L):
    sh[tid] = val
    cuda.syncthreads()
    s = L // 2
    while s > 0:
        if lane < s:
            sh[tid] = sh[tid] + sh[tid + s]
        cuda.syncthreads()
        s //= 2
    total = sh[tid - lane]
    cuda.syncthreads()
    return total


@device_function
def group_max_f64(sh, val, tid, lane, L):
    sh[tid] = val
    cuda.syncthreads()
    s = L // 2
    while s > 0:
        if lane < s:
            if sh[tid + s] > sh[tid]:
                sh[tid] = sh[tid + s]
        cuda.syncthreads()
        s //= 2
    m = sh[tid - lane]
    cuda.syncthreads()
    return m


# ---------------------------------------------------------------- kernels
@kernel(cache=True)
def _add_kernel(out, a, b):
    # out, a, b (n,): flat views; out may alias a or b (each element is read before it is written)
    n = out.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@kernel(cache=True)
def _copy_kernel(out, x):
    n = out.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[i] = x[i]


@kernel(cache=True)
def _take_rows_kernel(out, x, idx):
    # out (B, C) = x (B, T, C)[b, idx[b], :]
    B, C = out.shape
    for i in range(cuda.grid(1), B * C, cuda.gridsize(1)):
        b = i // C
        c = i - b * C
        out[b, c] = x[b, idx[b], c]


@kernel(cache=True)
def _zero_row_kernel(table, row):
    C = table.shape[1]
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        table[row, c] = 0.0


# ---------------------------------------------------------------- launchers
def add_forward(out, a, b, *, threads=None, max_blocks=None):
    """out = a + b elementwise (any shape, float32, C-contiguous; out may alias a or b)."""
    op, tun = "add_forward", TUNABLES["add_forward"]
    check_device_array(op, "out", out)
    check_device_array(op, "a", a, out.shape)
    check_device_array(op, "b", b, out.shape)
    t = launch_threads(op, tun, threads)
    n = int(out.size)
    if n == 0:
        return
    _add_kernel[grid_blocks(op, tun, n, t, max_blocks), t](out.reshape(n), a.reshape(n), b.reshape(n))


def copy(out, x, *, threads=None, max_blocks=None):
    """out = x (any shape, float32, C-contiguous); a no-op when out is x."""
    op, tun = "copy", TUNABLES["copy"]
    check_device_array(op, "out", out)
    check_device_array(op, "x", x, out.shape)
    t = launch_threads(op, tun, threads)
    n = int(out.size)
    if n == 0 or out is x:
        return
    _copy_kernel[grid_blocks(op, tun, n, t, max_blocks), t](out.reshape(n), x.reshape(n))


def take_rows(out, x, idx, *, threads=None, max_blocks=None):
    """Gather one position per batch row: out (B, C) = x (B, T, C)[b, idx[b]].

    idx is a (B,) int64 device array; its values are not checked (that would need a copy back):
    the caller guarantees 0 <= idx[b] < T, as on the CPU."""
    op, tun = "take_rows", TUNABLES["take_rows"]
    check_device_array(op, "out", out, ndim=2)
    B, C = out.shape
    check_device_array(op, "x", x, ndim=3)
    if x.shape[0] != B or x.shape[2] != C:
        raise GraphError(f"take_rows: 'x' has shape {tuple(x.shape)}, expected ({B}, T, {C})")
    check_device_array(op, "idx", idx, (B,), np.int64)
    t = launch_threads(op, tun, threads)
    if B * C == 0:
        return
    if x.shape[1] == 0:
        raise GraphError("take_rows: 'x' has no positions to take")
    _take_rows_kernel[grid_blocks(op, tun, B * C, t, max_blocks), t](out, x, idx)


def zero_row(table, row, *, threads=None, max_blocks=None):
    """table[row, :] = 0 (the padding_idx row of an embedding gradient, nn.Embedding semantics).

    table is a (rows, C) float32 C-contiguous device array; row an int in [0, rows) (checked)."""
    op, tun = "zero_row", TUNABLES["zero_row"]
    check_device_array(op, "table", table, ndim=2)
    R, C = table.shape
    if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)) or not 0 <= int(row) < R:
        raise GraphError(f"zero_row: 'row' is {row!r}, expected an int in [0, {R})")
    t = launch_threads(op, tun, threads)
    if C == 0:
        return
    _zero_row_kernel[grid_blocks(op, tun, C, t, max_blocks), t](table, int(row))
