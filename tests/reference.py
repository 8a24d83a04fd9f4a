"""The float64 oracle for the tests: it lives in the package (nbformer/reference/forward.py) so
that the tuner validates candidates against the same formulas the tests use."""
from nbformer.reference.forward import *  # noqa: F401,F403
