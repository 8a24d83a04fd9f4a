"""Register-blocked micro-kernels for the CPU attention kernels: rank-t updates of a block of C
held in vector registers, emitted as LLVM IR from intrinsics (numba has no SIMD types and leaves
SLP vectorisation off).

    rank_update(C, c_off, ldc, M, N, A, a_off, a_t, a_r, B, b_off, ldb, nt, accumulate):
    C[c_off + r*ldc + c] (+)= sum_{t<nt} A[a_off + t*a_t + r*a_r] * B[b_off + t*ldb + c]
    for r < M, c < N; offsets and strides in elements from the arrays' data pointers.

Two implementations of that contract: _rank_update (6 x 16 blocks, AVX2) and _rank_update16
(12 x 32 blocks, AVX-512). Every element is the same FMA chain (t = 0, 1, ... in order) in both,
so they give the same bits; `rank_update` is the one for this host's ISA.
"""
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# ---------------------------------------------------------------- the block emitter (both kernels)
# numba has no SIMD types and leaves SLP vectorisation off, so the tile products run through a
# small LLVM-IR kernel emitted from an intrinsic: a rank-t update of an R x (W*NV) block of C
# held in NV*R vector registers of W floats across the whole t loop (the classic GEMM micro-kernel,
# no packing); 1-row and scalar-column (W = 1) variants take the ragged edges.
_F32T = ir.FloatType()
_I64T = ir.IntType(64)
_FPT = _F32T.as_pointer()


def _define_block(module, R, NV, W):
    """void f(C*, ldc, A*, a_t, a_r, B*, ldb, nt, accumulate):
    C[r*ldc + c] = (accumulate ? C[r*ldc + c] : 0) + sum_{t<nt} A[t*a_t + r*a_r] * B[t*ldb + c]
    for r < R, c < W*NV (W floats per vector, W = 1: scalars). Strides in elements."""
    name = f"nbformer_rank_update_r{R}v{NV}w{W}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    vt = ir.VectorType(_F32T, W) if W > 1 else _F32T
    fname = f"llvm.fma.v{W}f32" if W > 1 else "llvm.fma.f32"
    fma = module.globals.get(fname) or ir.Function(module, ir.FunctionType(vt, [vt, vt, vt]), fname)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_FPT, _I64T, _FPT, _I64T, _I64T, _FPT, _I64T,
                                                             _I64T, _I64T]), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    c_ptr, ldc, a_ptr, a_t, a_r, b_ptr, ldb, nt, accumulate = fn.args
    blocks = {n: fn.append_basic_block(n) for n in ("entry", "load", "zero", "pre", "loop", "done")}
    bld = ir.IRBuilder(blocks["entry"])
    zero = ir.Constant(_I64T, 0)
    n_acc = R * NV

    def at(base, off):
        ptr = bld.gep(base, [off])
        return bld.bitcast(ptr, vt.as_pointer()) if W > 1 else ptr

    def c_off(r, c):
        return bld.add(bld.mul(ldc, ir.Constant(_I64T, r)), ir.Constant(_I64T, W * c))

    bld.cbranch(bld.icmp_signed("!=", accumulate, zero), blocks["load"], blocks["zero"])
    bld.position_at_end(blocks["load"])
    loaded = [bld.load(at(c_ptr, c_off(r, c)), align=4) for r in range(R) for c in range(NV)]
    bld.branch(blocks["pre"])
    bld.position_at_end(blocks["zero"])
    bld.branch(blocks["pre"])
    bld.position_at_end(blocks["pre"])
    zv = ir.Constant(vt, [0.0] * W) if W > 1 else ir.Constant(_F32T, 0.0)
    init = []
    for k in range(n_acc):
        ph = bld.phi(vt)
        ph.add_incoming(loaded[k], blocks["load"])
        ph.add_incoming(zv, blocks["zero"])
        init.append(ph)
    a_rows = [bld.mul(a_r, ir.Constant(_I64T, r)) for r in range(R)]
    bld.cbranch(bld.icmp_signed(">", nt, zero), blocks["loop"], blocks["done"])

    bld.position_at_end(blocks["loop"])
    t = bld.phi(_I64T)
    t.add_incoming(zero, blocks["pre"])
    acc = []
    for k in range(n_acc):
        ph = bld.phi(vt)
        ph.add_incoming(init[k], blocks["pre"])
        acc.append(ph)
    b_row = bld.mul(t, ldb)
    bv = [bld.load(at(b_ptr, bld.add(b_row, ir.Constant(_I64T, W * c))), align=4) for c in range(NV)]
    a_row = bld.mul(t, a_t)
    new = [None] * n_acc
    for r in range(R):
        x = bld.load(bld.gep(a_ptr, [bld.add(a_row, a_rows[r])]), align=4)
        if W > 1:
            undef = ir.Constant(vt, ir.Undefined)
            x = bld.shuffle_vector(bld.insert_element(undef, x, ir.Constant(ir.IntType(32), 0)), undef,
                                   ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))
        for c in range(NV):
            new[r * NV + c] = bld.call(fma, [x, bv[c], acc[r * NV + c]])
    t_next = bld.add(t, ir.Constant(_I64T, 1))
    t.add_incoming(t_next, blocks["loop"])
    for k in range(n_acc):
        acc[k].add_incoming(new[k], blocks["loop"])
    bld.cbranch(bld.icmp_signed("<", t_next, nt), blocks["loop"], blocks["done"])

    bld.position_at_end(blocks["done"])
    final = []
    for k in range(n_acc):  # all phis first: LLVM wants them at the top of the block
        ph = bld.phi(vt)
        ph.add_incoming(init[k], blocks["pre"])
        ph.add_incoming(new[k], blocks["loop"])
        final.append(ph)
    for r in range(R):
        for c in range(NV):
            bld.store(final[r * NV + c], at(c_ptr, c_off(r, c)), align=4)
    bld.ret_void()
    return fn


