"""Intel AMX tile intrinsics for the CPU GEMM (gemm_amx.py): the tile configuration, and the
32 x 32 block micro-kernel that multiplies fp32 operands split into three bfloat16 parts.

Why three parts: an fp32 value x is h + m + l exactly, each part a bfloat16 (8 significant bits;
round-to-nearest-even splits, x - h and x - h - m are exact in fp32). A product is then
    x y = hh' + hm' + mh' + hl' + lh' + mm'  (+ ml' + lm' + ll', each below 2^-24 |x y|, dropped)
and AMX's TDPBF16PS multiplies bfloat16 pairs exactly and accumulates in fp32, so the six
products accumulate to an fp32-accurate result (the float64 reference tests bound its error next
to sgemm's). Six bfloat16 products still run ~2.3x the AVX-512 fp32 FMA rate on this kind of core
(a 32 x 32 block in L1 / L2: 360-420 GFLOP/s-equivalent a core against ~165-180 for fp32 FMA).

Layout of a packed panel chunk (uint16, 3072 elements = 6 KB, one 32-wide step of K):
    [split s: h, m, l][half: 16 rows or 16 columns][tile: 512 bf16 = 16 rows x 64 bytes]
A panels: tile row r holds A[r, k0:k0 + 32] (row-major). B panels: VNNI, tile row p holds
B[k0 + 2p, c], B[k0 + 2p + 1, c] for c = 0..15, interleaved. Panels start on 64-byte boundaries.

Tiles are per thread: every thread that runs amx_block32 runs amx_config first (its state is
lost to nothing else: the kernel saves it on context switches once the process has asked for
XTILEDATA, see gemm_amx.available).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_I8P = _I8.as_pointer()
_VOID = ir.VoidType()
CHUNK = 3072  # uint16 elements of one panel's 32-wide K step (3 splits x 2 halves x 512)
TILE_BYTES = 1024


@njit(inline="always")
def aligned(n, dtype, zero=False):
    """n elements of dtype (zeros if zero) starting on a 64-byte boundary, for panels and C tiles: a
    tile load that straddles cache lines runs 3-4x slower (measured: 4.8 vs 15-20 ns a TDPBF16PS
    with its loads; numba allocates on 32-byte boundaries)."""
    raw = np.zeros(n + 64, dtype) if zero else np.empty(n + 64, dtype)
    mis = np.int64(raw.ctypes.data % 64)
    off = ((64 - mis) % 64) // raw.itemsize
    return raw[off:off + n]


def _declare(module, name, args):
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(_VOID, args), name)


@intrinsic
def amx_config(typingctx, cfg):
    """ldtilecfg from cfg (a 64-byte uint8 array: config_bytes())."""
    if not (isinstance(cfg, types.Array) and cfg.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        builder.call(_declare(builder.module, "llvm.x86.ldtilecfg", [_I8P]), [builder.bitcast(data, _I8P)])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def amx_release(typingctx):
    """tilerelease: the thread's tiles back to their initial state (no XSAVE of 8 KB from here on)."""

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder.module, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.void(), codegen


def config_bytes():
    """The tile configuration every kernel here uses: palette 1, tiles 0-7 of 16 rows x 64 bytes
    (0-3: fp32 C tiles 16 x 16; 4-5: A tiles 16 x 32 bf16; 6-7: B tiles, 16 pairs x 16 columns)."""
    import numpy as np

    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:8] = 64
    cfg[48:56] = 16
    return cfg


# The six split products, in the order the block runs them (each a full 2 x 2 tile pass).
PRODUCTS = ((0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (0, 2))  # (A split, B split): h = 0, m = 1, l = 2


def _define_block32(module):
    """void f(i8* C, i64 ldc_bytes, i8* PA, i8* PB, i64 nk): C (32 x 32 fp32, rows ldc_bytes
    apart) = sum over nk chunks of the six split products of PA's and PB's panels (CHUNK layout).
    Each split product loads A0, B0, B1, A1 interleaved with the four TDPBF16PS that use them
    (that order measured 360-420 GFLOP/s-equivalent; all loads first, then the products: ~200)."""
    name = "nbformer_amx_block32"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(_VOID, [_I8P, _I64, _I8P, _I64, _I8P, _I8P, _I64, _I64]), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    c, ldc, c_in, ldc_in, pa, pb, nk, acc = fn.args
    load = _declare(module, "llvm.x86.tileloadd64", [_I8, _I8P, _I64])
    store = _declare(module, "llvm.x86.tilestored64", [_I8, _I8P, _I64])
    zero = _declare(module, "llvm.x86.tilezero", [_I8])
    dot = _declare(module, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8])
    entry, init_load, init_zero, pre, loop, done = (fn.append_basic_block(n) for n in
                                                    ("entry", "init_load", "init_zero", "pre", "loop", "done"))
    b = ir.IRBuilder(entry)

    def t(i):
        return ir.Constant(_I8, i)

    def n64(v):
        return ir.Constant(_I64, v)

    quads = ((0, 0), (0, 1), (1, 0), (1, 1))  # C tile i covers rows 16 r, columns 16 col
    b.cbranch(b.icmp_signed("!=", acc, n64(0)), init_load, init_zero)
    b.position_at_end(init_load)
    for i, (r, col) in enumerate(quads):
        b.call(load, [t(i), b.gep(c_in, [b.add(b.mul(ldc_in, n64(16 * r)), n64(64 * col))]), ldc_in])
    b.branch(pre)
    b.position_at_end(init_zero)
    for i in range(4):
        b.call(zero, [t(i)])
    b.branch(pre)
    b.position_at_end(pre)
    b.cbranch(b.icmp_signed(">", nk, n64(0)), loop, done)
    b.position_at_end(loop)
    k = b.phi(_I64)
    k.add_incoming(n64(0), pre)
    base = b.mul(k, n64(2 * CHUNK))  # bytes

    def at(p, off):
        return b.gep(p, [b.add(base, n64(off))])

    row64 = n64(64)
    for sa, sb in PRODUCTS:
        a0, a1 = at(pa, sa * 2 * TILE_BYTES), at(pa, sa * 2 * TILE_BYTES + TILE_BYTES)
        b0, b1 = at(pb, sb * 2 * TILE_BYTES), at(pb, sb * 2 * TILE_BYTES + TILE_BYTES)
        b.call(load, [t(4), a0, row64])
        b.call(load, [t(6), b0, row64])
        b.call(dot, [t(0), t(4), t(6)])
        b.call(load, [t(7), b1, row64])
        b.call(dot, [t(1), t(4), t(7)])
        b.call(load, [t(5), a1, row64])
        b.call(dot, [t(2), t(5), t(6)])
        b.call(dot, [t(3), t(5), t(7)])
    k_next = b.add(k, n64(1))
    k.add_incoming(k_next, loop)
    b.cbranch(b.icmp_signed("<", k_next, nk), loop, done)
    b.position_at_end(done)
    for i, (r, col) in enumerate(quads):
        b.call(store, [t(i), b.gep(c, [b.add(b.mul(ldc, n64(16 * r)), n64(64 * col))]), ldc])
    b.ret_void()
    return fn


