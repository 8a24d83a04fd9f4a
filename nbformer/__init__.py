"""nbformer: transformers on Numba kernels, forward and backward, no torch at run time."""
from __future__ import annotations

import os as _os

# libgomp's wait policy is left at its default (workers spin ~300k iterations, then sleep):
# nbformer's GEMMs run on single-threaded OpenBLAS split over Numba's own pool (kernels/cpu/gemm.py),
# so only one pool is ever busy and the spin bridges the few microseconds between kernels. Forcing
# OMP_WAIT_POLICY=PASSIVE (as this module once did) put both workers to sleep after every kernel:
# SmolLM2 decoding 21 -> 90 tokens/s and a d256 training step 0.39 -> 0.25 s when removed (measured,
# 2 cores, no torch in the process). A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT is respected.

__version__ = "0.1.0"

from .config import ModelConfig
from .errors import ConfigError, GraphError, InputError, NbformerError, WeightsError


def load(path, device=None):
    """Load a Hugging Face model directory, an nbformer .safetensors checkpoint or a .gguf file -> Model.
    device: 'cpu', 'cuda' or 'cuda:N' (None: $NBFORMER_DEVICE, else 'cpu'); see available_devices()."""
    from .model import Model
    from .weights import load_checkpoint

    return Model(load_checkpoint(path), device=device)


def __getattr__(name):  # heavy modules load on first use, so `import nbformer` stays fast
    if name == "Model":
        from .model import Model

        return Model
    if name == "Embedder":
        from .embedder import Embedder

        return Embedder
    if name == "available_devices":
        from .devices import available_devices

        return available_devices
    if name == "DeviceError":
        from .devices import DeviceError

        return DeviceError
    if name == "stream":
        from .generation import stream

        return stream
    raise AttributeError(f"module 'nbformer' has no attribute {name!r}")


__all__ = ["load", "Model", "Embedder", "stream", "available_devices", "DeviceError", "ModelConfig", "NbformerError", "ConfigError", "WeightsError",
           "InputError", "GraphError", "__version__"]
