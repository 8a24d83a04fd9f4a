"""Compatibility: generation used to be this one module; it is now the package nbformer.generation
(options, inputs, processors, greedy, beam, text, results).

`nbformer.generate` stays importable as another name for that package, the same module object
rather than a copy of its names, so `from nbformer.generate import generate, stream,
GenerationResult, check_options, RecomputeSession, ...`, `nbformer.generate.X` and assignments to
its attributes (tests replace open_session to slow decoding down) keep working.
"""
import sys

from . import generation

sys.modules[__name__] = generation
