"""Linear layers on weights kept quantized (ggml Q8_0 / Q4_0 / Q4_1 blocks, nbformer.quant).

The weight is the raw ggml bytes wq (M, K/32 * block_bytes) uint8, rows in the nn.Linear layout
(out_features, in_features): what a GGUF file holds, used as it is. Two paths, one kernel:

* decode (few rows of x, memory-bound): parallel over blocks of output columns; each weight row
  is streamed from memory once and dequantized in registers inside the dot product: per block,
  s = sum_t x[t] q[t] (the nibbles / int8 codes converted to float on the fly), then
  acc += d * s + m * sum(x of the block) (Q4_1; Q4_0: d * (s - 8 sum x); Q8_0: d * s). The block
  sums of x are computed once per call, as llama.cpp keeps them in its q8_1 activations.
* prefill (many rows, compute-bound): a block of weight rows is dequantized into a small float32
  tile (in L2) and multiplied with BLAS sgemm (np.dot, one BLAS thread per Numba thread, as
  linear.py), so the dequantization is paid once per weight per call, not once per row of x.

Both apply the bias / activation / residual epilogue of linear.py (linear_glu: act(gate) * up)
on each block of columns right after it is computed. Column blocks have a fixed size, so results
are bit-identical for any thread count.

fp16 scales are converted with the CPU's half -> float instruction (an LLVM fpext, F16C).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...errors import GraphError
from ...quant.formats import BY_CODE, QK, QTYPES
from .checks import check_array as _check
from .gemm import pin_blas_to_one_thread
from .linear import ACT_CODES, SRC_TMP, _epilogue_row
from .precompile import BOOL, F2, I64, R1, R2, RU2, kernel
from .swiglu import _glu_row

_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}  # no nnan/ninf

DECODE_COLS = 32  # output columns per work item on the decode path
PREFILL_COLS = 64  # weight rows dequantized per tile on the prefill path
# from this many rows of x on, dequantize tiles + sgemm: on a 1536 x 576 weight (2 threads, Zen 5) the
# decode path was faster up to 12 rows for Q4_1 (621 vs 826 us), even at 16 (840 vs 797), and for Q8_0 up
# to ~32 rows (noisy machine); dequantizing the tiles is the prefill path's fixed cost
PREFILL_MIN_ROWS = 16


@intrinsic
def _half_to_float(typingctx, bits):
    """float32 value of the IEEE half whose bits are the low 16 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        h = builder.trunc(args[0], ir.IntType(16))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def _f16(row, o):
    return _half_to_float(np.int32(row[o]) | (np.int32(row[o + 1]) << 8))


_F = ir.FloatType()
_V16F = ir.VectorType(_F, 16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _splat(builder, v, ty):
    undef = ir.Constant(ty, ir.Undefined)
    ins = builder.insert_element(undef, v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(ins, undef, ir.Constant(ir.VectorType(_I32, ty.count), [0] * ty.count))


def _reduce16(builder, v):
    # fixed pairwise order (deterministic): 16 -> 8 -> 4 -> 2 -> 1
    n = 16
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _half(builder, p):
    h = builder.load(builder.bitcast(p, ir.IntType(16).as_pointer()), align=1)
    return builder.fpext(builder.bitcast(h, ir.HalfType()), _F)


def _make(code):
    """An intrinsic qrow_dot(row, x, xs, nb) -> float32: the dot product of one quantized weight
    row (uint8 ggml bytes) with x (K,) float32, xs (nb,) the block sums of x (Q4 formats).

    Written in LLVM IR with explicit 16-lane vectors: per block the 16 code bytes (Q8_0: 2 x 16)
    are widened to int32, split into nibbles, converted to float and multiplied with x; the block
    scale d multiplies the 16-lane partial (an fma into a vector accumulator), and the offsets
    (Q4_1: m, Q4_0: -8 d) times the block sum of x go to a scalar; one horizontal sum per row,
    in a fixed order. (Numba's own loops here were vectorised across blocks with gathers and
    64-bit integer lanes: 4x slower.) Without AVX-512 LLVM splits the vectors (AVX2: 2 x 8).
    Callers guarantee K = 32 nb, len(row) = nb * block_bytes, len(xs) >= nb."""
    bb = (34, 18, 20)[code]

    @intrinsic
    def qrow_dot(typingctx, row, x, xs, nb):
        sig = types.float32(row, x, xs, nb)

        def codegen(context, builder, sig_, args):
            rowp = context.make_array(sig_.args[0])(context, builder, args[0]).data
            xp = context.make_array(sig_.args[1])(context, builder, args[1]).data
            xsp = context.make_array(sig_.args[2])(context, builder, args[2]).data
            nbv = args[3]
            mod = builder.module
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            entry = builder.basic_block
            loop = builder.append_basic_block("qdot.loop")
            done = builder.append_basic_block("qdot.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            blk = builder.phi(_I64)
            acc = builder.phi(_V16F)
            macc = builder.phi(_F)
            blk.add_incoming(ir.Constant(_I64, 0), entry)
            acc.add_incoming(ir.Constant(_V16F, [0.0] * 16), entry)
            macc.add_incoming(ir.Constant(_F, 0.0), entry)
            o = builder.mul(blk, ir.Constant(_I64, bb))
            bp = builder.gep(rowp, [o])
            d = _half(builder, bp)
            xb = builder.gep(xp, [builder.mul(blk, ir.Constant(_I64, 32))])
            x0 = builder.load(builder.bitcast(xb, _V16F.as_pointer()), align=4)
            x1 = builder.load(builder.bitcast(builder.gep(xb, [ir.Constant(_I64, 16)]), _V16F.as_pointer()), align=4)
            v16i8 = ir.VectorType(ir.IntType(8), 16)
            v16i32 = ir.VectorType(_I32, 16)
            if code == 0:
                q0 = builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(_I64, 2)]), v16i8.as_pointer()), align=1)
                q1 = builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(_I64, 18)]), v16i8.as_pointer()), align=1)
                f0 = builder.sitofp(builder.sext(q0, v16i32), _V16F)
                f1 = builder.sitofp(builder.sext(q1, v16i32), _V16F)
                mnew = macc
            else:
                off = 4 if code == 2 else 2
                q = builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(_I64, off)]), v16i8.as_pointer()), align=1)
                q32 = builder.zext(q, v16i32)
                f0 = builder.uitofp(builder.and_(q32, ir.Constant(v16i32, [15] * 16)), _V16F)
                f1 = builder.uitofp(builder.lshr(q32, ir.Constant(v16i32, [4] * 16)), _V16F)
                s = builder.load(builder.gep(xsp, [blk]))
                if code == 2:
                    m = _half(builder, builder.gep(bp, [ir.Constant(_I64, 2)]))
                else:
                    m = builder.fmul(d, ir.Constant(_F, -8.0))
                mnew = builder.fadd(macc, builder.fmul(m, s))
            p = builder.fmul(x0, f0)
            p = builder.call(fma, [x1, f1, p])
            anew = builder.call(fma, [_splat(builder, d, _V16F), p, acc])
            nxt = builder.add(blk, ir.Constant(_I64, 1))
            blk.add_incoming(nxt, loop)
            acc.add_incoming(anew, loop)
            macc.add_incoming(mnew, loop)
            builder.cbranch(builder.icmp_signed("<", nxt, nbv), loop, done)
            builder.position_at_end(done)
            return builder.fadd(_reduce16(builder, anew), mnew)

        return sig, codegen

    return qrow_dot


