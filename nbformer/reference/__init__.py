"""The float64 NumPy oracle of every kernel, shared by the tests and the tuner.

forward.py: kernels and whole-model forwards; backward.py: backward kernels, loss, dropout and
optimizer. Written for clarity, not speed: textbook formulas in float64, so that the float32
tiled / fused kernels (and every tuning candidate, see nbformer.tuning.validate) can be checked
against them. NumPy only: importing this never compiles a kernel.
"""
