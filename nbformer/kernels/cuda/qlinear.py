"""Linear layers on weights kept quantized, on CUDA: the twin of kernels/cpu/qlinear.py.

Same launchers and signatures: qlinear_forward(out, x, wq, qtype, b, act, residual) and
qlinear_glu_forward(out, x, wq, qtype, b, act); wq (M, K/32 * block_bytes) uint8 holds the ggml
blocks (Q8_0 / Q4_0 / Q4_1) as they are, one row per output column.

One kernel family (variants keyed by format, rows per block, threads, activation and which
epilogue inputs exist): a block owns one output column j (a gated FFN: gate row j and up row
F + j) and ROWS rows of x. Its threads stride over the weight row's bytes (Q8_0: one weight per
byte; Q4: two, weight t and t + 16 of a block), so consecutive threads read consecutive bytes;
each dequantizes in registers (the fp16 scale decoded arithmetically: simulator-safe) and keeps
ROWS partial sums. The partials are reduced by a fixed-order shared-memory tree (no atomics, no
shuffles: the same bits every run), then one thread per row applies the epilogue (bias,
activation, residual; GLU: act(gate) * up). Memory-bound at few rows, which is what decoding is;
many rows re-read the weight row from L2 once per ROWS rows.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32

from ...errors import GraphError
from ...quant.formats import QK, QTYPES
from ._jit import SIMULATOR, blocks, cuda, device_function, kernel
from .linear import ACT_CODES, _activate, _check

if SIMULATOR:
    TUNABLES = {"rows": 2, "threads": 8}
else:
    TUNABLES = {"rows": 4, "threads": 128}
CANDIDATES = [dict(rows=r, threads=t) for r in (1, 2, 4, 8) for t in (64, 128, 256)]
BIT_CHANGING = ("threads",)  # the reduction tree's shape; rows only groups the work


@device_function
def _half(lo, hi):
    """float32 value of the IEEE half with bytes lo, hi (little-endian)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    f = h & 1023
    if e == 0:
        v = float32(f) * float32(5.960464477539063e-08)  # 2^-24: subnormals
    elif e == 31:
        v = float32(math.inf) if f == 0 else float32(math.nan)
    else:
        v = float32(1024 + f) * float32(math.pow(2.0, e - 25))
    return -v if (h >> 15) & 1 else v


_VARIANTS = {}


