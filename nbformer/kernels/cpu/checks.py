"""Argument checks shared by the kernel launchers (Numba does no bounds checks, so they run first)."""
import numpy as np

from ...errors import GraphError


def check_array(op, name, a, shape, dtype=np.float32):
    """a must be a C-contiguous numpy array of dtype (and shape, unless None); else GraphError."""
    if not isinstance(a, np.ndarray):
        raise GraphError(f"{op}: '{name}' must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise GraphError(f"{op}: '{name}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise GraphError(f"{op}: '{name}' has shape {a.shape}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise GraphError(f"{op}: '{name}' must be C-contiguous")
