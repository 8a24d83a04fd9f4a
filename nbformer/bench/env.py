"""Thread counts (set and observed) and the git commit of a source checkout.

nbformer's CPU kernels run on Numba's thread pool (`prange`); the GEMMs split their work into
fixed blocks inside that pool and call a single-threaded BLAS sgemm per block
(nbformer/kernels/cpu/gemm.py pins every loaded OpenBLAS to one thread, so two pools never
fight for the cores). So a benchmark's thread count is `numba.set_num_threads(n)`, and the
BLAS thread count is 1 by design; both are reported as observed, not assumed.
"""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from ..errors import InputError

_BLAS_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                 "openblas_get_num_threads64_", "openblas_get_num_threads")


def max_threads() -> int:
    """The most Numba threads this process can use (NUMBA_NUM_THREADS, fixed at start-up)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def check_threads(values, flag: str = "-t/--threads"):
    """Every requested thread count must lie in [1, NUMBA_NUM_THREADS]."""
    top = max_threads()
    for t in values:
        if t < 1 or t > top:
            raise InputError(f"{flag} {t}: this process can run 1 to {top} Numba threads (NUMBA_NUM_THREADS="
                             f"{top}, fixed when Numba starts; set the environment variable to allow more)")


def set_threads(n: int) -> dict:
    """Numba's pool to n threads, BLAS pinned to one thread per GEMM block -> what is now in effect."""
    import numba

    from ..kernels.cpu.gemm import pin_blas_to_one_thread

    check_threads([n])
    numba.set_num_threads(int(n))
    pin_blas_to_one_thread()
    return {"n_threads": numba.get_num_threads(), "blas_threads": blas_threads()}


def current_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def blas_threads() -> int | None:
    """The thread count of the OpenBLAS libraries loaded in this process (the largest, if they
    differ), read from the libraries themselves; None when none is loaded or readable."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        return None
    found = []
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for name in _BLAS_GETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                found.append(int(fn()))
                break
    return max(found) if found else None


def source_root() -> Path:
    """The directory above the nbformer package (a git checkout when run from source)."""
    return Path(__file__).resolve().parent.parent.parent


def git_commit(root: Path | None = None) -> dict:
    """{'git_commit': sha, 'git_dirty': bool} when nbformer runs from a git checkout, else {}.
    Never raises: an installed package, a missing git or a broken repository give {}."""
    root = source_root() if root is None else Path(root)
    if not (root / ".git").exists():
        return {}
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0 or not sha.stdout.strip():
            return {}
        out = {"git_commit": sha.stdout.strip()}
        st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
        if st.returncode == 0:
            out["git_dirty"] = bool(st.stdout.strip())
        return out
    except (OSError, subprocess.SubprocessError):
        return {}
