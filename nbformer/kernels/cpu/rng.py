"""Counter-based random numbers for dropout: uniform(seed, counter) is a pure function, so a
dropout mask is regenerated in the backward pass instead of being stored, identically on any
thread layout. Hash: SplitMix64 finaliser of seed and counter (Steele et al., 2014)."""
import numpy as np
from numba import njit, uint64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)


@njit(inline="always")
def mix64(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def uniform(seed, counter):
    """A float32 in [0, 1) from (seed, counter), both uint64, with 24 random bits."""
    z = mix64(uint64(seed) + (uint64(counter) + uint64(1)) * _GOLDEN)
    return np.float32(z >> _S40) * np.float32(1.0 / 16777216.0)


@njit(inline="always")
def keep(seed, counter, p):
    """Dropout decision: True keeps the element (probability 1 - p)."""
    return uniform(seed, counter) >= p
