"""nbformer: transformers on Numba kernels, forward and backward, no torch at run time."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig
from .errors import ConfigError, GraphError, InputError, NbformerError, WeightsError


def load(path, device: str = "cpu"):
    """Load a Hugging Face model directory or an nbformer .safetensors checkpoint -> Model."""
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
    raise AttributeError(f"module 'nbformer' has no attribute {name!r}")


__all__ = ["load", "Model", "Embedder", "ModelConfig", "NbformerError", "ConfigError", "WeightsError",
           "InputError", "GraphError", "__version__"]