def arg_readers(context, builder, signature, args):
    """For an intrinsic's codegen: ptr(i_arr, i_off), the float* data pointer of array argument i_arr plus
    the element offset in argument i_off; i64(i), integer argument i as an i64."""
    sty = signature.args

    def ptr(i_arr, i_off):
        data = context.make_array(sty[i_arr])(context, builder, args[i_arr]).data
        off = context.cast(builder, args[i_off], sty[i_off], types.int64)
        return builder.gep(builder.bitcast(data, _FPT), [off])

    def i64(i):
        return context.cast(builder, args[i], sty[i], types.int64)

    return ptr, i64


def _block_intrinsic(R, NV, W):
    @intrinsic
    def block(typingctx, C, c_off, ldc, A, a_off, a_t, a_r, Bm, b_off, ldb, nt, accumulate):
        for arr in (C, A, Bm):
            if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
                return None
        sig = types.void(C, c_off, ldc, A, a_off, a_t, a_r, Bm, b_off, ldb, nt, accumulate)

        def codegen(context, builder, signature, args):
            fn = _define_block(builder.module, R, NV, W)
            ptr, i64 = arg_readers(context, builder, signature, args)
            builder.call(fn, [ptr(0, 1), i64(2), ptr(3, 4), i64(5), i64(6), ptr(7, 8), i64(9),
                              i64(10), i64(11)])
            return context.get_dummy_value()

        return sig, codegen

    return block


# ---------------------------------------------------------------- 6 x 16 (AVX2) micro-kernel
# R = 6, NV = 2, W = 8 (12 accumulators of 8 floats): ~85-90% of the FMA peak on AVX2.
_blk_6x16 = _block_intrinsic(6, 2, 8)
_blk_6x8 = _block_intrinsic(6, 1, 8)
_blk_6x1 = _block_intrinsic(6, 1, 1)
_blk_3x16 = _block_intrinsic(3, 2, 8)
_blk_3x8 = _block_intrinsic(3, 1, 8)
_blk_3x1 = _block_intrinsic(3, 1, 1)
_blk_1x16 = _block_intrinsic(1, 2, 8)
_blk_1x8 = _block_intrinsic(1, 1, 8)
_blk_1x1 = _block_intrinsic(1, 1, 1)


