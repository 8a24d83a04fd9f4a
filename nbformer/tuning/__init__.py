"""Kernel tuning: declared tunable spaces, validation against the float64 reference, noise-robust
timing, a per-machine cache, and the run-time binding of winners (see runtime.py).

Importing this package is cheap: the submodules are imported where they are used."""
