"""Binds graph ops to the CUDA kernels (the adapters are shared with every device: kernels/adapters.py)."""
from ..adapters import install

install("cuda")

from ...quant.adapters import install as _install_quantized  # noqa: E402  (qlinear ops)

_install_quantized("cuda")