qrow_dot_q8_0, qrow_dot_q4_0, qrow_dot_q4_1 = _make(0), _make(1), _make(2)


@njit(inline="always", fastmath=_FM)
def _dequant_row(dst, row, nb, code):
    # dst (K,) float32 <- the weights of one quantized row
    if code == 0:
        for blk in range(nb):
            qb = row[blk * 34:blk * 34 + 34]
            db = dst[blk * QK:blk * QK + QK]
            d = _half_to_float(np.int32(qb[0]) | (np.int32(qb[1]) << 8))
            for t in range(QK):
                q = np.int32(qb[2 + t])
                db[t] = d * np.float32(q - ((q & 128) << 1))
    else:
        bb = 18 if code == 1 else 20
        off = 2 if code == 1 else 4
        for blk in range(nb):
            o = blk * bb
            d = _f16(row, o)
            m = _f16(row, o + 2) if code == 2 else np.float32(-8.0) * d
            qb = row[o + off:o + off + 16]
            db = dst[blk * QK:blk * QK + QK]
            for t in range(16):
                q = np.int32(qb[t])
                db[t] = d * np.float32(q & 15) + m
                db[16 + t] = d * np.float32(q >> 4) + m


@njit(inline="always", fastmath=_FM)
def _decode_block(tmp, x, xs, wq, r0, n, code, nb):
    # tmp (N, n) = x @ W[r0:r0 + n].T, W dequantized in registers
    N = x.shape[0]
    for j in range(n):
        row = wq[r0 + j]
        for i in range(N):
            if code == 0:
                tmp[i, j] = qrow_dot_q8_0(row, x[i], xs[i], nb)
            elif code == 1:
                tmp[i, j] = qrow_dot_q4_0(row, x[i], xs[i], nb)
            else:
                tmp[i, j] = qrow_dot_q4_1(row, x[i], xs[i], nb)


@njit(inline="always", fastmath=_FM)
def _prefill_block(tmp, tile, x, wq, r0, n, code, nb):
    for j in range(n):
        _dequant_row(tile[j], wq[r0 + j], nb, code)
    np.dot(x, tile[:n].T, tmp)


