"""Kernels: kernels/cpu (numba.njit) and kernels/cuda (numba.cuda).

Importing the package first installs nbformer's cache locators (nbformer/jit_cache.py), so that
every cached kernel below is stamped with the source of the modules it is built from."""
from ..jit_cache import install as _install_cache_locators

_install_cache_locators()
