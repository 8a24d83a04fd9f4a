"""Counter-based random numbers for dropout on the GPU (CUDA twin of kernels/cpu/rng.py).

uniform(seed, counter) is a pure function of two uint64: the SplitMix64 finaliser (Steele et al.,
2014) of seed + (counter + 1) * golden, the same uint64 operations as the CPU in the same order, so
a mask drawn here is bit-identical to the CPU's for the same (seed, counter) and is regenerated in
the backward pass instead of being stored.

Device functions only (mix64, uniform, keep; add64 and mul64 wrap on uint64): call them from a
kernel with uint64 arguments, e.g. `keep(seed, add64(offset, uint64(i)), p)` with seed and offset
passed as np.uint64 and p as np.float32 (a float64 p would compare differently from the CPU's).

Under the simulator the device functions are plain Python on numpy scalars, where a wrapping
uint64 multiply or add raises numpy's overflow warning: there (only) the wrapping products and
sums go through exact Python integers masked to 64 bits, which is the same value the GPU's
native wrapping arithmetic gives.
"""
from __future__ import annotations

import numpy as np
from numba import float32, uint64

from ._jit import SIMULATOR, device_function

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ONE = np.uint64(1)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_INV24 = np.float32(1.0 / 16777216.0)

if SIMULATOR:
    _MASK64 = (1 << 64) - 1

    def mul64(a, b):
        return np.uint64((int(a) * int(b)) & _MASK64)

    def add64(a, b):
        return np.uint64((int(a) + int(b)) & _MASK64)
else:
    @device_function
    def mul64(a, b):
        """a * b modulo 2**64 (uint64)."""
        return a * b

    @device_function
    def add64(a, b):
        """a + b modulo 2**64 (uint64): e.g. a dropout counter offset + i."""
        return a + b


@device_function
def mix64(z):
    """SplitMix64 finaliser of a uint64 (wrapping arithmetic, like the CPU's)."""
    z = mul64(z ^ (z >> _S30), _M1)
    z = mul64(z ^ (z >> _S27), _M2)
    return z ^ (z >> _S31)


@device_function
def uniform(seed, counter):
    """A float32 in [0, 1) from (seed, counter), both uint64, with 24 random bits."""
    z = mix64(add64(uint64(seed), mul64(add64(uint64(counter), _ONE), _GOLDEN)))
    return float32(z >> _S40) * _INV24


@device_function
def keep(seed, counter, p):
    """Dropout decision: True keeps the element (probability 1 - p)."""
    return uniform(seed, counter) >= p