@njit  # (no cache=True: linked into the cached attention kernels)
def _rank_update(C, c_off, ldc, M, N, A, a_off, a_t, a_r, Bm, b_off, ldb, nt, accumulate):
    """C[c_off + r*ldc + c] (+)= sum_{t<nt} A[a_off + t*a_t + r*a_r] * B[b_off + t*ldb + c]
    for r < M, c < N. C, A, B are float32 arrays of any shape/layout; offsets and strides are
    in elements from their data pointers (so a 3-d strided buffer is addressed directly).
    Rows go 6 at a time (12 accumulators), the remainder 3 or 1 at a time."""
    r = 0
    while r < M:
        R = 6 if r + 6 <= M else (3 if r + 3 <= M else 1)
        co = c_off + r * ldc
        ao = a_off + r * a_r
        c = 0
        if R == 6:
            while c + 16 <= N:
                _blk_6x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _blk_6x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _blk_6x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        elif R == 3:
            while c + 16 <= N:
                _blk_3x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _blk_3x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _blk_3x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        else:
            while c + 16 <= N:
                _blk_1x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _blk_1x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _blk_1x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        r += R


# ---------------------------------------------------------------- 12 x 32 (AVX-512) micro-kernel
# The AVX2 micro-kernel above holds 6 x 16 floats of C in 12 8-wide registers. With AVX-512 there are
# 32 registers of 16 floats: a 12 x 32 block in 24 of them ran at ~3x its rate on a Zen 5 core (a
# 64x64x64 product, 1 thread: ~220 vs ~55-75 GFLOP/s) and ~160 GFLOP/s on a Xeon core, where the
# attention forward got 12-20 % faster at 128-1024 tokens with it. Same contract and the same
# per-element FMA chain (t = 0, 1, ... in order), so both give the same bits; hosts without AVX-512
# use _rank_update.
_b12x32, _b12x16, _b12x8, _b12x1 = (_block_intrinsic(12, nv, w) for nv, w in ((2, 16), (1, 16), (1, 8), (1, 1)))
_b4x32, _b4x16, _b4x8, _b4x1 = (_block_intrinsic(4, nv, w) for nv, w in ((2, 16), (1, 16), (1, 8), (1, 1)))
_b1x32, _b1x16, _b1x8, _b1x1 = (_block_intrinsic(1, nv, w) for nv, w in ((2, 16), (1, 16), (1, 8), (1, 1)))


@njit  # (no cache=True: linked into the cached attention kernels)
def _rank_update16(C, c_off, ldc, M, N, A, a_off, a_t, a_r, Bm, b_off, ldb, nt, accumulate):
    """_rank_update's contract: C[c_off + r*ldc + c] (+)= sum_{t<nt} A[a_off + t*a_t + r*a_r]
    * B[b_off + t*ldb + c] for r < M, c < N; rows 12 at a time (24 accumulators of 16 floats), the
    remainder 4 or 1 at a time; columns 32, 16, 8, 1 at a time."""
    r = 0
    while r < M:
        R = 12 if r + 12 <= M else (4 if r + 4 <= M else 1)
        co = c_off + r * ldc
        ao = a_off + r * a_r
        c = 0
        if R == 12:
            while c + 32 <= N:
                _b12x32(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 32
            if c + 16 <= N:
                _b12x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _b12x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _b12x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        elif R == 4:
            while c + 32 <= N:
                _b4x32(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 32
            if c + 16 <= N:
                _b4x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _b4x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _b4x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        else:
            while c + 32 <= N:
                _b1x32(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 32
            if c + 16 <= N:
                _b1x16(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 16
            if c + 8 <= N:
                _b1x8(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 8
            while c < N:
                _b1x1(C, co + c, ldc, A, ao, a_t, a_r, Bm, b_off + c, ldb, nt, accumulate)
                c += 1
        r += R


def _host_has_avx512():
    _llvm.initialize_native_target()
    try:
        return bool(_llvm.get_host_cpu_features().get("avx512f"))
    except Exception:  # features unknown: the AVX2 kernel is correct everywhere
        return False


# The ISA decides, not a tunable: Numba's on-disk cache is keyed by the host CPU and its features.
rank_update = _rank_update16 if _host_has_avx512() else _rank_update