def _qkernel(code, ROWS, THREADS, act, use_bias, use_res, glu):
    key = (code, ROWS, THREADS, act, use_bias, use_res, glu)
    fn = _VARIANTS.get(key)
    if fn is not None:
        return fn
    BB = QTYPES[("q8_0", "q4_0", "q4_1")[code]].block_bytes
    PER = 32 if code == 0 else 16  # bytes of codes per block
    OFF = 2 if code != 2 else 4  # where the codes start in a block
    NP = 2 if glu else 1
    SH = ROWS * NP * THREADS

    @kernel(cache=True)
    def qlinear(out, x, wq, b, residual):
        # out (N, Mo); x (N, K); wq (Mw, K/32 * BB) uint8; b (Mo or 2 Mo,); residual (N, Mo)
        j = cuda.blockIdx.x
        r0 = cuda.blockIdx.y * ROWS
        t = cuda.threadIdx.x
        N, Mo = out.shape
        K = x.shape[1]
        units = (K // QK) * PER
        part = cuda.shared.array(SH, float32)
        acc = cuda.local.array(ROWS * NP, float32)
        for a in range(ROWS * NP):
            acc[a] = float32(0.0)
        for p in range(NP):
            row = j + p * Mo
            u = t
            while u < units:
                blk = u // PER
                o = blk * BB
                d = _half(wq[row, o], wq[row, o + 1])
                q = np.int32(wq[row, o + OFF + u - blk * PER])
                k0 = blk * QK + u - blk * PER
                if code == 0:
                    w0 = d * float32(q - ((q & 128) << 1))
                    for r in range(ROWS):
                        if r0 + r < N:
                            acc[p * ROWS + r] += x[r0 + r, k0] * w0
                else:
                    m = _half(wq[row, o + 2], wq[row, o + 3]) if code == 2 else float32(-8.0) * d
                    w0 = d * float32(q & 15) + m
                    w1 = d * float32(q >> 4) + m
                    for r in range(ROWS):
                        if r0 + r < N:
                            acc[p * ROWS + r] += x[r0 + r, k0] * w0 + x[r0 + r, k0 + 16] * w1
                u += THREADS
        for a in range(ROWS * NP):
            part[a * THREADS + t] = acc[a]
        cuda.syncthreads()
        s = THREADS // 2
        while s > 0:  # fixed-order tree over the threads
            if t < s:
                for a in range(ROWS * NP):
                    part[a * THREADS + t] += part[a * THREADS + t + s]
            cuda.syncthreads()
            s //= 2
        if t < ROWS and r0 + t < N:
            i = r0 + t
            v = part[t * THREADS]
            if use_bias:
                v += b[j]
            if glu:
                u2 = part[(ROWS + t) * THREADS]
                if use_bias:
                    u2 += b[Mo + j]
                out[i, j] = _activate(v, act) * u2
            else:
                v = _activate(v, act)
                if use_res:
                    v += residual[i, j]
                out[i, j] = v

    _VARIANTS[key] = qlinear
    return qlinear


def _check_wq(op, wq, K, t):
    if isinstance(wq, np.ndarray) or not hasattr(wq, "copy_to_host"):
        raise GraphError(f"{op}: 'wq' must be a CUDA device array, got {type(wq).__name__}")
    rb = (K // QK) * t.block_bytes
    if wq.dtype != np.uint8 or len(wq.shape) != 2 or int(wq.shape[1]) != rb:
        raise GraphError(f"{op}: 'wq' is {wq.dtype}{tuple(wq.shape)}, expected uint8 (M, {rb}): "
                         f"{t.name.upper()} rows of K = {K} weights")
    if not wq.is_c_contiguous():
        raise GraphError(f"{op}: 'wq' must be C-contiguous")


def _launch(op, out, x, wq, qtype, b, act, residual, glu, tunables):
    t = QTYPES.get(str(qtype).lower())
    if t is None:
        raise GraphError(f"{op}: 'qtype' is {qtype!r}, expected one of {sorted(QTYPES)}")
    _check(op, "x", x, None)
    xshape = tuple(x.shape)
    K = int(xshape[-1])
    if K == 0 or K % QK:
        raise GraphError(f"{op}: 'x' has {K} features; {t.name.upper()} weights need a multiple of {QK}")
    _check_wq(op, wq, K, t)
    Mw = int(wq.shape[0])
    if glu and Mw % 2:
        raise GraphError(f"{op}: 'wq' has {Mw} rows; a fused gate|up weight has an even number")
    Mo = Mw // 2 if glu else Mw
    oshape = xshape[:-1] + (Mo,)
    _check(op, "out", out, oshape)
    use_bias, use_res = b is not None, residual is not None
    if use_bias:
        _check(op, "b", b, (Mw,))
    if use_res:
        _check(op, "residual", residual, oshape)
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    unknown = sorted(set(tunables) - set(TUNABLES))
    if unknown:
        raise GraphError(f"{op}: unknown tunable(s) {unknown}, expected some of {sorted(TUNABLES)}")
    tun = {**TUNABLES, **tunables}
    rows, threads = int(tun["rows"]), int(tun["threads"])
    if rows < 1 or threads < 1 or threads & (threads - 1) or threads > 1024 or threads < rows:
        raise GraphError(f"{op}: threads = {threads} must be a power of two in [rows, 1024], rows = {rows} >= 1")
    N = math.prod(xshape[:-1])
    if N == 0 or Mo == 0:
        return
    out2, x2 = out.reshape(N, Mo), x.reshape(N, K)
    fn = _qkernel(t.code, rows, threads, ACT_CODES[act], use_bias, use_res, glu)
    fn[(Mo, blocks(N, rows)), threads](out2, x2, wq, b if use_bias else out2.reshape(N * Mo),
                                       residual.reshape(N, Mo) if use_res else out2)


def qlinear_forward(out, x, wq, qtype, b=None, act="none", residual=None, **tunables):
    """out (..., M) = act(x @ W.T + b) [+ residual], W the quantized (M, K) weight with ggml bytes wq.
    Device arrays (views into an arena are fine); out may alias residual, never x."""
    _launch("qlinear_forward", out, x, wq, qtype, b, act, residual, False, tunables)


def qlinear_glu_forward(out, x, wq, qtype, b=None, act="silu", **tunables):
    """out (..., F) = act(x @ Wg.T + bg) * (x @ Wu.T + bu); wq (2F, row_bytes): gate rows, then up rows."""
    _launch("qlinear_glu_forward", out, x, wq, qtype, b, act, None, True, tunables)