@kernel((F2, R2, RU2, R1, I64, R2, I64, BOOL, BOOL, BOOL, BOOL), cost=9.0)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _qlinear_fwd(out, x, wq, b, act, residual, code, use_bias, use_residual, glu, dense):
    # out (N, Mo); x (N, K); wq (Mw, K/32 * bb) uint8; glu: Mw = 2 Mo (gate rows, then up rows),
    # out = act(gate) * up; else Mw = Mo and out = act(x W.T + b) (+ residual). dense: prefill path.
    N, Mo = out.shape
    K = x.shape[1]
    nb = K // QK
    xs = np.zeros((N, nb), np.float32)  # block sums of x (the Q4 formats' offsets)
    if not dense and code != 0:
        for i in range(N):
            for blk in range(nb):
                s = np.float32(0.0)
                for t in range(QK):
                    s += x[i, blk * QK + t]
                xs[i, blk] = s
    cols = PREFILL_COLS if dense else DECODE_COLS
    for c in prange((Mo + cols - 1) // cols):
        m0 = c * cols
        m1 = min(Mo, m0 + cols)
        n = m1 - m0
        tmp = np.empty((N, n), np.float32)
        tmpu = np.empty((N, n if glu else 0), np.float32)
        if dense:
            tile = np.empty((n, K), np.float32)
            _prefill_block(tmp, tile, x, wq, m0, n, code, nb)
            if glu:
                _prefill_block(tmpu, tile, x, wq, Mo + m0, n, code, nb)
        else:
            _decode_block(tmp, x, xs, wq, m0, n, code, nb)
            if glu:
                _decode_block(tmpu, x, xs, wq, Mo + m0, n, code, nb)
        if glu:
            for i in range(N):
                g, u = tmp[i], tmpu[i]
                if use_bias:
                    for j in range(n):
                        g[j] += b[m0 + j]
                        u[j] += b[Mo + m0 + j]
                _glu_row(out[i], m0, g, u, n, act)
        else:
            for i in range(N):
                _epilogue_row(out, out, tmp, i, i, m0, m1, b, act, residual, use_bias, use_residual, False,
                              SRC_TMP)


def _code_of(op, qtype):
    t = QTYPES.get(str(qtype).lower())
    if t is None:
        raise GraphError(f"{op}: 'qtype' is {qtype!r}, expected one of {sorted(QTYPES)}")
    return t


def _check_common(op, out, x, wq, qtype, M_w, M_out):
    t = _code_of(op, qtype)
    _check(op, "x", x, None)
    K = x.shape[-1]
    if K % QK or K == 0:
        raise GraphError(f"{op}: 'x' has {K} features; {t.name.upper()} weights need a multiple of {QK}")
    _check(op, "wq", wq, None, np.uint8)
    rb = (K // QK) * t.block_bytes
    if wq.ndim != 2 or wq.shape[1] != rb or (M_w is not None and wq.shape[0] != M_w):
        raise GraphError(f"{op}: 'wq' has shape {wq.shape}, expected (M, {rb}) bytes: {t.name.upper()} rows of "
                         f"K = {K} weights")
    return t, K


def _rows(x2, dense_rows):
    return x2.shape[0] >= dense_rows


def qlinear_forward(out, x, wq, qtype, b=None, act="none", residual=None, dense_rows=None):
    """out (..., M) = act(x (..., K) @ W.T + b) [+ residual (..., M)], W (M, K) the quantized
    weight whose ggml bytes are wq (M, K/32 * block_bytes) uint8. out may alias residual.
    dense_rows: from how many rows of x on the prefill path (tile + sgemm) runs."""
    op = "qlinear_forward"
    t, K = _check_common(op, out, x, wq, qtype, None, None)
    M = wq.shape[0]
    oshape = x.shape[:-1] + (M,)
    _check(op, "out", out, oshape)
    use_bias, use_res = b is not None, residual is not None
    if use_bias:
        _check(op, "b", b, (M,))
    if use_res:
        _check(op, "residual", residual, oshape)
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    out2, x2 = out.reshape(-1, M), x.reshape(-1, K)
    dense = _rows(x2, PREFILL_MIN_ROWS if dense_rows is None else dense_rows)
    if dense:
        pin_blas_to_one_thread()
    _qlinear_fwd(out2, x2, wq, b if use_bias else x2[0], ACT_CODES[act],
                 residual.reshape(-1, M) if use_res else out2, t.code, use_bias, use_res, False, dense)


def qlinear_glu_forward(out, x, wq, qtype, b=None, act="silu", dense_rows=None):
    """out (..., F) = act(x @ Wg.T + bg) * (x @ Wu.T + bu), the quantized W (2F, K) = gate rows
    then up rows (the fused ffn.gate_up weight), bytes wq (2F, K/32 * block_bytes) uint8."""
    op = "qlinear_glu_forward"
    t, K = _check_common(op, out, x, wq, qtype, None, None)
    M = wq.shape[0]
    if M % 2:
        raise GraphError(f"{op}: 'wq' has {M} rows; a fused gate|up weight has an even number")
    F = M // 2
    _check(op, "out", out, x.shape[:-1] + (F,))
    use_bias = b is not None
    if use_bias:
        _check(op, "b", b, (M,))
    if act not in ACT_CODES:
        raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
    out2, x2 = out.reshape(-1, F), x.reshape(-1, K)
    dense = _rows(x2, PREFILL_MIN_ROWS if dense_rows is None else dense_rows)
    if dense:
        pin_blas_to_one_thread()
    _qlinear_fwd(out2, x2, wq, b if use_bias else x2[0], ACT_CODES[act], out2, t.code, use_bias, False, True,
                 dense)


def qtype_name(code: int) -> str:
    return BY_CODE[code].name
