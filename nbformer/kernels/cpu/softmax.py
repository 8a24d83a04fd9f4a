"""Row softmax / log-softmax over the last axis (vocabulary) in float32 with float64 sums.

Launchers take `threads=None` (Numba threads for the call; None: unchanged): each row is one
thread's, summed in one fixed order, so the thread count never changes a bit."""
import math

import numpy as np
from numba import njit, prange

from .gemm import check_threads, num_threads
from .precompile import BOOL, F2, R2, kernel


@kernel((F2, R2, BOOL), cost=1.0)
@njit(parallel=True, cache=True)
def _softmax_forward(out, x, log):
    # x, out (N, V); rows of all -inf give NaN like torch does
    N, V = x.shape
    for i in prange(N):
        m = -np.inf
        for j in range(V):
            if x[i, j] > m:
                m = x[i, j]
        s = 0.0
        for j in range(V):
            s += math.exp(x[i, j] - m)
        if log:
            lse = m + math.log(s)
            for j in range(V):
                out[i, j] = x[i, j] - lse
        else:
            inv = 1.0 / s
            for j in range(V):
                out[i, j] = math.exp(x[i, j] - m) * inv


def softmax_forward(out, x, *, threads=None):
    V = x.shape[-1]
    threads = check_threads("softmax_forward", threads)
    with num_threads(threads):
        _softmax_forward(out.reshape(-1, V), x.reshape(-1, V), False)


def log_softmax_forward(out, x, *, threads=None):
    V = x.shape[-1]
    threads = check_threads("log_softmax_forward", threads)
    with num_threads(threads):
        _softmax_forward(out.reshape(-1, V), x.reshape(-1, V), True)
