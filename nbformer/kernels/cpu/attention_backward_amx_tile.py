"""The AMX attention backward's softmax gradient fused with the packing of its results
(attention_backward_amx.py): two query rows x 16 keys of S and dP in, P and dS out as bfloat16
splits in the layouts the next tile products read, nothing stored as fp32.

    pds_pack16(S, s_off, ld, DP, l2_0, l2_1, d_0, d_1, v_0, v_1, allow, a_off, scale, PB, pb_off, DB, DA, da_off)
for rows e = 0, 1 (S / DP at s_off + e*ld, 16 floats each) and lanes c < 16:
    p  = exp2(min(S - l2_e, 0)) * allow[a_off + c]     (0 where c >= v_e: keys the row must not see)
    ds = p * (DP - d_e) * scale                          (0 where c >= v_e)
    PB / DB[pb_off + 2c + e + 1024 s] = part s of p / ds  (VNNI: the two rows interleaved, B operands)
    DA[da_off + 32 e + c + 1024 s] = part s of ds          (rows of an A operand)
the parts as bf16_split's (x = h + m + l exactly) and p, ds by attention_backward_tile's operations
(the same exp2 polynomial, explicit flags so that Numba's fastmath pass changes none of them).

Why: as an element-wise pass over the fp32 tile followed by the three packs, this work took 6 us of a
64 x 64 tile pair (one thread, Xeon), more than its five tile products on AMX.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .attention_backward_tile import _NOFM, _const, _emit_exp2
from .bf16_split import PART_STRIDE, _parts

_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _define(module):
    name = "nbformer_pds_pack16"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fp, hp = _F32.as_pointer(), _I16.as_pointer()
    vt = ir.VectorType(_F32, 16)
    fma = module.globals.get("llvm.fma.v16f32") or ir.Function(module, ir.FunctionType(vt, [vt, vt, vt]),
                                                               "llvm.fma.v16f32")
    floor = module.globals.get("llvm.floor.v16f32") or ir.Function(module, ir.FunctionType(vt, [vt]),
                                                                   "llvm.floor.v16f32")
    # (s0, s1, dp0, dp1, l2_0, l2_1, d0, d1, v0, v1, allow, scale, pb, db, da0)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [fp, fp, fp, fp, _F32, _F32, _F32, _F32, _I64, _I64, fp,
                                                             _F32, hp, hp, hp]), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    fn.attributes.add("alwaysinline")
    s0, s1, g0, g1, l0, l1, d0, d1, v0, v1, al, scale, pb, db, da = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    vi = ir.VectorType(_I32, 16)
    lanes = ir.Constant(vi, [ir.Constant(_I32, c) for c in range(16)])
    zero = _const(vt, 16, 0.0)

    def load(p):
        return b.load(b.bitcast(p, vt.as_pointer()), align=4)

    def splat(x, ty):
        undef = ir.Constant(ir.VectorType(ty, 16), ir.Undefined)
        return b.shuffle_vector(b.insert_element(undef, x, ir.Constant(_I32, 0)), undef,
                                ir.Constant(ir.VectorType(_I32, 16), [0] * 16))

    allow = load(al)
    sc = splat(scale, _F32)
    ps, dss = [], []
    for sp, gp, l2, dd, v in ((s0, g0, l0, d0, v0), (s1, g1, l1, d1, v1)):
        x = b.fsub(load(sp), splat(l2, _F32), flags=_NOFM)
        x = b.select(b.fcmp_ordered(">", x, zero, flags=_NOFM), zero, x)  # min(x, 0), NaN stays
        p = b.fmul(_emit_exp2(b, vt, 16, x, fma, floor), allow, flags=_NOFM)
        ds = b.fmul(b.fmul(p, b.fsub(load(gp), splat(dd, _F32), flags=_NOFM), flags=_NOFM), sc, flags=_NOFM)
        seen = b.icmp_signed("<", lanes, splat(b.trunc(v, _I32), _I32))
        ps.append(_parts(b, b.select(seen, p, zero)))
        dss.append(_parts(b, b.select(seen, ds, zero)))
    mask = ir.Constant(ir.VectorType(_I32, 32), [i // 2 + 16 * (i % 2) for i in range(32)])
    v32 = ir.VectorType(_I16, 32).as_pointer()
    v16 = ir.VectorType(_I16, 16).as_pointer()
    for s in range(3):
        off = ir.Constant(_I64, PART_STRIDE * s)
        b.store(b.shuffle_vector(ps[0][s], ps[1][s], mask), b.bitcast(b.gep(pb, [off]), v32), align=2)
        b.store(b.shuffle_vector(dss[0][s], dss[1][s], mask), b.bitcast(b.gep(db, [off]), v32), align=2)
        b.store(dss[0][s], b.bitcast(b.gep(da, [off]), v16), align=2)
        b.store(dss[1][s], b.bitcast(b.gep(da, [ir.Constant(_I64, PART_STRIDE * s + 32)]), v16), align=2)
    b.ret_void()
    return fn


def _is(arr, dtype):
    return isinstance(arr, types.Array) and arr.dtype == dtype


@intrinsic
def pds_pack16(typingctx, S, s_off, ld, DP, l2_0, l2_1, d_0, d_1, v_0, v_1, allow, a_off, scale, PB, pb_off, DB, DA,
               da_off):
    for a in (S, DP, allow):
        if not _is(a, types.float32):
            return None
    for a in (PB, DB, DA):
        if not _is(a, types.uint16):
            return None
    sig = types.void(S, s_off, ld, DP, l2_0, l2_1, d_0, d_1, v_0, v_1, allow, a_off, scale, PB, pb_off, DB, DA,
                     da_off)

    def codegen(context, builder, signature, args):
        sty = signature.args

        def i64(i):
            return context.cast(builder, args[i], sty[i], types.int64)

        def f32(i):
            return context.cast(builder, args[i], sty[i], types.float32)

        def ptr(i, off, elt):
            data = context.make_array(sty[i])(context, builder, args[i]).data
            return builder.bitcast(builder.gep(data, [off]), elt.as_pointer())

        so, lde = i64(1), i64(2)
        so1 = builder.add(so, lde)
        pbo = i64(14)
        fn = _define(builder.module)
        builder.call(fn, [ptr(0, so, _F32), ptr(0, so1, _F32), ptr(3, so, _F32), ptr(3, so1, _F32), f32(4), f32(5),
                          f32(6), f32(7), i64(8), i64(9), ptr(10, i64(11), _F32), f32(12), ptr(13, pbo, _I16),
                          ptr(15, pbo, _I16), ptr(16, i64(17), _I16)])
        return context.get_dummy_value()

    return sig, codegen
