"""The one wrapper around numba.cuda.jit used by every CUDA kernel of nbformer.

Under the simulator (NUMBA_ENABLE_CUDASIM=1, how CI runs these kernels on machines without a
GPU) the options it cannot honour (lineinfo, launch bounds, register caps, LTO, linked code,
on-disk caching) are dropped here, so kernel files never test for the simulator themselves.
The simulator runs one Python thread per CUDA thread and one block at a time: it cannot show
races, and it has no warp shuffles, so kernels use shared-memory tree reductions (the
simulator-safe path) and keep syncthreads() between every shared write and a read by another
thread.
"""
from __future__ import annotations

from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)
if not SIMULATOR:  # cached kernels stamped with the source of the modules they import (nbformer/jit_cache.py)
    from ...jit_cache import install_cuda as _install_cuda_cache_locators

    _install_cuda_cache_locators()
_GPU_ONLY = ("lineinfo", "launch_bounds", "max_registers", "lto", "link", "cache", "opt")


def _options(opts: dict) -> dict:
    if SIMULATOR:
        return {k: v for k, v in opts.items() if k not in _GPU_ONLY}
    return opts


def kernel(fn=None, **opts):
    """@kernel or @kernel(cache=True, ...): a CUDA kernel (never fastmath: kernels see masks and -inf)."""
    if opts.get("fastmath"):
        raise ValueError("nbformer CUDA kernels are compiled without fastmath (masks and infinities)")
    if fn is None:
        return lambda f: cuda.jit(**_options(opts))(f)
    return cuda.jit(**_options(opts))(fn)


def device_function(fn=None, **opts):
    """@device_function: a __device__ function inlined into the kernels that call it."""
    opts = {"device": True, **opts}
    if fn is None:
        return lambda f: cuda.jit(**_options(opts))(f)
    return cuda.jit(**_options(opts))(fn)


def blocks(n: int, per_block: int) -> int:
    """Blocks needed for n work items at per_block each (at least 1, so a launch is never empty)."""
    return max(1, (int(n) + per_block - 1) // per_block)
