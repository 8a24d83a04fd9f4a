"""Shared test setup: `import reference` from tests/, small HF oracle models saved to disk."""
import os
import sys

# CUDA kernels run under Numba's simulator unless the run is on a GPU machine (NBFORMER_TEST_GPU=1,
# see benchmarks/gpu/check.sh). Numba reads this when it is first imported, so it is set first.
if os.environ.get("NBFORMER_TEST_GPU") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

try:  # torch (an oracle) must load its libgomp before Numba starts OpenMP threads: the two share
    import torch  # noqa: F401  the soname libgomp.so.1, and torch on Numba's copy ran ~40x slower
except ImportError:
    pass

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def assert_close(actual, ref, atol=1e-5, rtol=1e-5, what="tensor"):
    """|actual - ref| <= atol + rtol*|ref| everywhere; the message names the worst element."""
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != reference {ref.shape}"
    both_inf = np.isinf(ref) & (actual == ref)
    err = np.where(both_inf, 0.0, np.abs(actual - ref))
    bound = atol + rtol * np.abs(np.where(np.isinf(ref), 0.0, ref))
    excess = np.where(np.isnan(err), np.inf, err - bound)
    if excess.size and excess.max() > 0:
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(f"{what}: worst element {i}: got {actual[i]!r}, reference {ref[i]!r}, "
                             f"error {err[i]:.3e} > bound {bound[i]:.3e} (atol={atol}, rtol={rtol})")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
