"""Shared test setup: `import reference` from tests/, small HF oracle models saved to disk."""
import os
import sys

# CUDA kernels run under Numba's simulator unless the run is on a GPU machine (NBFORMER_TEST_GPU=1,
# see benchmarks/gpu/check.sh). Numba reads this when it is first imported, so it is set first.
if os.environ.get("NBFORMER_TEST_GPU") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# Tests run the kernels' defaults, whatever a tuning cache on this machine holds (a cache from
# `nbformer tune` must not change what the tests check); tests/test_tuning*.py opt back in.
os.environ.setdefault("NBFORMER_TUNING", "off")

# libgomp reads OMP_WAIT_POLICY once, when it loads: torch loads it first here, before nbformer's own
# setdefault (nbformer/__init__.py) could apply, and spinning OpenMP workers made nbformer 5-10x slower
# next to torch (SmolLM2 chat reply: 12 s with torch imported first, 2.3 s with this set; measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def _lock_simulator_shared_arrays():
    """Numba's CUDA simulator creates a static cuda.shared.array on its first use in a block without
    a lock, so two threads of one block can (rarely) get different arrays: a flaky test, not a
    kernel bug. The same lookup, under a lock."""
    import threading
    import traceback

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock, orig = threading.Lock(), kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory: one buffer made up front
            return orig(self, shape, dtype, alignment)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # the kernel's source line
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    try:
        _lock_simulator_shared_arrays()
    except ImportError:  # no numba-cuda: the CUDA tests skip themselves
        pass


@pytest.fixture(autouse=True)
def _fast_simulator_barriers(request):
    """The simulator's blocks busy-poll their threads, so every syncthreads() costs about one GIL
    switch interval: a short interval makes the CUDA tests 5-10x faster (restored after each)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not request.module.__name__.startswith("test_cuda"):
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)
