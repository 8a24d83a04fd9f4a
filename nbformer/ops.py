"""Op registry: (op, device kind, direction) -> launcher. Launchers take keyword arrays named by the
node's roles plus the node's attrs. A missing entry is a clear GraphError, not a KeyError.

Devices are named as in nbformer.devices ('cpu', 'cuda', 'cuda:N'); kernels are registered per
device kind, so every GPU of a machine shares one table. A kind's table is filled the first time it
is asked for, by importing nbformer/kernels/<kind>/registry.py.
"""
from __future__ import annotations

import importlib

from .errors import GraphError

_REGISTRY: dict = {}
_loaded: set = set()


def register(op: str, device: str, direction: str = "forward"):
    def deco(fn):
        _REGISTRY[(op, device, direction)] = fn
        return fn

    return deco


def device_kind(device) -> str:
    from .devices import DEVICE_KINDS, DeviceError, parse_device_name

    try:
        kind, _ = parse_device_name(device)
    except DeviceError:
        raise GraphError(f"device {device!r} is not supported (expected one of {DEVICE_KINDS}, or 'cuda:N')") from None
    return kind


def get(op: str, device="cpu", direction: str = "forward"):
    kind = device if device in ("cpu", "cuda") else device_kind(device)
    if kind not in _loaded:
        importlib.import_module(f"nbformer.kernels.{kind}.registry")
        _loaded.add(kind)
    fn = _REGISTRY.get((op, kind, direction))
    if fn is None:
        raise GraphError(f"no {direction} kernel registered for op '{op}' on device '{kind}'")
    return fn


def has(op: str, device="cpu", direction: str = "forward") -> bool:
    try:
        get(op, device, direction)
    except GraphError:
        return False
    return True
