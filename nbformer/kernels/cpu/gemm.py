"""Matrix products on the CPU: BLAS sgemm on blocks, one block per Numba thread.

BLAS (the OpenBLAS that Numba's np.dot binds to, via scipy) is set to one thread and the GEMM is
split by us inside a `prange`: row blocks when there are enough rows, column blocks otherwise
(decoding). Why: a multi-threaded BLAS keeps its own worker pool busy-waiting after every call,
and our Numba kernels (OpenMP workers) run right after every GEMM, so two pools fought for the
same cores (epilogues 3-10x slower, training steps 3-4x slower, measured on 2 cores). With one
pool there is nothing to fight, and the linear layer's epilogue (bias, activation, residual)
runs on each block straight after its GEMM, while the block is still in cache.

Blocks are set by the shape and the pool's size (NUMBA_NUM_THREADS, fixed for a process:
auto_blocks, tn_rows; ROWS rows, or COLS columns when there are few rows, where a caller gives
none), never by the thread count of one call, so every element is computed by the same sgemm
call shape whatever the number of threads: results are bit-identical across runs and thread
counts. Every kernel (matmul_nn / matmul_tn here, the linear and gated-FFN forwards) takes
its block sizes as run-time arguments (the tuner's `rows`/`cols`, see nbformer/tuning/space.py),
so no block size is a global frozen into compiled code and a tuned value needs no recompilation.
Other block sizes give other sgemm call shapes, so they may change the last bits (the tuner
validates them at the tests' tolerance); the thread count never does.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
from numba import njit, prange, types
from numba.np.linalg import _BLAS

from ...errors import GraphError
from .precompile import F2, I64, R2, kernel

_lock = threading.Lock()
_blas_pinned = False
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")


def pin_blas_to_one_thread():
    """Set every OpenBLAS loaded in this process (scipy's, which Numba's np.dot calls, and NumPy's)
    to one thread. Idempotent; called by the launchers before the first GEMM."""
    global _blas_pinned
    if _blas_pinned:
        return
    with _lock:
        if _blas_pinned:
            return
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS Numba binds to)

        try:
            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
        except OSError:
            paths = []
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
            except OSError:
                continue
            for name in _SETTERS:
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn(ctypes.c_int(1))
        _blas_pinned = True


ROWS = 128  # rows per block: large enough for sgemm to amortise packing the weight (measured)
COLS = 256  # columns per block when there are fewer than 2 * ROWS rows


ROW_TARGET = 512  # auto_blocks: about this many rows per block at most (row split) ...
COL_TARGET = 1024  # ... or columns (column split)


def _pool_units(units):
    """units, or the pool's size (NUMBA_NUM_THREADS: fixed for the process; a call's thread count
    must never choose blocks, since blocks can change bits)."""
    if units is None:
        from numba import config

        units = config.NUMBA_NUM_THREADS
    return max(1, int(units))


def auto_blocks(N, M, units=None):
    """(rows, cols) for an (N, M) output when the caller gave no blocks: as few GEMM calls as keep
    `units` threads equally busy. Each sgemm call packs all of the operand it does not split (the
    weight in a row split, x in a column split), so the split goes along the longer side (rows when
    N >= M: the weight is then the smaller operand to pack again) and the block count is a multiple
    of `units`, each block at most ~ROW_TARGET rows / COL_TARGET columns (to keep the epilogue's
    scratch block near L2). Fewer than 2 * ROWS rows keep the decoding split (COLS-column blocks).
    units: NUMBA_NUM_THREADS (the pool's size, fixed for the process), not the threads of one call:
    a call's thread count must never change the bits, and other blocks can (other sgemm call shapes).
    On 2 cores: GPT-2 T=256 GEMMs 5-20 % faster than the fixed 128-row blocks, embedding-batch
    GEMMs (~1500 x 384) 5-15 % (benchmarks/results/gpt2_prefill.md, embed.md)."""
    units = _pool_units(units)
    if N < 2 * ROWS:
        return ROWS, COLS
    if N >= M:
        n = units * -(-N // (units * ROW_TARGET))
    else:
        n = units * -(-M // (units * COL_TARGET))
    if n == 1:  # one block: rows = N with cols = M is a row split of one block (by_rows_with)
        return N, M
    if N >= M:
        return -(-N // n), COLS  # N >= 2 * rows: a row split into n blocks
    return N, -(-M // n)  # rows = N: a column split into n blocks


def row_blocks(N, M, units=None):
    """(rows, cols) for an (N, M) output: a row split of N rows into a multiple of `units` blocks
    (NUMBA_NUM_THREADS, as auto_blocks) of at most ~ROW_TARGET rows and, on many threads, at least
    ROWS / 2; fewer than 2 * ROWS rows keep (ROWS, COLS) (the decoding split). For GEMMs whose
    blocks hold whole rows of the output (the gated FFN's fused gate | up): fixed 128-row blocks
    left a thread idle at 300 rows (148 vs 255 GFLOP/s on 2 Xeon cores) and ran 1024 rows at
    253 vs 297 GFLOP/s."""
    units = _pool_units(units)
    if N < 2 * ROWS:
        return ROWS, COLS
    n = units * -(-N // (units * ROW_TARGET))
    n = max(1, min(n, N // (ROWS // 2)))  # >= 64 rows a block: each sgemm call packs all of the weight
    if n == 1:
        return N, M  # one block: by_rows_with(N, M, N, M) holds (as auto_blocks)
    return -(-N // n), COLS


TN_ROW_TARGET = 4096  # tn_rows: about this many rows of the weight gradient per block at most


def tn_rows(M, units=None):
    """Rows of out per block for matmul_tn's out (M, K) = a (N, M).T @ b (N, K) (a weight gradient):
    a multiple of `units` blocks (NUMBA_NUM_THREADS, as auto_blocks: never the threads of one call),
    each at most ~TN_ROW_TARGET rows; each block is one in-place sgemm of rows x N x K (sgemm_rows).
    With 2 threads on a Xeon, 128 -> 512-row blocks ran 1.2-1.3x faster, and 512 -> 4096 another 2-8 %
    for 1024 < M (M x N x K = 8192 x 1024 x 256: 16.1 -> 15.1 ms; 50257 x 1024 x 768: 260 -> 239 ms;
    3072 x 1024 x 768: 14.7 -> 14.0 ms; 1536 x 512 x 384: 2.08 -> 1.95 ms), with the same bits (each
    element's sum over N is sgemm's, whatever the row split); M <= 1024 is unchanged (two blocks)."""
    units = _pool_units(units)
    n = units * -(-M // (units * TN_ROW_TARGET))
    return max(1, -(-M // n))


@njit(inline="always")
def by_rows_with(N, M, rows, cols):
    """Split over rows (True) or columns (False), for blocks of `rows` rows / `cols` columns?"""
    return N >= 2 * rows or M <= cols


class num_threads:
    """`with num_threads(n):` run the Numba kernels inside on n threads (None: unchanged), then
    restore. Thread counts never change results here (fixed blocks), only speed."""

    __slots__ = ("n", "old")

    def __init__(self, n):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            import numba

            self.old = numba.get_num_threads()
            if self.old != self.n:
                numba.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None and self.old != self.n:
            import numba

            numba.set_num_threads(self.old)
        return False


def check_threads(op, threads):
    """threads: None or an int in [1, NUMBA_NUM_THREADS]; GraphError otherwise."""
    if threads is None:
        return None
    from numba import config

    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= config.NUMBA_NUM_THREADS:
        raise GraphError(f"{op}: 'threads' is {threads!r}, expected an int in [1, {config.NUMBA_NUM_THREADS}] "
                         f"(NUMBA_NUM_THREADS)")
    return int(threads)


# Numba's own binding of the BLAS sgemm (the one np.dot calls, Fortran order, with leading
# dimensions): np.dot takes only contiguous operands, so a block of columns had to be copied in and
# out around it (the weight gradient's (N, rows) slice of g, a column split's output); with the
# leading dimensions given, the block is read and written in place. Same sgemm call shapes, so the
# same bits as np.dot on the copies.
_xxgemm = _BLAS.numba_xxgemm(types.float32)  # (the class method: no scipy import at our import;
# pin_blas_to_one_thread loads the BLAS before any kernel runs)
_KIND, _NOTRANS, _TRANS = np.int8(ord("s")), np.int8(ord("N")), np.int8(ord("T"))


@njit(nogil=True)
def sgemm_rows(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc):
    """Row-major c (M, N) = op(a) (M, K) @ op(b) (K, N), op = transpose where trans_*; a, b, c are
    arrays whose first element starts the operand (a view such as x[:, m0:] for a block of
    columns), rows lda / ldb / ldc elements apart, each row contiguous. The caller checks that the
    blocks lie inside the arrays. (Fortran's sgemm on the transposes: c^T = op(b)^T op(a)^T.)"""
    alpha = np.ones(1, np.float32)
    beta = np.zeros(1, np.float32)
    _xxgemm(_KIND, _TRANS if trans_b else _NOTRANS, _TRANS if trans_a else _NOTRANS, N, M, K, alpha.ctypes,
            b.ctypes, max(1, ldb), a.ctypes, max(1, lda), beta.ctypes, c.ctypes, max(1, ldc))  # (>= 1: Fortran)


@kernel((F2, R2, R2, I64, I64), cost=3.5)
@njit(parallel=True, cache=True, nogil=True)
def matmul_nn(out, a, b, rows, cols):
    """out (N, M) = a (N, K) @ b (K, M), in blocks of `rows` rows (or `cols` columns when there are
    few rows)."""
    N, M = out.shape
    if by_rows_with(N, M, rows, cols):
        for c in prange((N + rows - 1) // rows):
            r0 = c * rows
            r1 = min(N, r0 + rows)
            np.dot(a[r0:r1], b, out[r0:r1])
    else:
        K = a.shape[1]
        for c in prange((M + cols - 1) // cols):
            m0 = c * cols
            m1 = min(M, m0 + cols)
            sgemm_rows(False, False, N, m1 - m0, K, a, K, b[:, m0:], M, out[:, m0:], M)  # in place


@kernel((F2, R2, R2, I64), cost=2.4)
@njit(parallel=True, cache=True, nogil=True)
def matmul_tn(out, a, b, rows):
    """out (M, K) = a (N, M).T @ b (N, K): the weight gradient g.T @ x, split over blocks of `rows`
    rows of out."""
    M, K = out.shape
    N = a.shape[0]
    for c in prange((M + rows - 1) // rows):
        m0 = c * rows
        m1 = min(M, m0 + rows)
        sgemm_rows(True, False, m1 - m0, K, N, a[:, m0:], M, b, K, out[m0:], K)  # the (N, m) block of g in place


# The kernels above are registered as 'gemm.matmul_nn' / 'gemm.matmul_tn' (precompile.OPS) and take
# their block sizes as arguments; the module names are Python entry points with the default blocks
# (a block size is a run-time value, never a global frozen into the compiled code).
_matmul_nn, _matmul_tn = matmul_nn, matmul_tn


def matmul_nn(out, a, b, rows=None, cols=None):  # noqa: F811
    """out (N, M) = a (N, K) @ b (K, M); rows / cols: block sizes (None: ROWS / COLS)."""
    pin_blas_to_one_thread()  # (as every launcher: a threaded BLAS inside the blocks' prange oversubscribes)
    _matmul_nn(out, a, b, ROWS if rows is None else int(rows), COLS if cols is None else int(cols))


def matmul_tn(out, a, b, rows=None):  # noqa: F811
    """out (M, K) = a (N, M).T @ b (N, K); rows: rows of out per block (None: ROWS)."""
    pin_blas_to_one_thread()
    _matmul_tn(out, a, b, ROWS if rows is None else int(rows))
