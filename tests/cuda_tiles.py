"""Tiny CUDA launch parameters for whole-model tests under the simulator: every kernel family's
TUNABLES set to a few threads per block and tiles of a few rows, so that the multi-tile and tail
paths run on tiny models and the simulator (one Python thread per CUDA thread) stays quick. On a
real GPU (NBFORMER_TEST_GPU=1) the fixture leaves the real defaults alone."""
import importlib

import pytest

FAMILIES = ("attention", "elementwise", "embedding", "kv_cache", "layernorm", "linear", "pooling", "sampling",
            "softmax")
TINY = {"threads": 8, "max_blocks": 4, "block_q": 4, "block_k": 4, "stage": 16}


def _shrink(tunables: dict, monkeypatch):
    for key, value in list(tunables.items()):
        if isinstance(value, dict):
            _shrink(value, monkeypatch)
        elif key in TINY and isinstance(value, int):
            monkeypatch.setitem(tunables, key, TINY[key])


@pytest.fixture
def tiny_cuda_tiles(monkeypatch):
    from nbformer.kernels.cuda._jit import SIMULATOR

    if not SIMULATOR:
        yield
        return
    for family in FAMILIES:
        mod = importlib.import_module(f"nbformer.kernels.cuda.{family}")
        if family == "linear":  # its simulator defaults are already tiny (16 x 16 tiles, 2 x 2 per thread)
            continue
        _shrink(getattr(mod, "TUNABLES", {}), monkeypatch)
    yield
