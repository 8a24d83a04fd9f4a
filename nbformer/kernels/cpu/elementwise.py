"""Small data-movement kernels of the residual stream."""
from numba import njit, prange

from .precompile import F1, F2, I64, R1, R3, RI1, kernel


@kernel((F1, R1, R1), cost=0.9)
@njit(parallel=True, cache=True)
def _add_forward(out, a, b):
    N = out.shape[0]
    for i in prange(N):
        out[i] = a[i] + b[i]


def add_forward(out, a, b):
    """out = a + b elementwise (any shape; out may alias a or b)."""
    _add_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))


@kernel((F2, R3, RI1), cost=1.1)
@njit(parallel=True, cache=True)
def _take_rows(out, x, idx):
    # out (B, C) = x[b, idx[b], :], x (B, T, C)
    B, C = out.shape
    for b in prange(B):
        t = idx[b]
        for c in range(C):
            out[b, c] = x[b, t, c]


def take_rows(out, x, idx):
    """Gather one position per batch row: out (B, C) = x (B, T, C)[b, idx[b]]."""
    _take_rows(out, x, idx)


def copy(out, x):
    """out <- x (same shape; a plain copy between two buffers of the arena)."""
    out[...] = x


def zero_row(table, row):
    """table[row, :] = 0 (the padding_idx row of an embedding gradient)."""
    table[int(row)] = 0.0
