"""fp32 -> three bfloat16 parts (x = h + m + l), 16 floats at a time, for packing AMX panels
(gemm_amx.py): emitted as LLVM IR vectors, because the scalar Numba loop did not vectorise
(0.5-1 ns an element a thread, as slow as the products it feeds).

    split16(src, s_off, dst, d_off)           dst[d_off + j + 1024 s] = part s of src[s_off + j]
    split_pairs16(src, s0, s1, dst, d_off)    dst[d_off + 2j + e + 1024 s] = part s of src[s_e + j]
                                              (e = 0, 1: two rows interleaved, AMX's VNNI layout)
for j < 16; src float32, dst uint16 arrays, offsets in elements; the caller keeps them in bounds.

Each part is the nearest bfloat16 (ties to even) of what the parts before it left, so the
subtractions are exact; NaN stays a quiet NaN in h; where h is +-inf (x inf, or within half a
bfloat16 ulp of FLT_MAX) m = l = 0. Where the host has AVX512-BF16 the roundings are its
VCVTNEPS2BF16 (_parts_cvt: the same parts for every |x| >= 2^-100, in about half the instructions). The subtractions carry an explicit flag: Numba's fastmath pass
gives a fastmath caller's flags to flagless float ops, and reassociating x - h - m would lose the
exactness.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_NOFM = ("arcp",)
PART_STRIDE = 1024  # uint16 elements between the h, m and l parts of a panel chunk (amx_tiles.CHUNK / 3)


def _splat(ty, n, v):
    return ir.Constant(ir.VectorType(ty, n), [v] * n)


class _BFloat16(ir.types._BaseFloatType):
    # LLVM's bfloat (llvmlite has no such type): fptrunc to it is VCVTNEPS2BF16 on AVX512-BF16 hosts
    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat16._create_instance()

def _host_has_avx512_bf16():
    from llvmlite import binding as llvm

    llvm.initialize_native_target()
    try:
        return bool(llvm.get_host_cpu_features().get("avx512bf16"))
    except Exception:
        return False


_CVT = _host_has_avx512_bf16()


def _parts_cvt(b, v):
    """_parts with the hardware's rounding (VCVTNEPS2BF16: nearest even, NaN quiet; it reads and
    writes subnormals as zero, so only parts below 2^-126 differ, which AMX reads as zero anyway):
    ~half the instructions of the integer rounding."""
    n = 16
    vf, vh = ir.VectorType(_F32, n), ir.VectorType(_I16, n)
    vb = ir.VectorType(_BFloat16(), n)
    vi = ir.VectorType(_I32, n)

    def bits(x):
        return b.bitcast(b.fptrunc(x, vb), vh)

    def wide(h):
        return b.bitcast(b.shl(b.zext(h, vi), _splat(_I32, n, 16)), vf)

    hb = bits(v)
    finite = b.icmp_unsigned("!=", b.and_(hb, _splat(_I16, n, 0x7F80)), _splat(_I16, n, 0x7F80))
    r = b.select(finite, b.fsub(v, wide(hb), flags=_NOFM), ir.Constant(vf, [0.0] * n))
    mb = bits(r)
    lb = bits(b.fsub(r, wide(mb), flags=_NOFM))
    return [hb, mb, lb]


def _parts(b, v):
    """[h, m, l] as <16 x i16> of the <16 x float> v. h rounds v to nearest even (NaN: kept, quiet);
    r = v - h (exact) has at most 16 significant bits, m rounds r (no NaN or inf can reach it),
    and r - m, exact with at most 8 significant bits, is a bfloat16 already: l is its top half."""
    if _CVT:
        return _parts_cvt(b, v)
    n = 16
    vf, vi = ir.VectorType(_F32, n), ir.VectorType(_I32, n)

    def c(x):
        return _splat(_I32, n, x)

    def rne(u):
        lsb = b.and_(b.lshr(u, c(16)), c(1))
        return b.and_(b.add(b.add(u, c(0x7FFF)), lsb), c(0xFFFF0000))

    u = b.bitcast(v, vi)
    nan = b.icmp_unsigned(">", b.and_(u, c(0x7FFFFFFF)), c(0x7F800000))
    hb = b.select(nan, b.and_(b.or_(u, c(0x00400000)), c(0xFFFF0000)), rne(u))
    finite = b.icmp_unsigned("!=", b.and_(hb, c(0x7F800000)), c(0x7F800000))
    r = b.select(finite, b.fsub(v, b.bitcast(hb, vf), flags=_NOFM), ir.Constant(vf, [0.0] * n))
    mb = rne(b.bitcast(r, vi))
    lb = b.bitcast(b.fsub(r, b.bitcast(mb, vf), flags=_NOFM), vi)
    return [b.trunc(b.lshr(x, c(16)), ir.VectorType(_I16, n)) for x in (hb, mb, lb)]


def _define(module, pairs):
    name = "nbformer_bf16_split_pairs16" if pairs else "nbformer_bf16_split16"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fp, hp = _F32.as_pointer(), _I16.as_pointer()
    args = [fp, fp, hp] if pairs else [fp, hp]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    fn.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    vf = ir.VectorType(_F32, 16)
    if pairs:
        s0, s1, dst = fn.args
        p0 = _parts(b, b.load(b.bitcast(s0, vf.as_pointer()), align=4))
        p1 = _parts(b, b.load(b.bitcast(s1, vf.as_pointer()), align=4))
        mask = ir.Constant(ir.VectorType(_I32, 32), [i // 2 + 16 * (i % 2) for i in range(32)])
        for s in range(3):
            v = b.shuffle_vector(p0[s], p1[s], mask)
            ptr = b.gep(dst, [ir.Constant(_I64, PART_STRIDE * s)])
            b.store(v, b.bitcast(ptr, ir.VectorType(_I16, 32).as_pointer()), align=2)
    else:
        src, dst = fn.args
        parts = _parts(b, b.load(b.bitcast(src, vf.as_pointer()), align=4))
        for s in range(3):
            ptr = b.gep(dst, [ir.Constant(_I64, PART_STRIDE * s)])
            b.store(parts[s], b.bitcast(ptr, ir.VectorType(_I16, 16).as_pointer()), align=2)
    b.ret_void()
    return fn


def _ptr(context, builder, sty, args, i, i_off, elt):
    data = context.make_array(sty[i])(context, builder, args[i]).data
    off = context.cast(builder, args[i_off], sty[i_off], types.int64)
    return builder.bitcast(builder.gep(data, [off]), elt.as_pointer())


def _is(arr, dtype):
    return isinstance(arr, types.Array) and arr.dtype == dtype


@intrinsic
def split16(typingctx, src, s_off, dst, d_off):
    if not (_is(src, types.float32) and _is(dst, types.uint16)):
        return None

    def codegen(context, builder, signature, args):
        sty = signature.args
        fn = _define(builder.module, False)
        builder.call(fn, [_ptr(context, builder, sty, args, 0, 1, _F32), _ptr(context, builder, sty, args, 2, 3, _I16)])
        return context.get_dummy_value()

    return types.void(src, s_off, dst, d_off), codegen


@intrinsic
def split_pairs16(typingctx, src, s0, s1, dst, d_off):
    if not (_is(src, types.float32) and _is(dst, types.uint16)):
        return None

    def codegen(context, builder, signature, args):
        sty = signature.args
        fn = _define(builder.module, True)
        builder.call(fn, [_ptr(context, builder, sty, args, 0, 1, _F32), _ptr(context, builder, sty, args, 0, 2, _F32),
                          _ptr(context, builder, sty, args, 3, 4, _I16)])
        return context.get_dummy_value()

    return types.void(src, s0, s1, dst, d_off), codegen
