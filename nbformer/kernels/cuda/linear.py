"""Linear layers on CUDA: our own tiled SGEMM (no cuBLAS) with a fused bias/activation/residual epilogue.

The CUDA twin of kernels/cpu/linear.py (forward): same launcher signatures (outputs first), same
nn.Linear weight layout w (M, K), same activation codes and order of the epilogue:
    pre (N, M) = x (N, K) @ w.T + b        (written only by linear_forward_train)
    out (N, M) = act(pre) [+ residual]     (residual added after the activation)

Two kernels, each a family of compiled variants made by a factory and cached in a dict keyed by
its compile-time constants (tile sizes, activation, which epilogue inputs are present):
- tiled (N > few_rows): a block computes a BM x BN tile of out; the K loop stages x (BM x BK) and
  w (BN x BK) tiles in shared memory (stored k-major, padded by one column against bank conflicts),
  each of the (BM/TM)*(BN/TN) threads accumulates a TM x TN register tile (rows ty + i*BM/TM,
  columns tx + j*BN/TN: shared reads are broadcasts/conflict-free, global stores coalesced).
- few rows (N <= few_rows, decoding): memory-bound, every weight element read once from global
  memory. A block owns (threads/lanes)*cols output columns; a group of `lanes` threads owns `cols`
  columns and strides over K reading each weight row coalesced, while x (N rows, small) is staged
  in shared memory in K chunks of fr_kc. The lanes' partial sums are reduced with a fixed-order
  shared-memory tree (no float atomics, no shuffles: simulator-safe, same bits every run).
The row count N is a compile-time constant of a few-row variant (one variant per decoding batch
size), so the N x cols accumulators stay in registers.

Every variant accumulates in a fixed order: results are bit-identical from run to run. The tiled path
sums each output over k = 0, 1, ..., K-1 in order whatever the tiles, so its bits do not depend on BM,
BN, BK, TM, TN; the few-row path's order depends on fr_lanes (and on fr_kc unless it is a multiple of
fr_lanes). The two paths, and the CPU kernels, agree to rounding only.

Backward (linear_backward, the CPU twin's signature): g = dout * act'(pre) by an elementwise kernel
(into scratch; skipped for act='none'), then the same tiled kernel in two more layouts, dx = g @ w
(NN) and dw = g.T @ x (TN), with db fused into the dw GEMM: the blocks of its first column tile also
sum the staged g tiles over n. dx sums over m in order, dw over n in order, db in float64 over fixed
64-row chunks added in order (the CPU's chunks and order): no float atomics, no split of N, bits
independent of every backward tunable; db has the CPU's bits wherever g does (act none or relu).
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ._jit import SIMULATOR, blocks, cuda, device_function, kernel

ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3, 4
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU}

MAX_SHARED_BYTES = 48 * 1024  # static shared memory per block without opt-in
MAX_THREADS = 1024
MAX_GRID_Y = 65535

# Defaults. On a GPU: 64x64 output tiles, 256 threads with a 4x4 register tile each; few-row path for
# up to 16 rows, 256 threads = 8 groups of 32 lanes (one warp per group), 4 columns per group.
# Backward (linear_backward): the same tiles for its two GEMMs, dx_* (dx = g @ w) and dw_* (dw = g.T @ x,
# db fused in), bw_threads / bw_max_blocks for the activation-gradient kernel, db_cols x db_lanes
# threads for the bias-gradient kernel used when dw is not wanted.
# Under the simulator (one Python thread per CUDA thread) small blocks keep model tests fast; the
# launcher reads this dict at every call, so callers and the tuner may also override per call.
_BACKWARD_GPU = {"dx_BM": 64, "dx_BN": 64, "dx_BK": 16, "dx_TM": 4, "dx_TN": 4,
                 "dw_BM": 64, "dw_BN": 64, "dw_BK": 16, "dw_TM": 4, "dw_TN": 4,
                 "bw_threads": 256, "bw_max_blocks": 4096, "db_cols": 32, "db_lanes": 8}
_BACKWARD_SIM = {"dx_BM": 16, "dx_BN": 16, "dx_BK": 8, "dx_TM": 2, "dx_TN": 2,
                 "dw_BM": 16, "dw_BN": 16, "dw_BK": 8, "dw_TM": 2, "dw_TN": 2,
                 "bw_threads": 32, "bw_max_blocks": 4, "db_cols": 8, "db_lanes": 2}
if SIMULATOR:
    TUNABLES = {"BM": 16, "BN": 16, "BK": 8, "TM": 2, "TN": 2,
                "few_rows": 16, "fr_threads": 32, "fr_lanes": 8, "fr_cols": 2, "fr_kc": 64, **_BACKWARD_SIM}
else:
    TUNABLES = {"BM": 64, "BN": 64, "BK": 16, "TM": 4, "TN": 4,
                "few_rows": 16, "fr_threads": 256, "fr_lanes": 32, "fr_cols": 4, "fr_kc": 256, **_BACKWARD_GPU}
FORWARD_TUNABLES = ("BM", "BN", "BK", "TM", "TN", "few_rows", "fr_threads", "fr_lanes", "fr_cols", "fr_kc")
BACKWARD_TUNABLES = tuple(_BACKWARD_GPU)

# For the tuner: candidates on a GPU, and whether a tunable can change the result bits (see above).
_TILE_CANDIDATES = [dict(BM=64, BN=64, BK=16, TM=4, TN=4), dict(BM=128, BN=128, BK=8, TM=8, TN=8),
                    dict(BM=128, BN=64, BK=16, TM=8, TN=4), dict(BM=64, BN=64, BK=8, TM=8, TN=8),
                    dict(BM=32, BN=64, BK=16, TM=2, TN=4)]
CANDIDATES = {
    "tiled": _TILE_CANDIDATES,
    "few_rows": [dict(fr_threads=t, fr_lanes=32, fr_cols=c, fr_kc=256) for t in (128, 256) for c in (2, 4, 8)],
    "dx": [{f"dx_{k}": v for k, v in c.items()} for c in _TILE_CANDIDATES],
    "dw": [{f"dw_{k}": v for k, v in c.items()} for c in _TILE_CANDIDATES],
}
# Backward: every GEMM output is summed over its reduced dimension in order (dx over m, dw over n),
# db over fixed DB_ROWS-row chunks in order, whatever the tiles and threads: no backward tunable
# changes the bits.
BIT_CHANGING = {"BM": False, "BN": False, "BK": False, "TM": False, "TN": False, "few_rows": True,
                "fr_threads": False, "fr_cols": False, "fr_lanes": True, "fr_kc": True,
                **{k: False for k in _BACKWARD_GPU}}
DB_ROWS = 64  # db: float64 partial sums over fixed 64-row chunks (kernels/cpu/linear.py's ROWS_PER_CHUNK)

# float32 constants (a Python float literal would promote the kernel's arithmetic to float64)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FHALF = np.float32(0.5)
_F_RSQRT2 = np.float32(1.0 / math.sqrt(2.0))
_F_K0 = np.float32(math.sqrt(2.0 / math.pi))
_F_K1 = np.float32(0.044715)


@device_function
def _activate(v, act):
    """act(v) in float32, the CPU formulas (kernels/cpu/linear.py `activate`); NaN propagates."""
    if act == ACT_RELU:
        return _F0 if v <= _F0 else v
    if act == ACT_GELU:
        return _FHALF * v * (_F1 + math.erf(v * _F_RSQRT2))
    if act == ACT_GELU_TANH:
        return _FHALF * v * (_F1 + math.tanh(_F_K0 * (v + _F_K1 * v * v * v)))
    if act == ACT_SILU:
        # exp of a non-positive argument only: no overflow for large |v|
        if v >= _F0:
            return v / (_F1 + math.exp(-v))
        e = math.exp(v)
        return v * e / (_F1 + e)
    return v


# ---------------------------------------------------------------- tiled SGEMM
_TILED = {}


def _tiled_kernel(BM, BN, BK, TM, TN, act, use_bias, use_res, keep_pre, a_kmajor=False, b_kmajor=False,
                  col_sums=False):
    """The tiled variant for these compile-time constants (made once, then from the dict).

    One GEMM out (R, S) = A (R, T) @ B (T, S) for the three layouts of a linear layer, with the sum
    over t = 0, 1, ..., T-1 in order (bits independent of the tiles):
      forward  out = x @ w.T   A = x (N, K) as stored,           B = w (M, K) stored (S, T)
      dx       dx  = g @ w     A = g (N, M) as stored,           B = w (M, K) stored (T, S): b_kmajor
      dw       dw  = g.T @ x   A = g (N, M) stored (T, R): a_kmajor, B = x (N, K) stored (T, S): b_kmajor
    col_sums (dw only): the blocks of the first column tile also sum the staged A tile over t, the
    bias gradient db[r] = sum_t A[r, t], written into `b`: float64 partials over fixed chunks of
    DB_ROWS values of t, added in order (kernels/cpu/linear.py's order and chunk, so its bits for
    the same g).

    Only plain ints and bools are captured by the closure: numba-cuda's disk cache (cache=True) keys
    a closure by a hash of its pickled cell contents, stable across processes for them; device
    functions are module globals of this file, which the cache's source stamp (mtime, size) covers.
    """
    key = (BM, BN, BK, TM, TN, act, use_bias, use_res, keep_pre, a_kmajor, b_kmajor, col_sums)
    fn = _TILED.get(key)
    if fn is not None:
        return fn
    TX = BN // TN  # threads along the output columns
    TY = BM // TM  # threads along the rows
    THREADS = TX * TY
    XS = (BK, BM + 1)  # k-major, padded: the transposing stores do not all hit one bank
    WS = (BK, BN + 1)
    REG = TM * TN
    XLOAD, WLOAD = BM * BK, BN * BK
    XQ, WQ = (XLOAD + THREADS - 1) // THREADS, (WLOAD + THREADS - 1) // THREADS
    ACT, BIAS, RES, PRE = act, use_bias, use_res, keep_pre
    AKM, BKM, CSUM = a_kmajor, b_kmajor, col_sums
    DBQ = (BM + THREADS - 1) // THREADS  # column-sum rows per thread (col_sums)
    DBR = DB_ROWS

    @kernel(cache=True)
    def linear_tiled(out, pre, x, w, b, res):
        # out, pre, res (N, M) = (R, S); x = A, w = B (layouts above); b (M,): the bias, or db (col_sums).
        # Block (bx, by) -> out[by*BM:, bx*BN:].
        N = out.shape[0]
        M = out.shape[1]
        K = x.shape[0] if AKM else x.shape[1]  # the summed dimension T
        xs = cuda.shared.array(XS, np.float32)
        ws = cuda.shared.array(WS, np.float32)
        acc = cuda.local.array(REG, np.float32)
        av = cuda.local.array(TM, np.float32)
        bv = cuda.local.array(TN, np.float32)
        dch = cuda.local.array(DBQ, np.float64)  # col_sums: this chunk's partial sums, and their total
        dtot = cuda.local.array(DBQ, np.float64)
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        row0 = cuda.blockIdx.y * BM
        col0 = cuda.blockIdx.x * BN
        sums = CSUM and cuda.blockIdx.x == 0
        for e in range(REG):
            acc[e] = _F0
        for q in range(DBQ):
            dch[q] = 0.0
            dtot[q] = 0.0
        for k0 in range(0, K, BK):
            # stage the tiles k-major; consecutive threads read consecutive addresses (coalesced): along
            # t of one row for a layout stored (R, T) / (S, T), along the row for one stored (T, R) / (T, S)
            for q in range(XQ):
                e = tid + q * THREADS
                if e < XLOAD:
                    if AKM:
                        kk = e // BM
                        r = e - kk * BM
                    else:
                        r = e // BK
                        kk = e - r * BK
                    v = _F0
                    if row0 + r < N and k0 + kk < K:
                        if AKM:
                            v = x[k0 + kk, row0 + r]
                        else:
                            v = x[row0 + r, k0 + kk]
                    xs[kk, r] = v
            for q in range(WQ):
                e = tid + q * THREADS
                if e < WLOAD:
                    if BKM:
                        kk = e // BN
                        c = e - kk * BN
                    else:
                        c = e // BK
                        kk = e - c * BK
                    v = _F0
                    if col0 + c < M and k0 + kk < K:
                        if BKM:
                            v = w[k0 + kk, col0 + c]
                        else:
                            v = w[col0 + c, k0 + kk]
                    ws[kk, c] = v
            cuda.syncthreads()
            if sums:  # db over the staged A tile, t in order, chunks of DBR
                for q in range(DBQ):
                    r = tid + q * THREADS
                    if r < BM:
                        for kk in range(BK):
                            t = k0 + kk
                            if t < K:
                                if t > 0 and t % DBR == 0:
                                    dtot[q] += dch[q]
                                    dch[q] = 0.0
                                dch[q] += float64(xs[kk, r])
            for kk in range(BK):
                for i in range(TM):
                    av[i] = xs[kk, ty + i * TY]
                for j in range(TN):
                    bv[j] = ws[kk, tx + j * TX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i * TN + j] += av[i] * bv[j]
            cuda.syncthreads()  # before the next tiles overwrite xs, ws
        # fused epilogue: bias, pre, activation, residual (read before out is written: may alias)
        for i in range(TM):
            r = row0 + ty + i * TY
            if r < N:
                for j in range(TN):
                    c = col0 + tx + j * TX
                    if c < M:
                        v = acc[i * TN + j]
                        if BIAS:
                            v += b[c]
                        if PRE:
                            pre[r, c] = v
                        v = _activate(v, ACT)
                        if RES:
                            v += res[r, c]
                        out[r, c] = v
        if sums:
            for q in range(DBQ):
                r = tid + q * THREADS
                if r < BM and row0 + r < N:
                    b[row0 + r] = float32(dtot[q] + dch[q])

    _TILED[key] = linear_tiled
    return linear_tiled


def tiled_config(BM, BN, BK, TM, TN, prefix="", **_):
    """(threads per block, shared bytes) of a tiled configuration; GraphError when it is invalid.

    prefix names the tunables in the messages ("dx_", "dw_" for the backward GEMMs)."""
    for name, v in (("BM", BM), ("BN", BN), ("BK", BK), ("TM", TM), ("TN", TN)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise GraphError(f"linear (cuda): tunable {prefix}{name}={v!r}, expected a positive int")
    P = prefix
    if BM % TM or BN % TN:
        raise GraphError(f"linear (cuda): tiles {P}BM={BM}, {P}BN={BN} must be multiples of the register tile "
                         f"{P}TM={TM}, {P}TN={TN}")
    threads = (BM // TM) * (BN // TN)
    smem = 4 * BK * ((BM + 1) + (BN + 1))
    if threads > MAX_THREADS:
        raise GraphError(f"linear (cuda): tiles {P}BM={BM}, {P}BN={BN}, {P}TM={TM}, {P}TN={TN} need {threads} "
                         f"threads per block, at most {MAX_THREADS}")
    if smem > MAX_SHARED_BYTES:
        raise GraphError(f"linear (cuda): tiles {P}BM={BM}, {P}BN={BN}, {P}BK={BK} need {smem} bytes of shared "
                         f"memory per block, at most {MAX_SHARED_BYTES}")
    return threads, smem


# ---------------------------------------------------------------- few rows (decoding)
_FEW = {}


def _few_rows_kernel(ROWS, THREADS, LANES, COLS, KC, act, use_bias, use_res, keep_pre):
    """The few-row variant for exactly ROWS rows (plain ints/bools captured, as in _tiled_kernel)."""
    key = (ROWS, THREADS, LANES, COLS, KC, act, use_bias, use_res, keep_pre)
    fn = _FEW.get(key)
    if fn is not None:
        return fn
    GROUPS = THREADS // LANES
    BCOLS = GROUPS * COLS  # output columns per block
    XS = ROWS * KC  # x[:, k0:k0 + KC], row-major
    RED = (ROWS, THREADS)
    NACC = ROWS * COLS
    XQ = (XS + THREADS - 1) // THREADS
    HALF = LANES // 2  # the tree's first stride (LANES is a power of two)
    ACT, BIAS, RES, PRE = act, use_bias, use_res, keep_pre

    @kernel(cache=True)
    def linear_few_rows(out, pre, x, w, b, res):
        # out, pre, res (ROWS, M); x (ROWS, K); w (M, K); b (M,). Group g of block bx owns the COLS
        # columns bx*BCOLS + g*COLS + c; its lanes stride over K.
        K = x.shape[1]
        M = w.shape[0]
        xs = cuda.shared.array(XS, np.float32)
        red = cuda.shared.array(RED, np.float32)
        acc = cuda.local.array(NACC, np.float32)
        wa = cuda.local.array(COLS, np.float32)
        wb = cuda.local.array(COLS, np.float32)
        tid = cuda.threadIdx.x
        g = tid // LANES
        lane = tid - g * LANES
        c0 = cuda.blockIdx.x * BCOLS + g * COLS
        for e in range(NACC):
            acc[e] = _F0
        for k0 in range(0, K, KC):
            kn = min(KC, K - k0)
            for q in range(XQ):  # stage x[:, k0:k0 + kn] (coalesced along k)
                e = tid + q * THREADS
                if e < XS:
                    r = e // KC
                    kk = e - r * KC
                    if kk < kn:
                        xs[e] = x[r, k0 + kk]
            cuda.syncthreads()
            # The lanes of a group read weight rows coalesced, each lane k = lane, lane + LANES, ...
            # (the same order per accumulator on both branches). A full group loads 2 * COLS weights
            # before it uses any (no guard between them), so that many loads are in flight per warp.
            if c0 + COLS <= M:
                kk = lane
                while kk + LANES < kn:
                    for c in range(COLS):
                        wa[c] = w[c0 + c, k0 + kk]
                        wb[c] = w[c0 + c, k0 + kk + LANES]
                    for c in range(COLS):
                        for r in range(ROWS):
                            acc[r * COLS + c] += xs[r * KC + kk] * wa[c]
                    for c in range(COLS):
                        for r in range(ROWS):
                            acc[r * COLS + c] += xs[r * KC + kk + LANES] * wb[c]
                    kk += 2 * LANES
                if kk < kn:
                    for c in range(COLS):
                        wa[c] = w[c0 + c, k0 + kk]
                    for c in range(COLS):
                        for r in range(ROWS):
                            acc[r * COLS + c] += xs[r * KC + kk] * wa[c]
            else:  # the last, partial group of columns
                for kk in range(lane, kn, LANES):
                    for c in range(COLS):
                        if c0 + c < M:
                            wv = w[c0 + c, k0 + kk]
                            for r in range(ROWS):
                                acc[r * COLS + c] += xs[r * KC + kk] * wv
            cuda.syncthreads()  # before the next chunk overwrites xs
        for c in range(COLS):
            for r in range(ROWS):
                red[r, tid] = acc[r * COLS + c]
            cuda.syncthreads()
            s = HALF
            while s > 0:  # fixed-order tree over the lanes of each group: strides LANES/2, ..., 1
                if lane < s:
                    for r in range(ROWS):
                        red[r, tid] += red[r, tid + s]
                cuda.syncthreads()
                s //= 2
            col = c0 + c
            if col < M:
                for r in range(lane, ROWS, LANES):  # lanes share the epilogue of the rows
                    v = red[r, tid - lane]
                    if BIAS:
                        v += b[col]
                    if PRE:
                        pre[r, col] = v
                    v = _activate(v, ACT)
                    if RES:
                        v += res[r, col]
                    out[r, col] = v
            cuda.syncthreads()  # before red is overwritten for the next column

    _FEW[key] = linear_few_rows
    return linear_few_rows


def few_rows_config(rows, fr_threads, fr_lanes, fr_cols, fr_kc, **_):
    """(threads per block, columns per block, shared bytes) of a few-row configuration; GraphError if invalid."""
    for name, v in (("fr_threads", fr_threads), ("fr_lanes", fr_lanes), ("fr_cols", fr_cols), ("fr_kc", fr_kc)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise GraphError(f"linear (cuda): tunable {name}={v!r}, expected a positive int")
    if fr_lanes & (fr_lanes - 1):
        raise GraphError(f"linear (cuda): tunable fr_lanes={fr_lanes}, expected a power of two")
    if fr_threads % fr_lanes:
        raise GraphError(f"linear (cuda): fr_threads={fr_threads} must be a multiple of fr_lanes={fr_lanes}")
    if fr_threads > MAX_THREADS:
        raise GraphError(f"linear (cuda): fr_threads={fr_threads}, at most {MAX_THREADS}")
    smem = 4 * rows * (fr_kc + fr_threads)
    if smem > MAX_SHARED_BYTES:
        raise GraphError(f"linear (cuda): the few-row path for {rows} rows with fr_kc={fr_kc}, "
                         f"fr_threads={fr_threads} needs {smem} bytes of shared memory per block, at most "
                         f"{MAX_SHARED_BYTES} (lower fr_kc or few_rows)")
    return fr_threads, (fr_threads // fr_lanes) * fr_cols, smem


# ---------------------------------------------------------------- launchers
def _tunables(op, overrides):
    unknown = sorted(set(overrides) - set(TUNABLES))
    if unknown:
        raise GraphError(f"{op}: unknown tunable(s) {unknown}, expected some of {sorted(TUNABLES)}")
    t = {**TUNABLES, **overrides}
    # plain ints in the variant keys (np.int64 tunables from a tuner's cache would make equal keys anyway)
    return {k: int(v) if isinstance(v, np.integer) else v for k, v in t.items()}


def _check(op, name, a, shape):
    """a must be a C-contiguous float32 CUDA device array (of shape, unless None); else GraphError."""
    if isinstance(a, np.ndarray) or not (hasattr(a, "is_c_contiguous") and hasattr(a, "copy_to_host")):
        raise GraphError(f"{op}: '{name}' must be a CUDA device array (numba.cuda.to_device or the device "
                         f"layer's upload), got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != np.float32:
        raise GraphError(f"{op}: '{name}' has dtype {a.dtype}, expected float32")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise GraphError(f"{op}: '{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.is_c_contiguous():
        raise GraphError(f"{op}: '{name}' (shape {tuple(a.shape)}) must be C-contiguous")


def _launch(op, out, pre, x, w, b, act, residual, tunables):
    _check(op, "x", x, None)
    xshape, wshape = tuple(x.shape), tuple(w.shape)  # plain tuples: a device shape rejects [-1]
    if len(xshape) < 1:
        raise GraphError(f"{op}: 'x' must have shape (..., K), got a 0-d array")
    _check(op, "w", w, None)
    K = int(xshape[-1])
    if len(wshape) != 2 or int(wshape[1]) != K:
        raise GraphError(f"{op}: 'w' has shape {wshape}, expected (M, {K}) (nn.Linear layout)")
    M = int(wshape[0])
    oshape = xshape[:-1] + (M,)
    _check(op, "out", out, oshape)
    keep_pre = pre is not None
    if keep_pre:
        _check(op, "pre", pre, oshape)
    use_bias, use_res = b is not None, residual is not None
    if use_bias:
        _check(op, "b", b, (M,))
    if use_res:
        _check(op, "residual", residual, oshape)
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    code = ACT_CODES[act]
    t = _tunables(op, tunables)
    N = math.prod(xshape[:-1])
    few = N <= t["few_rows"]
    # validate the configuration that will run (the other one need not fit these shapes)
    if few:
        threads, bcols, _ = few_rows_config(max(N, 1), **t)
    else:
        threads, _ = tiled_config(**t)
        if blocks(N, t["BM"]) > MAX_GRID_Y:
            raise GraphError(f"{op}: {N} rows need {blocks(N, t['BM'])} row tiles of BM={t['BM']}, at most "
                             f"{MAX_GRID_Y} (raise BM)")
    if N == 0 or M == 0:
        return
    out2, x2 = out.reshape(N, M), x.reshape(N, K)
    pre2 = pre.reshape(N, M) if keep_pre else out2  # unused stand-ins keep one signature per variant
    res2 = residual.reshape(N, M) if use_res else out2
    b1 = b if use_bias else out2.reshape(N * M)
    if few:
        fn = _few_rows_kernel(N, t["fr_threads"], t["fr_lanes"], t["fr_cols"], t["fr_kc"], code,
                              use_bias, use_res, keep_pre)
        fn[blocks(M, bcols), threads](out2, pre2, x2, w, b1, res2)
    else:
        fn = _tiled_kernel(t["BM"], t["BN"], t["BK"], t["TM"], t["TN"], code, use_bias, use_res, keep_pre)
        fn[(blocks(M, t["BN"]), blocks(N, t["BM"])), threads](out2, pre2, x2, w, b1, res2)


def linear_forward(out, x, w, b=None, act="none", residual=None, **tunables):
    """out (..., M) = act(x (..., K) @ w.T + b) [+ residual (..., M)]; w (M, K) in nn.Linear layout.

    All arguments are C-contiguous float32 CUDA device arrays (views into an arena are fine).
    out may alias residual (each element's residual is read by the thread that then writes it),
    never x or w. Keyword tunables override TUNABLES for this call (BM, BN, BK, TM, TN, few_rows,
    fr_threads, fr_lanes, fr_cols, fr_kc). Asynchronous: launched on the default stream.
    """
    _launch("linear_forward", out, None, x, w, b, act, residual, tunables)


def linear_forward_train(out, pre, x, w, b=None, act="none", residual=None, **tunables):
    """As linear_forward, and also writes pre (..., M) = x @ w.T + b (before the activation) for backward.

    out (..., M) = act(pre) [+ residual]; pre must not alias x, w, out or residual.
    """
    _launch("linear_forward_train", out, pre, x, w, b, act, residual, tunables)


# ================================================================ backward (training)
# linear_backward: g = dout * act'(pre) (one elementwise kernel into scratch, skipped for act='none'),
# dx = g @ w and dw = g.T @ x on the tiled kernel above (layouts NN and TN), db fused into the dw GEMM
# (its first column of blocks sums the staged g tiles), or, without dw, a column-sum kernel with the
# same order. Three launches at most; no float atomics; bits independent of every tunable.
_F2 = np.float32(2.0)
_F3 = np.float32(3.0)
_F_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))


@device_function
def _activate_grad(v, act):
    """d act(v) / dv in float32: kernels/cpu/linear.py's float32 formulas (gelu_tanh as torch's
    approximate='tanh' backward), with CUDA's expf / erfcf for its polynomial exp2 / erfc fit."""
    if act == ACT_GELU:
        # Phi(v) + v phi(v); Phi from erfc (no cancellation for negative v)
        erfc = math.erfc(abs(v) * _F_RSQRT2)
        cdf = _F1 - _FHALF * erfc if v >= _F0 else _FHALF * erfc
        return cdf + v * math.exp(-_FHALF * v * v) * _F_INV_SQRT_2PI
    if act == ACT_GELU_TANH:
        # tanh(u) from exp of a non-positive argument
        u = _F_K0 * (v + _F_K1 * v * v * v)
        t = math.exp(-_F2 * abs(u))
        th = (_F1 - t) / (_F1 + t)
        if u < _F0:
            th = -th
        return _FHALF * (_F1 + th) + _FHALF * v * (_F1 - th * th) * _F_K0 * (_F1 + _F3 * _F_K1 * v * v)
    if act == ACT_SILU:
        # d/dv v s(v) = s (1 + v (1 - s)); the sigmoid from exp of a non-positive argument
        t = math.exp(-abs(v))
        sg = _F1 / (_F1 + t)
        if v < _F0:
            sg = sg * t
        return sg * (_F1 + v * (_F1 - sg))
    return _F1


