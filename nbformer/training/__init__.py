"""Training: flat parameter/gradient buffers, one-step executors, optimizer, loop, checkpoints."""
from .state import FlatBuffers, StepRunner  # noqa: F401
