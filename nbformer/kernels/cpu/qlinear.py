"""Linear layers on weights kept quantized (ggml Q8_0 / Q4_0 / Q4_1 blocks, nbformer.quant).

The weight is the raw ggml bytes wq (M, K/32 * block_bytes) uint8, rows in the nn.Linear layout
(out_features, in_features): what a GGUF file holds, used as it is. Two paths, one kernel:

* decode (few rows of x, memory-bound): parallel over blocks of output columns; each weight row
  is streamed from memory once and dequantized in registers inside the dot product: per block,
  s = sum_t x[t] q[t] (the nibbles / int8 codes converted to float on the fly), then
  acc += d * s + m * sum(x of the block) (Q4_1; Q4_0: d * (s - 8 sum x); Q8_0: d * s). The block
  sums of x are computed once per call, as llama.cpp keeps them in its q8_1 activations. Tiles of
  4 weight rows (x 2 rows of x) share each load and conversion, with independent accumulators
  and a software prefetch of the weight stream (_make_tile); every result is bit-identical to the
  one-row reference (decode_reference).
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
import numba
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...errors import GraphError
from ...quant.formats import BY_CODE, QK, QTYPES
from .checks import check_array as _check
from .gemm import check_threads, num_threads, pin_blas_to_one_thread
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
_I8P = ir.IntType(8).as_pointer()
_V2F = ir.VectorType(_F, 2)
_V2H = ir.VectorType(ir.HalfType(), 2)
# explicit flags on the float ops of the decode tiles: Numba's fastmath pass adds its flags (reassoc ...)
# only to instructions that have none, and reassociation would let LLVM change the order of the sums
_EXACT = ("contract",)


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
        v = builder.fadd(lo, hi, flags=_EXACT)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _c64(v):
    return ir.Constant(_I64, v)


def _c32(v):
    return ir.Constant(_I32, v)


def _arrays(context, builder, sig, args, idx):
    """(data pointer, row length) of the C-contiguous 2D arrays args[idx]."""
    out = []
    for k in idx:
        a = context.make_array(sig.args[k])(context, builder, args[k])
        out.append((a.data, cgutils.unpack_tuple(builder, a.shape, 2)[1]))
    return out


def _ints(context, builder, sig, args, idx):
    return [context.cast(builder, args[k], sig.args[k], types.int64) for k in idx]


DECODE_R = 4  # weight rows per tile for one row of x
DECODE_R2, DECODE_NX = 4, 2  # weight rows x rows of x per tile for 2 .. PREFILL_MIN_ROWS - 1 rows of x
# software prefetch distance of the decode tiles, in blocks of the weight stream (Q4_1: 7.5 KiB, Q8_0:
# 12.75 KiB ahead). Without it a decode call on weights not in the caches ran at ~8 GB/s on one core
# (the hardware prefetcher did not keep up with R interleaved row streams), with it ~16 (Q4_1) and
# ~30 GB/s (Q8_0) from memory on one core; 144 .. 576 measured, 288 .. 432 best
DECODE_PREFETCH = 384
MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # get_thread_id() < this


@intrinsic
def _block_sums(typingctx, xs, x, nb):
    """xs[i, blk] = the sum of x[i, 32 blk:32 blk + 32] for every row i, in a fixed order (the two
    16-lane halves added, then the pairwise horizontal sum of the decode tiles)."""
    sig = types.void(xs, x, nb)

    def codegen(context, builder, sig_, args):
        (sp, lds), (xp, ldx) = _arrays(context, builder, sig_, args, (0, 1))
        n = cgutils.unpack_tuple(builder, context.make_array(sig_.args[1])(context, builder, args[1]).shape, 2)[0]
        (nbv,) = _ints(context, builder, sig_, args, (2,))
        with cgutils.for_range(builder, n) as li:
            xr = builder.gep(xp, [builder.mul(li.index, ldx)])
            sr = builder.gep(sp, [builder.mul(li.index, lds)])
            with cgutils.for_range(builder, nbv) as lb:
                xb = builder.gep(xr, [builder.mul(lb.index, _c64(QK))])
                x0 = builder.load(builder.bitcast(xb, _V16F.as_pointer()), align=4)
                x1 = builder.load(builder.bitcast(builder.gep(xb, [_c64(16)]), _V16F.as_pointer()), align=4)
                builder.store(_reduce16(builder, builder.fadd(x0, x1, flags=_EXACT)), builder.gep(sr, [lb.index]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch_rows(typingctx, wq, r0, nbytes):
    """Software prefetch of the nbytes bytes of wq (C-contiguous 2D) from row r0 on, one per 64."""
    sig = types.void(wq, r0, nbytes)

    def codegen(context, builder, sig_, args):
        ((wp, ldw),) = _arrays(context, builder, sig_, args, (0,))
        r0v, nbv = _ints(context, builder, sig_, args, (1, 2))
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), "llvm.prefetch.p0")
        base = builder.gep(wp, [builder.mul(r0v, ldw)])
        n = builder.udiv(builder.add(nbv, _c64(63)), _c64(64))
        with cgutils.for_range(builder, n) as li:
            builder.call(prefetch, [builder.gep(base, [builder.mul(li.index, _c64(64))]), _c32(0), _c32(3), _c32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _make_tile(code, R, NX):
    """An intrinsic qtile(tmp, c0, i0, wq, r0, x, xs, nb): tmp[i0 + a, c0 + r] = the dot product of
    the quantized weight row wq[r0 + r] (uint8 ggml bytes, nb blocks) with x[i0 + a] (K = 32 nb
    float32), for r < R, a < NX; xs (N, nb) the block sums of x (_block_sums; Q4 formats). tmp, wq,
    x, xs: C-contiguous 2D; callers guarantee the rows exist.

    Written in LLVM IR with explicit 16-lane vectors (Numba's own loops here were vectorised across
    blocks with gathers and 64-bit integer lanes: 4x slower). One loop over the blocks for R weight
    rows and NX rows of x: each x block is loaded once for R rows, each weight block converted to
    float once for NX rows of x, and the R NX accumulator chains are independent (one row at a time,
    the fma chain of its accumulator was the bound). Per block of a weight row: the fp16 scale d
    (and the Q4_1 min m) by one 32-bit load and one conversion; the 16 code bytes (Q8_0: 2 x 16)
    widened to int32, split into nibbles, converted to float. Per (weight row, x row), in this
    order, which fixes every result bit (the float ops carry explicit flags, so Numba's fastmath
    pass adds no reassociation to them):

        p = x0 f0;  p = fma(x1, f1, p);  acc = fma(splat(d), p, acc)      (16 lanes)
        Q4_1: mc = fma(m, s, mc);  Q4_0: mc = fma(d, s, mc)               (s = xs[i, blk])
        result = hsum(acc) + mc  (Q4_1),  hsum(acc) + (-8 mc)  (Q4_0),  hsum(acc)  (Q8_0)

    with hsum the pairwise 16 -> 8 -> 4 -> 2 -> 1 sum. So a result does not depend on R, NX or
    where the row falls in a tile: R = NX = 1 is the one-row reference (tests compare the tiles
    with it bit for bit). Without AVX-512 LLVM splits the vectors (AVX2: 2 x 8); without F16C the
    half -> float conversion is a library call (slow, same bits).

    Each block load is paired with a software prefetch DECODE_PREFETCH blocks ahead in the weight
    bytes (rows are contiguous, so that runs into the next rows and the next work item); prefetches
    past the end of wq are harmless hints."""
    bb = (34, 18, 20)[code]
    v16i8 = ir.VectorType(ir.IntType(8), 16)
    v16i32 = ir.VectorType(_I32, 16)

    @intrinsic
    def qtile(typingctx, tmp, c0, i0, wq, r0, x, xs, nb):
        sig = types.void(tmp, c0, i0, wq, r0, x, xs, nb)

        def codegen(context, builder, sig_, args):
            (tp, ldt), (wp, ldw), (xp, ldx), (sp, lds) = _arrays(context, builder, sig_, args, (0, 3, 5, 6))
            c0v, i0v, r0v, nbv = _ints(context, builder, sig_, args, (1, 2, 4, 7))
            rows = [builder.gep(wp, [builder.mul(builder.add(r0v, _c64(r)), ldw)]) for r in range(R)]
            xrows = [builder.gep(xp, [builder.mul(builder.add(i0v, _c64(a)), ldx)]) for a in range(NX)]
            srows = [builder.gep(sp, [builder.mul(builder.add(i0v, _c64(a)), lds)]) for a in range(NX)]
            mod = builder.module
            fma16 = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            fma2 = cgutils.get_or_insert_function(mod, ir.FunctionType(_V2F, [_V2F] * 3), "llvm.fma.v2f32")
            fma1 = cgutils.get_or_insert_function(mod, ir.FunctionType(_F, [_F] * 3), "llvm.fma.f32")
            prefetch = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), "llvm.prefetch.p0")
            pfd = _c64(DECODE_PREFETCH * bb)
            entry = builder.basic_block
            loop = builder.append_basic_block("qtile.loop")
            done = builder.append_basic_block("qtile.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            blk = builder.phi(_I64)
            blk.add_incoming(_c64(0), entry)
            mty = _V2F if code == 2 else _F  # Q4_1: lanes [sum d s (unused), sum m s]
            accs, maccs = [], []
            for _ in range(R * NX):
                acc = builder.phi(_V16F)
                acc.add_incoming(ir.Constant(_V16F, [0.0] * 16), entry)
                mc = builder.phi(mty)
                mc.add_incoming(ir.Constant(mty, [0.0, 0.0] if code == 2 else 0.0), entry)
                accs.append(acc)
                maccs.append(mc)
            xo = builder.mul(blk, _c64(QK))
            xv = []
            for a in range(NX):
                xb = builder.gep(xrows[a], [xo])
                x0 = builder.load(builder.bitcast(xb, _V16F.as_pointer()), align=4)
                x1 = builder.load(builder.bitcast(builder.gep(xb, [_c64(16)]), _V16F.as_pointer()), align=4)
                s = None
                if code != 0:
                    s = builder.load(builder.gep(srows[a], [blk]))
                    if code == 2:
                        s = _splat(builder, s, _V2F)
                xv.append((x0, x1, s))
            o = builder.mul(blk, _c64(bb))
            anew, mnew = [None] * (R * NX), [None] * (R * NX)
            for r in range(R):
                bp = builder.gep(rows[r], [o])
                builder.call(prefetch, [builder.gep(bp, [pfd]), _c32(0), _c32(3), _c32(1)])
                # the block's first two halves, one load and one conversion: [d, m] for Q4_1
                # (Q4_0 / Q8_0: d and two code bytes, lane 1 not used)
                dm = builder.fpext(builder.load(builder.bitcast(bp, _V2H.as_pointer()), align=1), _V2F)
                ds = builder.shuffle_vector(dm, dm, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
                d = builder.extract_element(dm, _c32(0))
                if code == 0:
                    q0 = builder.load(builder.bitcast(builder.gep(bp, [_c64(2)]), v16i8.as_pointer()), align=1)
                    q1 = builder.load(builder.bitcast(builder.gep(bp, [_c64(18)]), v16i8.as_pointer()), align=1)
                    f0 = builder.sitofp(builder.sext(q0, v16i32), _V16F)
                    f1 = builder.sitofp(builder.sext(q1, v16i32), _V16F)
                else:
                    q = builder.load(builder.bitcast(builder.gep(bp, [_c64(4 if code == 2 else 2)]),
                                                     v16i8.as_pointer()), align=1)
                    q32 = builder.zext(q, v16i32)
                    f0 = builder.uitofp(builder.and_(q32, ir.Constant(v16i32, [15] * 16)), _V16F)
                    f1 = builder.uitofp(builder.lshr(q32, ir.Constant(v16i32, [4] * 16)), _V16F)
                for a in range(NX):
                    k = r * NX + a
                    x0, x1, s = xv[a]
                    p = builder.fmul(x0, f0, flags=_EXACT)
                    p = builder.call(fma16, [x1, f1, p])
                    anew[k] = builder.call(fma16, [ds, p, accs[k]])
                    if code == 0:
                        mnew[k] = maccs[k]
                    elif code == 1:
                        mnew[k] = builder.call(fma1, [d, s, maccs[k]])
                    else:
                        mnew[k] = builder.call(fma2, [dm, s, maccs[k]])
            nxt = builder.add(blk, _c64(1))
            blk.add_incoming(nxt, loop)
            for k in range(R * NX):
                accs[k].add_incoming(anew[k], loop)
                maccs[k].add_incoming(mnew[k], loop)
            builder.cbranch(builder.icmp_signed("<", nxt, nbv), loop, done)
            builder.position_at_end(done)
            for r in range(R):
                for a in range(NX):
                    k = r * NX + a
                    v = _reduce16(builder, anew[k])
                    if code == 1:
                        v = builder.fadd(v, builder.fmul(mnew[k], ir.Constant(_F, -8.0), flags=_EXACT), flags=_EXACT)
                    elif code == 2:
                        v = builder.fadd(v, builder.extract_element(mnew[k], _c32(1)), flags=_EXACT)
                    idx = builder.add(builder.mul(builder.add(i0v, _c64(a)), ldt), builder.add(c0v, _c64(r)))
                    builder.store(v, builder.gep(tp, [idx]))
            return context.get_dummy_value()

        return sig, codegen

    return qtile


def _make_decoder(code):
    t_r = _make_tile(code, DECODE_R, 1)
    t_rn = _make_tile(code, DECODE_R2, DECODE_NX)
    t_r2 = _make_tile(code, DECODE_R2, 1)
    t_1 = _make_tile(code, 1, 1)

    @njit(inline="always", fastmath=_FM)
    def decode(tmp, x, xs, wq, r0, n, nb):
        # tmp[:, :n] = x @ W[r0:r0 + n].T, W dequantized in registers: tiles of R weight rows (x NX rows
        # of x), then the rows left one at a time
        N = x.shape[0]
        j = 0
        if N == 1:
            while j + DECODE_R <= n:
                t_r(tmp, j, 0, wq, r0 + j, x, xs, nb)
                j += DECODE_R
        else:
            while j + DECODE_R2 <= n:
                i = 0
                while i + DECODE_NX <= N:
                    t_rn(tmp, j, i, wq, r0 + j, x, xs, nb)
                    i += DECODE_NX
                while i < N:
                    t_r2(tmp, j, i, wq, r0 + j, x, xs, nb)
                    i += 1
                j += DECODE_R2
        while j < n:
            for i in range(N):
                t_1(tmp, j, i, wq, r0 + j, x, xs, nb)
            j += 1

    @njit(inline="always", fastmath=_FM)
    def reference(tmp, x, xs, wq, nb):
        # one weight row and one row of x at a time (the R = NX = 1 tile): what the tiles must equal
        for j in range(wq.shape[0]):
            for i in range(x.shape[0]):
                t_1(tmp, j, i, wq, j, x, xs, nb)

    return decode, reference


(_decode_q8_0, _ref_q8_0), (_decode_q4_0, _ref_q4_0), (_decode_q4_1, _ref_q4_1) = (_make_decoder(c) for c in range(3))


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
def _decode_block(tmp, x, xs, wq, r0, n, code, nb, burst):
    # tmp (N, >= n) = x @ W[r0:r0 + n].T, W dequantized in registers. burst (a thread's first work
    # item): first prefetch the block's first DECODE_PREFETCH blocks (the tiles prefetch that far
    # ahead, so on later work items these lines are in flight already)
    if burst:
        bb = 34 if code == 0 else (18 if code == 1 else 20)
        _prefetch_rows(wq, r0, min(n * nb, DECODE_PREFETCH) * bb)
    if code == 0:
        _decode_q8_0(tmp, x, xs, wq, r0, n, nb)
    elif code == 1:
        _decode_q4_0(tmp, x, xs, wq, r0, n, nb)
    else:
        _decode_q4_1(tmp, x, xs, wq, r0, n, nb)


@njit(inline="always", fastmath=_FM)
def _prefill_block(tmp, tile, x, wq, r0, n, code, nb):
    for j in range(n):
        _dequant_row(tile[j], wq[r0 + j], nb, code)
    np.dot(x, tile[:n].T, tmp)


@kernel((F2, R2, RU2, R1, I64, R2, I64, BOOL, BOOL, BOOL, BOOL, I64), cost=9.0)
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath=_FM)
def _qlinear_fwd(out, x, wq, b, act, residual, code, use_bias, use_residual, glu, dense, cols):
    # out (N, Mo); x (N, K); wq (Mw, K/32 * bb) uint8; glu: Mw = 2 Mo (gate rows, then up rows),
    # out = act(gate) * up; else Mw = Mo and out = act(x W.T + b) (+ residual). dense: prefill path.
    # cols: output columns per work item (decode) / weight rows per dequantized tile (prefill).
    N, Mo = out.shape
    K = x.shape[1]
    nb = K // QK
    sums = not dense and code != 0
    xs = np.empty((N, nb if sums else 0), np.float32)  # block sums of x (the Q4 formats' offsets)
    if sums:
        _block_sums(xs, x, nb)
    nw = (Mo + cols - 1) // cols
    # the decode path's per-work-item results, one allocation per call (tmp[:, :n] is used)
    scr = np.empty((0 if dense else nw, 2 if glu else 1, N, cols), np.float32)
    started = np.zeros(MAX_THREADS, np.uint8)  # per thread: has it run a work item yet
    for c in prange(nw):
        m0 = c * cols
        m1 = min(Mo, m0 + cols)
        n = m1 - m0
        if dense:
            tmp = np.empty((N, n), np.float32)
            tmpu = np.empty((N, n if glu else 0), np.float32)
            tile = np.empty((n, K), np.float32)
            _prefill_block(tmp, tile, x, wq, m0, n, code, nb)
            if glu:
                _prefill_block(tmpu, tile, x, wq, Mo + m0, n, code, nb)
        else:
            tmp = scr[c, 0]
            tmpu = scr[c, 1 if glu else 0]
            tid = min(get_thread_id(), MAX_THREADS - 1)
            burst = started[tid] == 0
            started[tid] = 1
            _decode_block(tmp, x, xs, wq, m0, n, code, nb, burst)
            if glu:
                _decode_block(tmpu, x, xs, wq, Mo + m0, n, code, nb, burst)
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


@njit(cache=False, nogil=True, fastmath=_FM)
def _decode_reference_fwd(out, x, wq, code):
    nb = x.shape[1] // QK
    xs = np.empty((x.shape[0], nb if code != 0 else 0), np.float32)
    if code != 0:
        _block_sums(xs, x, nb)
    if code == 0:
        _ref_q8_0(out, x, xs, wq, nb)
    elif code == 1:
        _ref_q4_0(out, x, xs, wq, nb)
    else:
        _ref_q4_1(out, x, xs, wq, nb)


def decode_reference(x, wq, qtype):
    """x (N, K) @ W.T by the one-row reference of the decode tiles (one weight row and one row of x
    at a time, serial; for tests): the decode path (qlinear_forward with fewer than dense_rows rows)
    must give these bits exactly."""
    t = _code_of("decode_reference", qtype)
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], wq.shape[0]), np.float32)
    _decode_reference_fwd(out, x, np.ascontiguousarray(wq), t.code)
    return out


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


_F32, _U8 = np.dtype(np.float32), np.dtype(np.uint8)
_QT_MEMO: dict = {}  # qtype strings seen -> QType (a decode step calls the launchers ~120 times)


def _ok(a, dtype):
    return type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous


def _fast_ok(out, x, wq, qtype, b, act, residual, rows_out):
    """True when the launcher's checks would all pass, tested the quick way (a decode step's
    Python overhead per call was ~2.7 us, as much as a small weight's kernel); on False the full
    checks run and raise their errors."""
    t = _QT_MEMO.get(qtype) if type(qtype) is str else None
    if t is None or not (_ok(x, _F32) and _ok(wq, _U8) and _ok(out, _F32)) or act not in ACT_CODES:
        return None
    K = x.shape[-1]
    if K % QK or K == 0 or wq.ndim != 2 or wq.shape[1] != (K // QK) * t.block_bytes:
        return None
    M = wq.shape[0]
    if out.shape != x.shape[:-1] + (rows_out(M),):
        return None
    if b is not None and not (_ok(b, _F32) and b.shape == (M,)):
        return None
    if residual is not None and not (_ok(residual, _F32) and residual.shape == out.shape):
        return None
    return t


def _tunables(op, dense_rows, decode_cols, prefill_cols, threads):
    """The launchers' tunables, checked: dense_rows >= 1 (None: PREFILL_MIN_ROWS), column blocks >= 1."""
    dr = PREFILL_MIN_ROWS if dense_rows is None else dense_rows
    for name, v in (("dense_rows", dr), ("decode_cols", decode_cols), ("prefill_cols", prefill_cols)):
        if type(v) is not int or v < 1:
            raise GraphError(f"{op}: tunable '{name}' must be an integer >= 1, got {v!r}")
    return dr, check_threads(op, threads)