_ACT_GRAD = {}


def _act_grad_kernel(act):
    """g = dout * act'(pre) over flat arrays (grid-stride); relu as the CPU's: dout where pre > 0, else 0."""
    fn = _ACT_GRAD.get(act)
    if fn is not None:
        return fn
    ACT = act

    @kernel(cache=True)
    def linear_act_grad(g, dout, pre):
        n = g.shape[0]
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            if ACT == ACT_RELU:
                g[i] = dout[i] if pre[i] > _F0 else _F0
            else:
                g[i] = dout[i] * _activate_grad(pre[i], ACT)

    _ACT_GRAD[act] = linear_act_grad
    return linear_act_grad


@kernel(cache=True)
def _col_sums_kernel(db, g, cols):
    # db (M,) = column sums of g (N, M): float64 partials over fixed DB_ROWS-row chunks, added in chunk
    # order (the order of the sums fused into the dw GEMM, so the same bits). Block bx owns columns
    # bx*cols + j (j = tid % cols); its blockDim/cols lanes take chunks lane, lane + lanes, ... in rounds,
    # and lane 0 adds each round's partials in order. sh: 8 * blockDim bytes of dynamic shared memory.
    sh = cuda.shared.array(0, float64)
    N = g.shape[0]
    M = g.shape[1]
    tid = cuda.threadIdx.x
    lanes = cuda.blockDim.x // cols
    lane = tid // cols
    j = tid - lane * cols
    c = cuda.blockIdx.x * cols + j
    nchunk = (N + DB_ROWS - 1) // DB_ROWS
    tot = 0.0
    for base in range(0, nchunk, lanes):
        k = base + lane
        p = 0.0
        if c < M and k < nchunk:
            for i in range(k * DB_ROWS, min(N, (k + 1) * DB_ROWS)):
                p += float64(g[i, c])
        sh[tid] = p
        cuda.syncthreads()
        if lane == 0 and c < M:
            for q in range(min(lanes, nchunk - base)):
                tot += sh[q * cols + j]
        cuda.syncthreads()  # before the next round overwrites sh
    if lane == 0 and c < M:
        db[c] = float32(tot)


