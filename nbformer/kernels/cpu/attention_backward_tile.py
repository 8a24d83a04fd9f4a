"""The attention backward's first step of a (query tile, key tile) pair as one register-blocked
micro-kernel: both products and the softmax gradient, with S and dP never leaving the registers.

    pds_tile(P, dS, c_off, ldc, M, N, Q, G, q_off, a_t, a_r, KT, VT, ldb, nt, lse, delta, l_off, allow, scale):
    for r < M, c < N (offsets and strides in elements from the arrays' data pointers; P and dS at c_off):
      s  = sum_{t<nt} Q[q_off + t*a_t + r*a_r] * KT[t*ldb + c]      (K^T pre-scaled: s in log2 units)
      dp = sum_{t<nt} G[q_off + t*a_t + r*a_r] * VT[t*ldb + c]
      p  = exp2(min(s - lse[l_off + r] * log2(e), 0)) * allow[c]
      P[c_off + r*ldc + c] = p;  dS[c_off + r*ldc + c] = p * (dp - delta[l_off + r]) * scale

Why a kernel of its own: as two rank-t updates (microkernel.rank_update) followed by an element-wise
pass, S and dP were stored, read back, P and dS stored again, in 8-lane vectors (LLVM's preferred width
on these CPUs). That pass took 5-9 ms of 53-64 ms of a B=1 NH=12 T=1024 HS=64 backward on one thread
(Xeon, AVX-512). Here the products accumulate an R x (W*NV) block of S and one of dP in 2*R*NV vector
registers across the t loop, and the exponential (attention._exp2's polynomial, the same operations)
runs on them in place. In-process A/Bs against the unfused path (the same bits): one thread 3.6-5.1 %
faster, 2-3 % causal; two threads -1.3 to +3.4 %, causal 2-4 %, with the host's phase
(benchmarks/results/attention_backward.md).

Every element is one FMA chain over t = 0, 1, ... in order and the same scalar operations afterwards,
whatever block (rows 6/2/1 and columns 32/16/8/1 with AVX-512, 4/2/1 and 8/4/2/1 without) computes
it, so tile sizes never change a bit; and they are the bits of the unfused path (tested). Masking (causal, rows that see no key) is the caller's: it zeroes those
entries afterwards; padding keys have allow = 0. NaN in s or dp stays NaN (ordered compares only).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .microkernel import _F32T, _FPT, _I64T, _host_has_avx512, arg_readers

_LOG2E = 1.4426950408889634
_EXP2 = (  # attention._exp2: clamp, cut-off and the degree-6 polynomial of 2**f on [-1/2, 1/2]
    -100.0, -80.0, 0.5,
    (0.00015337577497120947, 0.0013399859890341759, 0.009618519805371761, 0.05550329014658928,
     0.24022646248340607, 0.6931471824645996, 1.0))


# Numba's fastmath pass (numba.core.fastmathpass) gives the caller's flags (contract, reassoc, ...) to
# every float binop of the module that has no flags, and to every call returning a scalar float: in a
# fastmath caller LLVM could then fuse s - lse*log2(e) into an FMA in one block and not in another,
# and the bits would depend on the tile width. So every binop here carries an explicit flag that
# changes nothing without a division (arcp), and even the 1-wide blocks compute on <1 x float> vectors.
_NOFM = ("arcp",)


def _const(vt, W, x):
    c = ir.Constant(_F32T, float(np.float32(x)))
    return ir.Constant(vt, [c] * W)


def _emit_exp2(bld, vt, W, x, fma, floor):
    """2**x for x <= 0 as attention._exp2 computes it; NaN stays NaN."""
    xmin, xcut, half, coefs = _EXP2
    it = ir.VectorType(ir.IntType(32), W)
    y = bld.select(bld.fcmp_ordered("<", x, _const(vt, W, xmin), flags=_NOFM), _const(vt, W, xmin), x)
    n = bld.call(floor, [bld.fadd(y, _const(vt, W, half), flags=_NOFM)])
    n = bld.select(bld.fcmp_ordered("ord", n, n, flags=_NOFM), n, _const(vt, W, 0.0))  # NaN: no poison from fptosi
    f = bld.fsub(y, n, flags=_NOFM)
    p = _const(vt, W, coefs[0])
    for c in coefs[1:]:
        p = bld.call(fma, [p, f, _const(vt, W, c)])
    e = bld.shl(bld.add(bld.fptosi(n, it), ir.Constant(it, [ir.Constant(ir.IntType(32), 127)] * W)),
                ir.Constant(it, [ir.Constant(ir.IntType(32), 23)] * W))
    r = bld.fmul(p, bld.bitcast(e, vt), flags=_NOFM)
    return bld.select(bld.fcmp_ordered("<", x, _const(vt, W, xcut), flags=_NOFM), _const(vt, W, 0.0), r)


def _define_pds(module, R, NV, W):
    """void f(P*, dS*, ldc, Q*, G*, a_t, a_r, KT*, VT*, ldb, nt, lse*, delta*, allow*, scale)
    for an R x (W*NV) block (pointers already at the block; W = 1: <1 x float> vectors, see _NOFM)."""
    name = f"nbformer_pds_r{R}v{NV}w{W}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    vt = ir.VectorType(_F32T, W)
    sfx = f"v{W}f32"
    fma = module.globals.get(f"llvm.fma.{sfx}") or ir.Function(module, ir.FunctionType(vt, [vt, vt, vt]),
                                                               f"llvm.fma.{sfx}")
    floor = module.globals.get(f"llvm.floor.{sfx}") or ir.Function(module, ir.FunctionType(vt, [vt]),
                                                                   f"llvm.floor.{sfx}")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_FPT, _FPT, _I64T, _FPT, _FPT, _I64T, _I64T, _FPT,
                                                             _FPT, _I64T, _I64T, _FPT, _FPT, _FPT, _F32T]), name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    p_ptr, ds_ptr, ldc, q_ptr, g_ptr, a_t, a_r, kt_ptr, vt_ptr, ldb, nt, lse_ptr, d_ptr, al_ptr, scale = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    bld = ir.IRBuilder(entry)
    zero = ir.Constant(_I64T, 0)
    n_acc = R * NV
    zv = _const(vt, W, 0.0)

    def vec_at(base, off):
        return bld.bitcast(bld.gep(base, [off]), vt.as_pointer())

    def splat(x):
        undef = ir.Constant(vt, ir.Undefined)
        return bld.shuffle_vector(bld.insert_element(undef, x, ir.Constant(ir.IntType(32), 0)), undef,
                                  ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))

    a_rows = [bld.mul(a_r, ir.Constant(_I64T, r)) for r in range(R)]
    bld.cbranch(bld.icmp_signed(">", nt, zero), loop, done)

    bld.position_at_end(loop)
    t = bld.phi(_I64T)
    t.add_incoming(zero, entry)
    acc_s, acc_p = [], []
    for k in range(2 * n_acc):
        ph = bld.phi(vt)
        ph.add_incoming(zv, entry)
        (acc_s if k < n_acc else acc_p).append(ph)
    b_row = bld.mul(t, ldb)
    kv = [bld.load(vec_at(kt_ptr, bld.add(b_row, ir.Constant(_I64T, W * c))), align=4) for c in range(NV)]
    vv = [bld.load(vec_at(vt_ptr, bld.add(b_row, ir.Constant(_I64T, W * c))), align=4) for c in range(NV)]
    a_row = bld.mul(t, a_t)
    new_s, new_p = [None] * n_acc, [None] * n_acc
    for r in range(R):
        off = bld.add(a_row, a_rows[r])
        qb = splat(bld.load(bld.gep(q_ptr, [off]), align=4))
        gb = splat(bld.load(bld.gep(g_ptr, [off]), align=4))
        for c in range(NV):
            new_s[r * NV + c] = bld.call(fma, [qb, kv[c], acc_s[r * NV + c]])
            new_p[r * NV + c] = bld.call(fma, [gb, vv[c], acc_p[r * NV + c]])
    t_next = bld.add(t, ir.Constant(_I64T, 1))
    t.add_incoming(t_next, loop)
    for k in range(n_acc):
        acc_s[k].add_incoming(new_s[k], loop)
        acc_p[k].add_incoming(new_p[k], loop)
    bld.cbranch(bld.icmp_signed("<", t_next, nt), loop, done)

    bld.position_at_end(done)
    fin_s, fin_p = [], []
    for k in range(n_acc):  # all phis first
        for fin, new in ((fin_s, new_s), (fin_p, new_p)):
            ph = bld.phi(vt)
            ph.add_incoming(zv, entry)
            ph.add_incoming(new[k], loop)
            fin.append(ph)
    log2e = ir.Constant(_F32T, float(np.float32(_LOG2E)))
    sc = splat(scale)
    allow = [bld.load(vec_at(al_ptr, ir.Constant(_I64T, W * c)), align=4) for c in range(NV)]
    for r in range(R):
        ri = ir.Constant(_I64T, r)
        l2 = splat(bld.fmul(bld.load(bld.gep(lse_ptr, [ri]), align=4), log2e, flags=_NOFM))
        dr = splat(bld.load(bld.gep(d_ptr, [ri]), align=4))
        for c in range(NV):
            x = bld.fsub(fin_s[r * NV + c], l2, flags=_NOFM)
            x = bld.select(bld.fcmp_ordered(">", x, zv, flags=_NOFM), zv, x)  # min(x, 0), NaN stays
            p = bld.fmul(_emit_exp2(bld, vt, W, x, fma, floor), allow[c], flags=_NOFM)
            ds = bld.fmul(bld.fmul(p, bld.fsub(fin_p[r * NV + c], dr, flags=_NOFM), flags=_NOFM), sc, flags=_NOFM)
            off = bld.add(bld.mul(ldc, ri), ir.Constant(_I64T, W * c))
            bld.store(p, vec_at(p_ptr, off), align=4)
            bld.store(ds, vec_at(ds_ptr, off), align=4)
    bld.ret_void()
    return fn


def _pds_intrinsic(R, NV, W):
    @intrinsic
    def block(typingctx, P, dS, c_off, ldc, Q, G, q_off, a_t, a_r, KT, VT, b_off, ldb, nt, lse, delta, l_off,
              allow, a_off, scale):
        for arr in (P, dS, Q, G, KT, VT, lse, delta, allow):
            if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
                return None
        sig = types.void(P, dS, c_off, ldc, Q, G, q_off, a_t, a_r, KT, VT, b_off, ldb, nt, lse, delta, l_off,
                         allow, a_off, scale)

        def codegen(context, builder, signature, args):
            fn = _define_pds(builder.module, R, NV, W)
            ptr, i64 = arg_readers(context, builder, signature, args)
            builder.call(fn, [ptr(0, 2), ptr(1, 2), i64(3), ptr(4, 6), ptr(5, 6), i64(7), i64(8), ptr(9, 11),
                              ptr(10, 11), i64(12), i64(13), ptr(14, 16), ptr(15, 16), ptr(17, 18),
                              context.cast(builder, args[19], signature.args[19], types.float32)])
            return context.get_dummy_value()

        return sig, codegen

    return block


def _dispatcher(rows, cols):
    """An njit loop over the M x N tile in blocks: rows in steps of `rows` (largest first, each step
    while it fits), columns likewise in steps of `cols` (widths W*NV); each (R, width) its own block."""
    blocks = {(R, NV * W): _pds_intrinsic(R, NV, W) for R in rows for NV, W in cols}
    widths = [NV * W for NV, W in cols]
    assert rows[-1] == 1 and widths[-1] == 1 and len(rows) == 3 and len(widths) == 4
    r0, r1, r2 = rows
    w0, w1, w2, w3 = widths
    b = blocks

    # numba cannot index a dict of intrinsics at run time: the block calls are spelt out per (R, width)
    def make_row(Rn):
        f0, f1, f2, f3 = b[(Rn, w0)], b[(Rn, w1)], b[(Rn, w2)], b[(Rn, w3)]

        @njit(inline="always")
        def row(P, dS, co, ldc, N, Q, G, qo, a_t, a_r, KT, VT, ldb, nt, lse, delta, lo, allow, scale):
            c = 0
            while c + w0 <= N:
                f0(P, dS, co + c, ldc, Q, G, qo, a_t, a_r, KT, VT, c, ldb, nt, lse, delta, lo, allow, c, scale)
                c += w0
            while c + w1 <= N:
                f1(P, dS, co + c, ldc, Q, G, qo, a_t, a_r, KT, VT, c, ldb, nt, lse, delta, lo, allow, c, scale)
                c += w1
            while c + w2 <= N:
                f2(P, dS, co + c, ldc, Q, G, qo, a_t, a_r, KT, VT, c, ldb, nt, lse, delta, lo, allow, c, scale)
                c += w2
            while c < N:
                f3(P, dS, co + c, ldc, Q, G, qo, a_t, a_r, KT, VT, c, ldb, nt, lse, delta, lo, allow, c, scale)
                c += w3
        return row

    row0, row1, row2 = make_row(r0), make_row(r1), make_row(r2)

    @njit  # (no cache=True: linked into the cached attention backward kernels)
    def pds_tile(P, dS, c_off, ldc, M, N, Q, G, q_off, a_t, a_r, KT, VT, ldb, nt, lse, delta, l_off, allow, scale):
        r = 0
        while r < M:
            co, qo, lo = c_off + r * ldc, q_off + r * a_r, l_off + r
            if r + r0 <= M:
                row0(P, dS, co, ldc, N, Q, G, qo, a_t, a_r, KT, VT, ldb, nt, lse, delta, lo, allow, scale)
                r += r0
            elif r + r1 <= M:
                row1(P, dS, co, ldc, N, Q, G, qo, a_t, a_r, KT, VT, ldb, nt, lse, delta, lo, allow, scale)
                r += r1
            else:
                row2(P, dS, co, ldc, N, Q, G, qo, a_t, a_r, KT, VT, ldb, nt, lse, delta, lo, allow, scale)
                r += r2

    return pds_tile


# AVX-512 (32 registers of 16 floats): a 6 x 32 block of S and one of dP in 24 registers, 4 for the
# K^T / V^T rows; per t 4 loads and 12 broadcasts feed 24 FMAs. AVX2 (16 registers of 8 floats): 4 x 8
# blocks, 8 accumulators. The ISA decides, as for microkernel.rank_update.
_pds_tile16 = _dispatcher((6, 2, 1), ((2, 16), (1, 16), (1, 8), (1, 1)))
_pds_tile8 = _dispatcher((4, 2, 1), ((1, 8), (1, 4), (1, 2), (1, 1)))
pds_tile = _pds_tile16 if _host_has_avx512() else _pds_tile8
