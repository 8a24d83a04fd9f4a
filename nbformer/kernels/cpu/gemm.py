"""Matrix products on the CPU: NumPy's OpenBLAS sgemm, one BLAS thread per core, split by us.

Why not let OpenBLAS thread itself: its worker threads busy-wait for a long time after each
call, and our Numba kernels (OpenMP threads) run right after every GEMM, so the two pools fight
for the same cores; epilogues ran 3-10x slower than alone. Instead OpenBLAS is set to one thread
and the rows of the output are split over a small pool of Python threads (NumPy releases the
GIL inside BLAS), so exactly one pool is busy at a time. The split depends only on the shape and
the thread count, so results are the same on every run with the same settings.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_lock = threading.Lock()
_pool = None
_threads = None
_MIN_FLOPS_TO_SPLIT = 2e6  # below this one call is cheaper than waking a second thread


def _openblas_libs():
    libs = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return libs
    for p in sorted(paths):
        try:
            libs.append(ctypes.CDLL(p))
        except OSError:
            pass
    return libs


def _single_threaded_blas():
    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure NumPy's BLAS is loaded
    for lib in _openblas_libs():
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(1))


def n_threads() -> int:
    global _pool, _threads
    if _threads is None:
        with _lock:
            if _threads is None:
                from numba import get_num_threads

                _single_threaded_blas()
                t = int(os.environ.get("NBFORMER_GEMM_THREADS", get_num_threads()))
                _threads = max(1, t)
                _pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="nbformer-gemm") if t > 1 else None
    return _threads


def _split(n: int, parts: int):
    step = -(-n // parts)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def matmul(out: np.ndarray, a: np.ndarray, b: np.ndarray):
    """out (N, M) = a (N, K) @ b (K, M); a, b may be transposed views; out C-contiguous."""
    t = n_threads()
    N, K = a.shape
    M = b.shape[1]
    if t == 1 or N < 2 * t or 2.0 * N * K * M < _MIN_FLOPS_TO_SPLIT:
        if N == 1 or M == 1 or t == 1 or 2.0 * N * K * M < _MIN_FLOPS_TO_SPLIT:
            np.matmul(a, b, out=out)
            return
        # few rows (decoding): split the columns of out through its transpose, out.T = b.T @ a.T,
        # whose row blocks are contiguous; the (M, N) transpose copy back is cheap for small N
        tmp = np.empty((M, N), np.float32)
        bt, at = b.T, a.T
        cols = _split(M, t)
        futs = [_pool.submit(np.matmul, bt[c0:c1], at, out=tmp[c0:c1]) for c0, c1 in cols[1:]]
        np.matmul(bt[cols[0][0]:cols[0][1]], at, out=tmp[cols[0][0]:cols[0][1]])
        for f in futs:
            f.result()
        out[...] = tmp.T
        return
    rows = _split(N, t)
    futs = [_pool.submit(np.matmul, a[r0:r1], b, out=out[r0:r1]) for r0, r1 in rows[1:]]
    np.matmul(a[rows[0][0]:rows[0][1]], b, out=out[rows[0][0]:rows[0][1]])
    for f in futs:
        f.result()
