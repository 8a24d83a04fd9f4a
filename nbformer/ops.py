"""Op registry: (op, device, direction) -> launcher. Launchers take keyword arrays named by the
node's roles plus the node's attrs. A missing entry is a clear GraphError, not a KeyError."""
from __future__ import annotations

import importlib

from .errors import GraphError

_REGISTRY: dict = {}
_DEVICE_MODULES = {"cpu": "nbformer.kernels.cpu.registry"}
_loaded: set = set()


def register(op: str, device: str, direction: str = "forward"):
    def deco(fn):
        _REGISTRY[(op, device, direction)] = fn
        return fn

    return deco


def get(op: str, device: str, direction: str = "forward"):
    if device not in _loaded:
        mod = _DEVICE_MODULES.get(device)
        if mod is None:
            raise GraphError(f"device {device!r} is not supported (expected one of {sorted(_DEVICE_MODULES)})")
        importlib.import_module(mod)
        _loaded.add(device)
    fn = _REGISTRY.get((op, device, direction))
    if fn is None:
        raise GraphError(f"no {direction} kernel registered for op '{op}' on device '{device}'")
    return fn
