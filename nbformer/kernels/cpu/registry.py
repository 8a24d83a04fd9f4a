"""Binds graph ops to the CPU kernels (the adapters are shared with every device: kernels/adapters.py)."""
from ..adapters import install

install("cpu")