def qlinear_forward(out, x, wq, qtype, b=None, act="none", residual=None, dense_rows=None, *,
                    decode_cols=DECODE_COLS, prefill_cols=PREFILL_COLS, threads=None):
    """out (..., M) = act(x (..., K) @ W.T + b) [+ residual (..., M)], W (M, K) the quantized
    weight whose ggml bytes are wq (M, K/32 * block_bytes) uint8. out may alias residual.
    Tunables (nbformer/tuning/space.py, family cpu.qlinear): dense_rows, from how many rows of x
    on the prefill path (tile + sgemm) runs; decode_cols, output columns per decode work item
    (never the bits: every column is its own dot product in a fixed order); prefill_cols, weight
    rows per dequantized prefill tile (sgemm's blocking may move the last bits); threads."""
    t = _fast_ok(out, x, wq, qtype, b, act, residual, _same)
    if t is None:
        op = "qlinear_forward"
        t, K = _check_common(op, out, x, wq, qtype, None, None)
        M = wq.shape[0]
        oshape = x.shape[:-1] + (M,)
        _check(op, "out", out, oshape)
        if b is not None:
            _check(op, "b", b, (M,))
        if residual is not None:
            _check(op, "residual", residual, oshape)
        if act not in ACT_CODES:
            raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
        if isinstance(qtype, str):
            _QT_MEMO[qtype] = t
    dr, threads = _tunables("qlinear_forward", dense_rows, decode_cols, prefill_cols, threads)
    M, K = wq.shape[0], x.shape[-1]
    use_bias, use_res = b is not None, residual is not None
    out2, x2 = out.reshape(-1, M), x.reshape(-1, K)
    dense = _rows(x2, dr)
    if dense:
        pin_blas_to_one_thread()
    with num_threads(threads):
        _qlinear_fwd(out2, x2, wq, b if use_bias else x2[0], ACT_CODES[act],
                     residual.reshape(-1, M) if use_res else out2, t.code, use_bias, use_res, False, dense,
                     prefill_cols if dense else decode_cols)