@intrinsic
def amx_block32(typingctx, C, c_off, ldc, C_in, ci_off, ldc_in, PA, pa_off, PB, pb_off, nk, accumulate):
    """C[c_off + r*ldc + c] = (accumulate ? C_in[ci_off + r*ldc_in + c] : 0) + (A @ B)[r, c] for
    r, c < 32, over nk 32-wide K chunks of the packed panels PA[pa_off:], PB[pb_off:] (uint16
    arrays, offsets in elements; CHUNK layout). C and C_in are float32 arrays (they may be the same
    block), offsets and leading dimensions in elements. The caller keeps all of it in bounds.
    A partial sum stored and loaded back is exact (fp32 tiles), so splitting K over several calls
    gives the bits of one call."""
    if not (isinstance(C, types.Array) and C.dtype == types.float32):
        return None
    if not (isinstance(C_in, types.Array) and C_in.dtype == types.float32):
        return None
    for p in (PA, PB):
        if not (isinstance(p, types.Array) and p.dtype == types.uint16):
            return None
    sig = types.void(C, c_off, ldc, C_in, ci_off, ldc_in, PA, pa_off, PB, pb_off, nk, accumulate)

    def codegen(context, builder, signature, args):
        sty = signature.args

        def ptr(i, i_off):
            data = context.make_array(sty[i])(context, builder, args[i]).data
            off = context.cast(builder, args[i_off], sty[i_off], types.int64)
            return builder.bitcast(builder.gep(data, [off]), _I8P)

        def i64(i):
            return context.cast(builder, args[i], sty[i], types.int64)

        four = ir.Constant(_I64, 4)
        fn = _define_block32(builder.module)
        builder.call(fn, [ptr(0, 1), builder.mul(i64(2), four), ptr(3, 4), builder.mul(i64(5), four), ptr(6, 7),
                          ptr(8, 9), i64(10), i64(11)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def stream_block32(typingctx, dst, d_off, ld, src, s_off):
    """dst[d_off + r*ld + c] = src[s_off + 32 r + c] for r, c < 32 (float32 arrays, offsets and ld
    in elements) with non-temporal stores: a product's block goes to memory without first reading
    the line it overwrites (for outputs far bigger than the caches: an LM head's logits). The caller
    keeps both in bounds, dst[d_off] and every row 64-byte aligned, and runs store_fence before
    another thread reads dst."""
    for a in (dst, src):
        if not (isinstance(a, types.Array) and a.dtype == types.float32):
            return None
    sig = types.void(dst, d_off, ld, src, s_off)

    def codegen(context, builder, signature, args):
        sty = signature.args
        f32 = ir.FloatType()
        vp = ir.VectorType(f32, 16).as_pointer()

        def base(i, i_off):
            data = context.make_array(sty[i])(context, builder, args[i]).data
            return builder.gep(data, [context.cast(builder, args[i_off], sty[i_off], types.int64)])

        d, s_ = base(0, 1), base(3, 4)
        ld64 = context.cast(builder, args[2], sty[2], types.int64)
        nt = builder.module.add_metadata([ir.Constant(_I32, 1)])
        for r in range(32):
            row = builder.gep(d, [builder.mul(ld64, ir.Constant(_I64, r))])
            for h in range(2):
                v = builder.load(builder.bitcast(builder.gep(s_, [ir.Constant(_I64, 32 * r + 16 * h)]), vp), align=4)
                st = builder.store(v, builder.bitcast(builder.gep(row, [ir.Constant(_I64, 16 * h)]), vp), align=64)
                st.set_metadata("nontemporal", nt)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """sfence: this thread's non-temporal stores are visible before any later store (the parallel
    region's end then publishes them)."""

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder.module, "llvm.x86.sse.sfence", []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(x), codegen


@intrinsic
def bits_f32(typingctx, u):
    """The float32 whose IEEE bits are the low 32 bits of the unsigned integer u."""
    if not (isinstance(u, types.Integer) and not u.signed):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, _I32)
        elif u.bitwidth < 32:
            v = builder.zext(v, _I32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen
