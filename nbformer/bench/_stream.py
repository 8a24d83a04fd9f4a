"""The CPU streaming-read kernel of the roofline measurement (a module of its own so importing
nbformer.bench.roofline does not start Numba)."""
import numpy as np
from numba import njit, prange

from ..jit_cache import install as _install_cache_locators

_install_cache_locators()  # before the cached kernel below (nbformer/jit_cache.py)


# reassociation lets LLVM keep several vector accumulators (a plain sum is one serial chain and
# would measure the add latency, not the memory); no masks or infinities here. The inner loop runs
# over a view from index 0: written as `for i in range(lo, hi): s += a[i]` inside the prange it
# compiled to a loop 20x slower (measured: 1.6 GB/s against 35 GB/s on one thread).
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def stream_sum(a, partial):
    """partial[c] = sum of chunk c of a (a read once, in len(partial) contiguous chunks)."""
    n, nc = a.size, partial.size
    chunk = (n + nc - 1) // nc
    for c in prange(nc):
        lo = min(n, c * chunk)
        hi = min(n, lo + chunk)
        v = a[lo:hi]
        s = np.float32(0.0)
        for i in range(v.size):
            s += v[i]
        partial[c] = s
