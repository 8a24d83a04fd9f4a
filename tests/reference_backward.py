"""The float64 backward oracle for the tests: nbformer/reference/backward.py (shared with the tuner)."""
from nbformer.reference.backward import *  # noqa: F401,F403
from nbformer.reference.backward import _GOLDEN, _M1, _M2  # noqa: F401
