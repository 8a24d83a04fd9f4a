"""A 16 x 16 float32 block transposed in registers, for the AMX packers (gemm_amx.py) whose
operands arrive the other way round (training's W^T and dY^T): emitted as LLVM IR vectors, because
the scalar Numba loop neither vectorises nor keeps both blocks' cache lines in use (~1 ns an
element, as slow as the products it fed).

    transpose16(src, s_off, s_ld, dst, d_off, d_ld)   dst[d_off + i d_ld + j] = src[s_off + j s_ld + i]

for i, j < 16; src and dst float32 arrays, offsets and leading dimensions in elements; the caller
keeps both blocks in bounds. Four stages of two-row shuffles, stage k exchanging bit k of the row
index with bit k of the column index (16 shuffles each), then 16 row stores.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
N = 16


def _stage_masks(k):
    # rows r (bit k clear) and r' = r | 2^k of a stage: the new r keeps its columns with bit k clear
    # and takes r''s columns c ^ 2^k for the others; the new r' the other way round
    bit = 1 << k
    low = [c if not c & bit else N + (c ^ bit) for c in range(N)]
    high = [c ^ bit if not c & bit else N + c for c in range(N)]
    return ir.Constant(ir.VectorType(_I32, N), low), ir.Constant(ir.VectorType(_I32, N), high)


def _define(module):
    name = "nbformer_transpose16"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fp = _F32.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [fp, _I64, fp, _I64]), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    fn.attributes.add("alwaysinline")
    src, s_ld, dst, d_ld = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    vp = ir.VectorType(_F32, N).as_pointer()
    rows = []
    for r in range(N):
        p = b.gep(src, [b.mul(s_ld, ir.Constant(_I64, r))])
        rows.append(b.load(b.bitcast(p, vp), align=4))
    for k in range(4):
        low, high = _stage_masks(k)
        bit = 1 << k
        new = list(rows)
        for r in range(N):
            if not r & bit:
                new[r] = b.shuffle_vector(rows[r], rows[r | bit], low)
                new[r | bit] = b.shuffle_vector(rows[r], rows[r | bit], high)
        rows = new
    for r in range(N):
        p = b.gep(dst, [b.mul(d_ld, ir.Constant(_I64, r))])
        b.store(rows[r], b.bitcast(p, vp), align=4)
    b.ret_void()
    return fn


def _is_f32(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.float32


@intrinsic
def transpose16(typingctx, src, s_off, s_ld, dst, d_off, d_ld):
    if not (_is_f32(src) and _is_f32(dst)):
        return None

    def codegen(context, builder, signature, args):
        sty = signature.args

        def ptr(i, i_off):
            data = context.make_array(sty[i])(context, builder, args[i]).data
            off = context.cast(builder, args[i_off], sty[i_off], types.int64)
            return builder.gep(data, [off])

        def ld(i):
            return context.cast(builder, args[i], sty[i], types.int64)

        builder.call(_define(builder.module), [ptr(0, 1), ld(2), ptr(3, 4), ld(5)])
        return context.get_dummy_value()

    return types.void(src, s_off, s_ld, dst, d_off, d_ld), codegen
