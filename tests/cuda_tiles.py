"""Tiny CUDA launch parameters for whole-model tests under the simulator: every kernel family's
TUNABLES set to a few threads per block and tiles of a few rows, so that the multi-tile and tail
paths run on tiny models and the simulator (one Python thread per CUDA thread) stays quick. On a
real GPU (NBFORMER_TEST_GPU=1) the fixture leaves the real defaults alone."""
import importlib

import pytest

FAMILIES = ("attention", "attention_backward", "dropout", "elementwise", "embedding", "kv_cache", "layernorm", "linear",
            "loss", "optim", "pooling", "sampling", "softmax", "rmsnorm", "rope", "swiglu")
TINY = {"threads": 4, "max_blocks": 4, "block_q": 4, "block_k": 4, "stage": 16, "lanes": 4}


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
        if family == "linear":  # 16 x 16 output tiles, 4 x 4 per thread: 16 threads per block
            for prefix in ("", "dx_", "dw_"):
                for key, value in (("BM", 16), ("BN", 16), ("BK", 8), ("TM", 4), ("TN", 4)):
                    if prefix + key in mod.TUNABLES:
                        monkeypatch.setitem(mod.TUNABLES, prefix + key, value)
            for key, value in (("fr_threads", 16), ("fr_lanes", 4), ("fr_cols", 2), ("fr_kc", 32)):
                monkeypatch.setitem(mod.TUNABLES, key, value)
            continue
        _shrink(getattr(mod, "TUNABLES", {}), monkeypatch)
    yield