def _same(M):
    return M


def _half_rows(M):
    return M // 2 if M % 2 == 0 else -1


def qlinear_glu_forward(out, x, wq, qtype, b=None, act="silu", dense_rows=None, *,
                        decode_cols=DECODE_COLS, prefill_cols=PREFILL_COLS, threads=None):
    """out (..., F) = act(x @ Wg.T + bg) * (x @ Wu.T + bu), the quantized W (2F, K) = gate rows
    then up rows (the fused ffn.gate_up weight), bytes wq (2F, K/32 * block_bytes) uint8.
    Tunables as qlinear_forward's."""
    t = _fast_ok(out, x, wq, qtype, b, act, None, _half_rows)
    if t is None:
        op = "qlinear_glu_forward"
        t, K = _check_common(op, out, x, wq, qtype, None, None)
        M = wq.shape[0]
        if M % 2:
            raise GraphError(f"{op}: 'wq' has {M} rows; a fused gate|up weight has an even number")
        _check(op, "out", out, x.shape[:-1] + (M // 2,))
        if b is not None:
            _check(op, "b", b, (M,))
        if act not in ACT_CODES:
            raise GraphError(f"{op}: 'act' is {act!r}, expected one of {sorted(ACT_CODES)}")
        if isinstance(qtype, str):
            _QT_MEMO[qtype] = t
    dr, threads = _tunables("qlinear_glu_forward", dense_rows, decode_cols, prefill_cols, threads)
    M, K = wq.shape[0], x.shape[-1]
    F = M // 2
    use_bias = b is not None
    out2, x2 = out.reshape(-1, F), x.reshape(-1, K)
    dense = _rows(x2, dr)
    if dense:
        pin_blas_to_one_thread()
    with num_threads(threads):
        _qlinear_fwd(out2, x2, wq, b if use_bias else x2[0], ACT_CODES[act], out2, t.code, use_bias, False, True,
                     dense, prefill_cols if dense else decode_cols)


def qtype_name(code: int) -> str:
    return BY_CODE[code].name