def _positive(op, t, names):
    for name in names:
        v = t[name]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise GraphError(f"{op}: tunable {name}={v!r}, expected a positive int")


def _gemm_tiles(op, t, prefix, rows):
    """(BM, BN, BK, TM, TN), threads of a backward GEMM from the prefixed tunables, checked."""
    tiles = tuple(t[prefix + k] for k in ("BM", "BN", "BK", "TM", "TN"))
    threads, _ = tiled_config(*tiles, prefix=prefix)
    if blocks(rows, tiles[0]) > MAX_GRID_Y:
        raise GraphError(f"{op}: {rows} rows need {blocks(rows, tiles[0])} row tiles of {prefix}BM={tiles[0]}, "
                         f"at most {MAX_GRID_Y} (raise {prefix}BM)")
    return tiles, threads


def linear_backward(dx, dw, db, dout, x, w, pre=None, act="none", scratch=None, **tunables):
    """Backward of out = act(pre), pre = x @ w.T + b (w (M, K) in nn.Linear layout); the CUDA twin of
    kernels/cpu/linear.py's linear_backward.

    g = dout * act'(pre) (fused; pre (..., M) is the saved pre-activation, unused for act='none');
    dx (..., K) = g @ w, dw (M, K) = g.T @ x, db (M,) = column sums of g. All written, not accumulated;
    dx, dw and db may each be None (skipped). scratch (N*M float32 elements, C-contiguous, any shape)
    holds g when act != 'none' (allocated per call if None: pass it); dout is left intact.

    Device arrays, float32, C-contiguous. dx, dw, db and scratch must not alias each other or any input.
    Deterministic: dx sums over m in order, dw over n in order, db over fixed 64-row chunks (float64
    partials) in order, whatever the tunables (dx_*, dw_* tiles; bw_threads, bw_max_blocks; db_cols,
    db_lanes). Asynchronous: launched on the default stream.
    """
    op = "linear_backward"
    _check(op, "x", x, None)
    xshape = tuple(x.shape)
    if len(xshape) < 1:
        raise GraphError(f"{op}: 'x' must have shape (..., K), got a 0-d array")
    _check(op, "w", w, None)
    K = int(xshape[-1])
    wshape = tuple(w.shape)
    if len(wshape) != 2 or int(wshape[1]) != K:
        raise GraphError(f"{op}: 'w' has shape {wshape}, expected (M, {K}) (nn.Linear layout)")
    M = int(wshape[0])
    oshape = xshape[:-1] + (M,)
    _check(op, "dout", dout, oshape)
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    code = ACT_CODES[act]
    use_dx, use_dw, use_db = dx is not None, dw is not None, db is not None
    if use_dx:
        _check(op, "dx", dx, xshape)
    if use_dw:
        _check(op, "dw", dw, (M, K))
    if use_db:
        _check(op, "db", db, (M,))
    N = math.prod(xshape[:-1])
    if code != ACT_NONE:
        if pre is None:
            raise GraphError(f"{op}: 'pre' (the saved pre-activation) is required for act={act!r}")
        _check(op, "pre", pre, oshape)
        if scratch is not None:
            _check(op, "scratch", scratch, None)
            if int(scratch.size) != N * M:
                raise GraphError(f"{op}: 'scratch' has {int(scratch.size)} elements, expected {N * M} ({oshape})")
    unknown = sorted(set(tunables) - set(BACKWARD_TUNABLES))
    if unknown:
        raise GraphError(f"{op}: unknown tunable(s) {unknown}, expected some of {sorted(BACKWARD_TUNABLES)}")
    t = _tunables(op, tunables)
    # validate what will run (the configurations of skipped kernels need not fit)
    if use_dx:
        dx_tiles, dx_threads = _gemm_tiles(op, t, "dx_", N)
    if use_dw:
        dw_tiles, dw_threads = _gemm_tiles(op, t, "dw_", M)
    if code != ACT_NONE:
        _positive(op, t, ("bw_threads", "bw_max_blocks"))
        if t["bw_threads"] > MAX_THREADS:
            raise GraphError(f"{op}: tunable bw_threads={t['bw_threads']}, at most {MAX_THREADS}")
    if use_db and not use_dw:
        _positive(op, t, ("db_cols", "db_lanes"))
        if t["db_cols"] * t["db_lanes"] > MAX_THREADS:
            raise GraphError(f"{op}: db_cols={t['db_cols']} x db_lanes={t['db_lanes']} threads per block, "
                             f"at most {MAX_THREADS}")

    dout2 = dout.reshape(N, M)
    g2 = dout2
    if code != ACT_NONE and N * M > 0:
        if scratch is None:
            g2 = cuda.device_array((N, M), np.float32)
        else:
            g2 = scratch.reshape(N, M)
        threads = t["bw_threads"]
        fn = _act_grad_kernel(code)
        fn[min(blocks(N * M, threads), t["bw_max_blocks"]), threads](
            g2.reshape(N * M), dout2.reshape(N * M), pre.reshape(N * M))
    if use_dx and N * K > 0:  # dx (N, K) = g (N, M) @ w (M, K); M = 0 writes zeros
        BM, BN, BK, TM, TN = dx_tiles
        dx2 = dx.reshape(N, K)
        fn = _tiled_kernel(BM, BN, BK, TM, TN, ACT_NONE, False, False, False, False, True, False)
        fn[(blocks(K, BN), blocks(N, BM)), dx_threads](dx2, dx2, g2, w, dx2.reshape(N * K), dx2)
    if use_dw and M > 0:  # dw (M, K) = g.T (M, N) @ x (N, K) (N = 0 writes zeros), db fused
        BM, BN, BK, TM, TN = dw_tiles
        x2 = x.reshape(N, K)
        fn = _tiled_kernel(BM, BN, BK, TM, TN, ACT_NONE, False, False, False, True, True, use_db)
        fn[(blocks(K, BN), blocks(M, BM)), dw_threads](dw, dw, g2, x2, db if use_db else dw.reshape(M * K), dw)
    elif use_db and M > 0:
        cols, lanes = t["db_cols"], t["db_lanes"]
        lanes = max(1, min(lanes, blocks(N, DB_ROWS)))  # no idle lanes (not bit-changing)
        _col_sums_kernel[blocks(M, cols), cols * lanes, 0, 8 * cols * lanes](db, g2, cols)
