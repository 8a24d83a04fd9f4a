"""nbformer: transformers on Numba kernels, forward and backward, no torch at run time."""
from __future__ import annotations

import os as _os

# Numba's OpenMP workers must sleep, not spin, between parallel regions: our GEMMs run on a pool
# of their own right after each Numba kernel, and spinning workers made training steps 3-4x
# slower on 2 cores (measured). Read by libgomp when Numba first starts its threads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
