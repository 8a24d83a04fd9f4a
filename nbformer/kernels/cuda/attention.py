"""Tiled FlashAttention-2-style attention forward on CUDA (numba-cuda), the twin of
nbformer/kernels/cpu/attention.py: same semantics, same argument order (outputs first).

out (B, Tq, NH*HS) = softmax(scale * Q K^T + mask) V, plus lse (B, NH, Tq), the per-row
logsumexp of the scaled scores that the backward pass needs.

Grid: one block per (batch*head, query tile of BQ rows); blockIdx.y runs the query tiles
last-first, so the heaviest causal tiles start first. The block's NT threads form a TY x TX grid
(tx fastest): thread (ty, tx) owns query rows ty + r*TY (r < RQ = BQ/TY), key columns
tx + c*TX of a key tile (c < RK = BK/TX) and output columns (g*TX + tx)*4 + k (k < 4, g < G,
4*G*TX = W = HS_MAX rounded up to a multiple of 4*TX). Per key tile of BK keys:

  1. the tile's key-mask bytes go to shared memory; syncthreads_or tells every thread whether
     any key of the tile is visible (a tile that is all padding is skipped, uniformly);
  2. K and V tiles are staged in shared memory (zero-padded to W columns and BK rows);
  3. S = (scale*Q) K^T for the thread's RQ x RK scores, in registers, 4 head columns per step
     (16-byte shared loads); masks (padding, causal, beyond key_len) set -inf; per-thread row
     maxima go to shared memory;
  4. every thread reduces the TX partial maxima of its rows in a fixed order (so all TX
     threads of a row hold bit-identical m), then P = exp(S - m) into shared memory (reusing
     the K buffer, whose reads are all done), rescales its O accumulator by exp(m_old - m),
     and keeps a per-thread partial row sum l;
  5. O += P V, 4 keys per step, P and V read from shared memory 16 bytes at a time.

Shared tiles have row strides of 4*(odd) floats: 8 threads reading 16 bytes from 8 consecutive
rows (or 128 consecutive bytes) touch 32 distinct banks, so the 16-byte loads are conflict-free.
O (RQ x RD per thread) lives in cuda.local.array registers and is written once; the partial
row sums are reduced in a fixed order at the end. Nothing of size Tq x Tk exists; per-block
shared memory is O((BQ + 2*BK) * HS_MAX). Key tiles beyond the causal diagonal of the tile's
last row are never visited. No atomics: same inputs, same bits.

Grouped-query attention (n_kv_heads = NKV < NH): query head h reads key/value head
h // (NH // NKV); the grid and everything else are unchanged (a kernel argument, not a variant).

A row with no visible key gets out = 0 and lse = -inf (m stays -inf; exp is taken against
0 instead of -inf, so no -inf - -inf). Dropout (dropout_p > 0) uses the CPU's counter-based
hash (nbformer/kernels/cpu/rng.py) ported as a device function, with the CPU counter layout
counter = ((b*NH + h)*Tq + i)*Tk + j (Tk = key_len), applied after the row sum like the CPU
kernel: same seed, same mask, on either device.

Tunables (compile-time constants of a cached variant, one per (BQ, BK, NT, HS_MAX, dropout)):
block_q (BQ), block_k (BK), threads (NT), hs_max (HS_MAX, the widest head a variant takes;
None = the call's head_size). They change the bits (summation order), not the semantics.
Constraints: static shared memory <= 48 KiB, NT <= 1024, NT = TY*TX with TY | BQ and TX | BK,
block_k a multiple of 4, RQ*(RK + RD + 4) <= 256 floats per thread. With no tile keyword the
launcher uses TUNABLES, or for heads too wide for them (e.g. 80, 128) the first valid of
CANDIDATES and smaller fallbacks. Resource use at the defaults (ptxas -v, sm_90, HS 64): 168
registers, 37.5 KB shared, no spills; inner loops: 64 FMA per 8 ld.shared.v4 (scores), 128 FMA
per 12 (P V). Shared-memory indices are unsigned (see the kernel): numba's negative-index
wraparound code on signed indices otherwise doubles the instructions of the inner loops.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, int32

from nbformer.errors import GraphError
from nbformer.kernels.cpu.attention import attention_flops  # noqa: F401  (re-export, benchmark)
from nbformer.kernels.cuda._jit import SIMULATOR, cuda, device_function, kernel  # noqa: F401
from nbformer.kernels.cuda.rng import _GOLDEN, add64, mix64, mul64

__all__ = ["attention_forward", "attention_flops", "TUNABLES", "CANDIDATES", "check_variant",
           "default_tiles", "get_variant", "SIMULATOR"]

# Defaults of the launcher's tile keywords; benchmarks/gpu/bench_attention.py sweeps CANDIDATES.
TUNABLES = {"block_q": 64, "block_k": 32, "threads": 128, "hs_max": None}
CANDIDATES = [  # (block_q, block_k, threads): all fit 48 KiB at HS 64
    (64, 32, 128), (64, 32, 256), (64, 16, 128), (32, 32, 64), (32, 32, 128), (32, 64, 128),
    (64, 32, 64), (96, 16, 192),
]
SHARED_LIMIT = 48 * 1024  # static shared memory per block
MAX_THREADS = 1024
MAX_LOCAL_FLOATS = 256  # per-thread register arrays (scores + accumulator); more would spill
_GRID_Y_MAX = 65535

_NEG_INF = np.float32(-np.inf)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)

_INV24 = np.float32(1.0 / 16777216.0)
_S40 = np.uint64(40)


@device_function
def _keep(seed, counter, p):
    """rng.keep on the device (the SplitMix64 of cuda/rng.py): True keeps the element (probability
    1 - p); seed uint64, counter a non-negative int64, p float64 (compared in float64 like the CPU
    attention kernels do)."""
    z = mix64(add64(seed, mul64(add64(np.uint64(counter), np.uint64(1)), _GOLDEN)))
    return np.float32(z >> _S40) * _INV24 >= p


# ---------------------------------------------------------------- 16-byte shared-memory access
# numba emits one scalar load per element and LLVM does not merge them (the unsigned index casts
# hide the adjacency), so the hot loops read and write shared memory 4 floats at a time through
# these: ld.shared.v4.f32 / st.shared.v4.f32 on the GPU, plain indexing under the simulator
# (which also checks the 16-byte alignment the GPU needs: index % 4 == 0 on 16-byte aligned arrays).
if SIMULATOR:
    _ALIGN = None  # the simulator refuses alignment= (its arrays are numpy arrays)

    @device_function
    def _ld4(a, i):
        if i % 4 != 0:
            raise IndexError(f"_ld4 at {i}: not 16-byte aligned")
        return a[i], a[i + 1], a[i + 2], a[i + 3]

    @device_function
    def _st4(a, i, x0, x1, x2, x3):
        if i % 4 != 0:
            raise IndexError(f"_st4 at {i}: not 16-byte aligned")
        a[i] = x0
        a[i + 1] = x1
        a[i + 2] = x2
        a[i + 3] = x3
else:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    _ALIGN = 16
    _V4 = _ir.VectorType(_ir.FloatType(), 4)

    def _v4_ptr(context, builder, aty, arr, ity, idx):
        ary = context.make_array(aty)(context, builder, arr)
        i = context.cast(builder, idx, ity, _types.intp)
        ptr = builder.gep(ary.data, [i])
        return builder.bitcast(ptr, _V4.as_pointer(ptr.type.addrspace))

    @_intrinsic
    def _ld4(typingctx, a, i):
        """(a[i], a[i+1], a[i+2], a[i+3]) in one 16-byte load; a float32, i % 4 == 0."""
        if not (isinstance(a, _types.Array) and a.dtype == _types.float32
                and isinstance(i, _types.Integer)):
            return None
        sig = _types.UniTuple(_types.float32, 4)(a, i)

        def codegen(context, builder, signature, args):
            ptr = _v4_ptr(context, builder, signature.args[0], args[0], signature.args[1], args[1])
            v = builder.load(ptr, align=16)
            vals = [builder.extract_element(v, _ir.Constant(_ir.IntType(32), k)) for k in range(4)]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    @_intrinsic
    def _st4(typingctx, a, i, x0, x1, x2, x3):
        """a[i:i+4] = x0..x3 in one 16-byte store; a float32, i % 4 == 0."""
        if not (isinstance(a, _types.Array) and a.dtype == _types.float32
                and isinstance(i, _types.Integer)):
            return None
        sig = _types.void(a, i, _types.float32, _types.float32, _types.float32, _types.float32)

        def codegen(context, builder, signature, args):
            ptr = _v4_ptr(context, builder, signature.args[0], args[0], signature.args[1], args[1])
            v = _ir.Constant(_V4, _ir.Undefined)
            for k in range(4):
                x = context.cast(builder, args[2 + k], signature.args[2 + k], _types.float32)
                v = builder.insert_element(v, x, _ir.Constant(_ir.IntType(32), k))
            builder.store(v, ptr, align=16)
            return context.get_dummy_value()

        return sig, codegen


# ---------------------------------------------------------------- variants
def _layout(bq, bk, nt):
    """(TY, TX) with TY*TX = nt, TY | bq, TX | bk: the most square per-thread score tile
    (smallest max(RQ, RK)), ties to the larger TX (wider coalesced rows). None if impossible."""
    best = None
    for tx in range(1, nt + 1):
        if nt % tx or bk % tx or bq % (nt // tx):
            continue
        ty = nt // tx
        key = (max(bq // ty, bk // tx), -tx)
        if best is None or key < best[0]:
            best = (key, ty, tx)
    return None if best is None else (best[1], best[2])


def _pad4(n):
    """Row stride for 16-byte accesses: a multiple of 4 floats with n/4 odd, so that 8 threads
    reading 16 bytes each from 8 consecutive rows hit 32 distinct banks."""
    n = -(-n // 4) * 4
    return n if (n // 4) % 2 == 1 else n + 4


def _geometry(bq, bk, nt, hsm):
    """Sizes of a variant (all in floats unless named *_bytes)."""
    ty, tx = _layout(bq, bk, nt)
    g = -(-hsm // (4 * tx))          # groups of 4 output columns per thread
    w = 4 * g * tx                   # padded head width covered by the tx threads
    hsp = _pad4(w)                   # row stride of the Q/K/V tiles
    bkp = _pad4(bk)                  # row stride of the P tile
    sq = bq * hsp
    skp = max(bk * hsp, bq * bkp)    # K tile, then P tile
    sv = bk * hsp
    sr = bq * tx
    shared_bytes = 4 * (sq + skp + sv + sr + bk) + 3 * 12  # + bk int32 flags, alignment slack
    return dict(TY=ty, TX=tx, RQ=bq // ty, RK=bk // tx, G=g, RD=4 * g, W=w, HSP=hsp, BKP=bkp,
                SQ=sq, SKP=skp, SV=sv, SR=sr, shared_bytes=shared_bytes)


def check_variant(bq, bk, nt, hsm, head_size=None):
    """Raise GraphError unless (block_q, block_k, threads, hs_max) is a valid variant."""
    what = f"block_q={bq}, block_k={bk}, threads={nt}, hs_max={hsm}"
    if bq < 1 or bk < 1 or nt < 1 or hsm < 1:
        raise GraphError(f"attention_forward on cuda: block_q, block_k, threads and hs_max must "
                         f"be >= 1, got {what}")
    if bk % 4:
        raise GraphError(f"attention_forward on cuda: block_k must be a multiple of 4 (P is read "
                         f"4 keys at a time), got {what}")
    if nt > MAX_THREADS:
        raise GraphError(f"attention_forward on cuda: threads={nt} > {MAX_THREADS} per block")
    if head_size is not None and head_size > hsm:
        raise GraphError(f"attention_forward on cuda: head_size {head_size} > hs_max {hsm}")
    if _layout(bq, bk, nt) is None:
        raise GraphError(f"attention_forward on cuda: threads={nt} cannot be split as TY*TX with "
                         f"TY dividing block_q={bq} and TX dividing block_k={bk} ({what})")
    g = _geometry(bq, bk, nt, hsm)
    if g["shared_bytes"] > SHARED_LIMIT:
        raise GraphError(f"attention_forward on cuda: {what} needs {g['shared_bytes']} bytes of "
                         f"shared memory per block, more than {SHARED_LIMIT}")
    local = g["RQ"] * (g["RK"] + g["RD"] + 4)
    if local > MAX_LOCAL_FLOATS:
        raise GraphError(f"attention_forward on cuda: {what} keeps {local} floats per thread "
                         f"(> {MAX_LOCAL_FLOATS}, would spill); use more threads or smaller tiles")
    return g


_FALLBACK_TILES = [(32, 16, 64), (16, 16, 64), (16, 8, 32), (8, 8, 16)]
_DEFAULT_TILES: dict = {}


def default_tiles(hsm):
    """(block_q, block_k, threads) when the caller names none: TUNABLES if that variant is
    valid for this head width, else the first valid of CANDIDATES and smaller fallbacks (wide
    heads, e.g. 128, do not fit the default tiles in 48 KiB of shared memory)."""
    t = _DEFAULT_TILES.get(hsm)
    if t is None:
        first = (TUNABLES["block_q"], TUNABLES["block_k"], TUNABLES["threads"])
        for cand in [first] + CANDIDATES + _FALLBACK_TILES:
            try:
                check_variant(*cand, hsm)
            except GraphError:
                continue
            t = _DEFAULT_TILES[hsm] = tuple(int(x) for x in cand)
            break
        else:
            check_variant(*first, hsm)  # raises, naming the default
    return t


_VARIANTS: dict = {}


def get_variant(bq, bk, nt, hsm, dropout=False):
    """The kernel for (BQ, BK, NT, HS_MAX, with dropout or not), built once per process
    (compiled by numba on its first launch)."""
    key = (int(bq), int(bk), int(nt), int(hsm), bool(dropout))
    k = _VARIANTS.get(key)
    if k is None:
        k = _VARIANTS[key] = _build(*key, **check_variant(*key[:4]))
    return k


def _build(BQ, BK, NT, HSM, DROP, *, TY, TX, RQ, RK, G, RD, W, HSP, BKP, SQ, SKP, SV, SR,
           shared_bytes):
    KROWS = -(-BK // TY)  # K/V rows loaded per thread: ty + rr*TY, rr < KROWS
    NS = RQ * RK  # array sizes must be single compile-time constants
    NA = RQ * RD
    NQ4 = RQ * 4
    NK4 = BK // 4
    ALIGN = _ALIGN
    del HSM, W, shared_bytes

    @kernel(cache=True)  # closure: plain ints, bools and None only (the disk cache keys on them)
    def attention_fwd(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, Tk, causal,
                      scale, p_drop, seed, group):
        sQ = cuda.shared.array(SQ, float32, alignment=ALIGN)    # (BQ, HSP) scale * Q tile
        sKP = cuda.shared.array(SKP, float32, alignment=ALIGN)  # (BK, HSP) K, then (BQ, BKP) P
        sV = cuda.shared.array(SV, float32, alignment=ALIGN)    # (BK, HSP) V tile
        sR = cuda.shared.array(SR, float32)    # (BQ, TX) per-thread row maxima / row sums
        sM = cuda.shared.array(BK, int32)      # 1 where the tile's key is visible (mask, key_len)
        s = cuda.local.array(NS, float32)      # scores s[r*RK + c]: row ty + r*TY, key tx + c*TX
        acc = cuda.local.array(NA, float32)    # O acc[r*RD + 4g + k]: column (g*TX + tx)*4 + k
        m = cuda.local.array(RQ, float32)
        l = cuda.local.array(RQ, float32)
        q4 = cuda.local.array(NQ4, float32)    # 4 consecutive Q (or P) values of each row
        v4 = cuda.local.array(RD, float32)

        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        bh = cuda.blockIdx.x
        b = bh // NH
        h = bh - b * NH
        Tq = q_buf.shape[1]
        i0 = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * BQ
        nq = min(BQ, Tq - i0)
        shift = Tk - Tq  # causal: query i sees key j iff j <= i + shift
        hk = h // group  # grouped-query attention: the key/value head of query head h
        qc = q_off + h * HS
        kc = k_off + hk * HS
        vc = v_off + hk * HS
        inv_keep = _ONE
        if DROP:
            inv_keep = np.float32(1.0 / (1.0 - p_drop))

        # Shared-memory indices are unsigned (np.uint32 bases + compile-time offsets): numba
        # adds negative-index wraparound code to every signed index, which costs more than the
        # FMAs it feeds and keeps the constant offsets out of the addressing.
        uq = np.uint32(ty * HSP)       # this thread's first Q row (also first K/V load row)
        uk = np.uint32(tx * HSP)       # this thread's first K row (scores)
        up = np.uint32(ty * BKP)       # this thread's first P row
        ur = np.uint32(ty * TX)        # this thread's first sR row
        uc = np.uint32(tx * 4)         # this thread's first column (group g adds g*TX*4)
        utx = np.uint32(tx)
        nd4 = np.uint32((HS + 3) // 4)  # columns HS..4*nd4 are zero in the tiles
        ub = np.uint32(b)
        for r in range(RQ):
            row = ty + r * TY
            for g in range(G):
                c0 = tx * 4 + g * TX * 4
                for k in range(4):
                    x = _ZERO
                    if row < nq and c0 + k < HS:
                        x = q_buf[ub, np.uint32(i0 + row), np.uint32(qc + c0 + k)] * scale
                    v4[k] = x
                _st4(sQ, uq + uc + np.uint32(r * TY * HSP + g * TX * 4), v4[0], v4[1], v4[2],
                     v4[3])
            m[r] = _NEG_INF
            l[r] = _ZERO
            for e in range(RD):
                acc[r * RD + e] = _ZERO

        j_end = Tk
        if causal:
            j_end = min(Tk, i0 + nq + shift)  # keys visible to the tile's last row
        n_kt = (j_end + BK - 1) // BK
        for kt in range(n_kt):
            j0 = kt * BK
            nk = min(BK, j_end - j0)
            # 1. mask flags; the barrier also ends the previous tile's reads of sKP/sV
            flag = 0
            for jl in range(tid, BK, NT):
                f = 0
                if jl < nk:
                    if key_mask[ub, np.uint32(j0 + jl)] != 0:
                        f = 1
                sM[np.uint32(jl)] = f
                flag |= f
            if cuda.syncthreads_or(flag) == 0:
                continue  # every key of this tile is padding
            # 2. K and V tiles (zero rows past nk and zero columns past HS)
            for rr in range(KROWS):
                j = ty + rr * TY
                if j < BK:
                    row_kv = np.uint32(j0 + j)
                    for g in range(G):
                        c0 = tx * 4 + g * TX * 4
                        for k in range(4):
                            kx = _ZERO
                            vx = _ZERO
                            if j < nk and c0 + k < HS:
                                kx = kv_buf[ub, row_kv, np.uint32(kc + c0 + k)]
                                vx = kv_buf[ub, row_kv, np.uint32(vc + c0 + k)]
                            q4[k] = kx
                            v4[k] = vx
                        dst = uq + uc + np.uint32(rr * TY * HSP + g * TX * 4)  # row j, col c0
                        _st4(sKP, dst, q4[0], q4[1], q4[2], q4[3])
                        _st4(sV, dst, v4[0], v4[1], v4[2], v4[3])
            cuda.syncthreads()
            # 3. scores (4 head columns per step), masks, per-thread row maxima
            for x in range(NS):
                s[x] = _ZERO
            for d4 in range(nd4):
                d = d4 * np.uint32(4)
                for r in range(RQ):
                    a0, a1, a2, a3 = _ld4(sQ, uq + d + np.uint32(r * TY * HSP))
                    q4[4 * r] = a0
                    q4[4 * r + 1] = a1
                    q4[4 * r + 2] = a2
                    q4[4 * r + 3] = a3
                for c in range(RK):
                    k0, k1, k2, k3 = _ld4(sKP, uk + d + np.uint32(c * TX * HSP))
                    for r in range(RQ):
                        x = s[r * RK + c]
                        x += q4[4 * r] * k0
                        x += q4[4 * r + 1] * k1
                        x += q4[4 * r + 2] * k2
                        x += q4[4 * r + 3] * k3
                        s[r * RK + c] = x
            for r in range(RQ):
                row = ty + r * TY
                lim = i0 + row + shift - j0  # causal: local key jl visible iff jl <= lim
                mx = _NEG_INF
                for c in range(RK):
                    jl = tx + c * TX
                    x = s[r * RK + c]
                    if sM[utx + np.uint32(c * TX)] == 0 or (causal and jl > lim):
                        x = _NEG_INF
                    s[r * RK + c] = x
                    mx = max(mx, x)
                sR[ur + utx + np.uint32(r * TY * TX)] = mx
            cuda.syncthreads()
            # 4. online softmax: new row max, P to shared memory, rescale O and l
            for r in range(RQ):
                row = ty + r * TY
                mt = m[r]
                for t in range(TX):
                    mt = max(mt, sR[ur + np.uint32(r * TY * TX + t)])
                mu = mt
                if mt == _NEG_INF:
                    mu = _ZERO  # nothing visible yet: exp(-inf - 0) = 0, no -inf - -inf
                alpha = math.exp(m[r] - mu)
                m[r] = mt
                ps = _ZERO
                for c in range(RK):
                    p = math.exp(s[r * RK + c] - mu)
                    ps += p
                    if DROP:  # after the row sum, as on the CPU
                        jl = tx + c * TX
                        cnt = ((b * NH + h) * Tq + i0 + row) * Tk + j0 + jl
                        if row < nq and jl < nk and _keep(seed, cnt, p_drop):
                            p = p * inv_keep
                        else:
                            p = _ZERO
                    sKP[up + utx + np.uint32(r * TY * BKP + c * TX)] = p
                l[r] = l[r] * alpha + ps
                for e in range(RD):
                    acc[r * RD + e] *= alpha
            cuda.syncthreads()
            # 5. O += P V, 4 keys per step
            for j4 in range(NK4):
                for r in range(RQ):
                    a0, a1, a2, a3 = _ld4(sKP, up + np.uint32(r * TY * BKP + j4 * 4))
                    q4[4 * r] = a0
                    q4[4 * r + 1] = a1
                    q4[4 * r + 2] = a2
                    q4[4 * r + 3] = a3
                for jj in range(4):
                    vrow = np.uint32((j4 * 4 + jj) * HSP)
                    for g in range(G):
                        a0, a1, a2, a3 = _ld4(sV, vrow + uc + np.uint32(g * TX * 4))
                        v4[4 * g] = a0
                        v4[4 * g + 1] = a1
                        v4[4 * g + 2] = a2
                        v4[4 * g + 3] = a3
                    for r in range(RQ):
                        p = q4[4 * r + jj]
                        for e in range(RD):
                            acc[r * RD + e] += p * v4[e]

        # epilogue: row sums in a fixed order, normalise, write out and lse once
        for r in range(RQ):
            sR[ur + utx + np.uint32(r * TY * TX)] = l[r]
        cuda.syncthreads()
        oc = h * HS
        for r in range(RQ):
            row = ty + r * TY
            if row < nq:
                tot = _ZERO
                for t in range(TX):
                    tot += sR[ur + np.uint32(r * TY * TX + t)]
                ui = np.uint32(i0 + row)
                if tot != _ZERO:  # NaN inputs give NaN rows, not empty ones
                    inv = _ONE / tot
                    for g in range(G):
                        for k in range(4):
                            col = tx * 4 + g * TX * 4 + k
                            if col < HS:
                                out[ub, ui, np.uint32(oc + col)] = acc[r * RD + 4 * g + k] * inv
                    if tx == 0:
                        lse[ub, np.uint32(h), ui] = np.float32(np.float64(m[r])
                                                              + math.log(np.float64(tot)))
                else:
                    for g in range(G):
                        for k in range(4):
                            col = tx * 4 + g * TX * 4 + k
                            if col < HS:
                                out[ub, ui, np.uint32(oc + col)] = _ZERO
                    if tx == 0:
                        lse[ub, np.uint32(h), ui] = _NEG_INF

    return attention_fwd


# ---------------------------------------------------------------- launcher
def _device_array(name, a, dtype, ndim):
    """a as a numba device array of dtype/ndim, C-contiguous; GraphError naming it otherwise.
    Objects exposing __cuda_array_interface__ (e.g. torch CUDA tensors) are wrapped, no copy."""
    if isinstance(a, np.ndarray):
        raise GraphError(f"attention_forward on cuda: {name} must be a CUDA device array "
                         f"(numba.cuda.to_device / device_array), got a host numpy array")
    if (not hasattr(a, "copy_to_host") and hasattr(a, "__cuda_array_interface__")
            and hasattr(cuda, "as_cuda_array")):
        a = cuda.as_cuda_array(a)
    if not all(hasattr(a, x) for x in ("shape", "dtype", "is_c_contiguous")):
        raise GraphError(f"attention_forward on cuda: {name} must be a CUDA device array, got "
                         f"{type(a).__name__}")
    if a.dtype != dtype or len(a.shape) != ndim:
        raise GraphError(f"attention_forward on cuda: {name} must be a {ndim}-d {np.dtype(dtype)} "
                         f"device array, got {a.dtype} of {len(a.shape)} dims")
    if not a.is_c_contiguous():
        raise GraphError(f"attention_forward on cuda: {name} must be C-contiguous (pass the "
                         f"whole buffer with offsets / key_len instead of a strided view)")
    return a


def attention_forward(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, n_heads, head_size,
                      causal, scale, block_q=None, block_k=None, dropout_p=0.0, seed=0,
                      key_len=None, threads=None, hs_max=None, n_kv_heads=None):
    """Scaled dot-product attention forward on CUDA, FlashAttention-2 style, into out and lse.

    Same contract as nbformer.kernels.cpu.attention.attention_forward, on device arrays:
    out (B, Tq, NH*HS) float32, written fully; lse (B, NH, Tq) float32: logsumexp of the scaled
    scores per query row (-inf, with out 0, for rows that see no key). q_buf (B, Tq, Wq): head h
    at columns q_off + h*HS; kv_buf (B, Tkmax, Wkv): keys at k_off + h*HS, values at
    v_off + h*HS (may be q_buf itself, e.g. a fused qkv). key_mask (B, Tkmax) uint8, 1 = attend.
    key_len (default Tkmax): only the first key_len keys of kv_buf/key_mask are attended (a
    KV-cache prefix without slicing the device buffer); Tk = key_len below. causal is
    bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq). dropout_p/seed: attention
    dropout with the CPU's counter-based mask (counter ((b*NH+h)*Tq + i)*Tk + j); lse is that of
    the undropped scores. All arrays C-contiguous device arrays (numba, or anything with
    __cuda_array_interface__). block_q/block_k/threads/hs_max override TUNABLES (None: default;
    hs_max None = head_size). n_kv_heads: grouped-query attention, NKV key/value heads (dividing
    NH) at k_off/v_off + g*HS; query head h reads kv head h // (NH // NKV); None = NH. Runs on
    numba's default stream, asynchronously.
    """
    NH, HS = int(n_heads), int(head_size)
    if NH < 1 or HS < 1:
        raise GraphError(f"attention_forward on cuda: n_heads and head_size must be >= 1, "
                         f"got {NH}, {HS}")
    NKV = NH if n_kv_heads is None else int(n_kv_heads)
    if NKV < 1 or NH % NKV:
        raise GraphError(f"attention_forward on cuda: n_kv_heads = {NKV} must be >= 1 and divide "
                         f"n_heads = {NH}")
    hsm = TUNABLES["hs_max"] if hs_max is None else hs_max
    hsm = HS if hsm is None else int(hsm)
    if block_q is None and block_k is None and threads is None:
        bq, bk, nt = default_tiles(hsm)
    else:
        bq = int(TUNABLES["block_q"] if block_q is None else block_q)
        bk = int(TUNABLES["block_k"] if block_k is None else block_k)
        nt = int(TUNABLES["threads"] if threads is None else threads)
    if bq < 1 or bk < 1:
        raise GraphError(f"attention_forward on cuda: block_q and block_k must be >= 1, "
                         f"got {bq}, {bk}")
    out = _device_array("out", out, np.float32, 3)
    lse = _device_array("lse", lse, np.float32, 3)
    q_buf = _device_array("q_buf", q_buf, np.float32, 3)
    kv_buf = _device_array("kv_buf", kv_buf, np.float32, 3)
    key_mask = _device_array("key_mask", key_mask, np.uint8, 2)
    B, Tq, Wq = (int(x) for x in q_buf.shape)
    Bk, Tkmax, Wkv = (int(x) for x in kv_buf.shape)
    C = NH * HS
    if Bk != B:
        raise GraphError(f"attention_forward on cuda: kv_buf batch {Bk} != q_buf batch {B}")
    q_off, k_off, v_off = int(q_off), int(k_off), int(v_off)
    if q_off < 0 or q_off + C > Wq:
        raise GraphError(f"attention_forward on cuda: q_buf width {Wq} cannot hold {NH} heads x "
                         f"{HS} at offset q_off={q_off}")
    for name, off in (("k_off", k_off), ("v_off", v_off)):
        if off < 0 or off + NKV * HS > Wkv:
            raise GraphError(f"attention_forward on cuda: kv_buf width {Wkv} cannot hold {NKV} "
                             f"heads x {HS} at offset {name}={off}")
    if tuple(out.shape) != (B, Tq, C):
        raise GraphError(f"attention_forward on cuda: out must be {(B, Tq, C)}, got "
                         f"{tuple(out.shape)}")
    if tuple(lse.shape) != (B, NH, Tq):
        raise GraphError(f"attention_forward on cuda: lse must be {(B, NH, Tq)}, got "
                         f"{tuple(lse.shape)}")
    if tuple(key_mask.shape) != (B, Tkmax):
        raise GraphError(f"attention_forward on cuda: key_mask must be {(B, Tkmax)} (kv_buf's "
                         f"batch and rows), got {tuple(key_mask.shape)}")
    Tk = Tkmax if key_len is None else int(key_len)
    if not 0 <= Tk <= Tkmax:
        raise GraphError(f"attention_forward on cuda: key_len must be in [0, {Tkmax}] (kv_buf "
                         f"rows), got {key_len}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise GraphError(f"attention_forward on cuda: dropout_p must be in [0, 1), got {dropout_p}")
    if HS > hsm:
        raise GraphError(f"attention_forward on cuda: head_size {HS} > hs_max {hsm}")
    kern = get_variant(bq, bk, nt, hsm, p > 0.0)
    nqt = -(-Tq // bq)
    if nqt > _GRID_Y_MAX:
        raise GraphError(f"attention_forward on cuda: {Tq} query rows need {nqt} tiles of "
                         f"block_q={bq}, more than {_GRID_Y_MAX}")
    if B == 0 or Tq == 0:
        return
    kern[(B * NH, nqt), nt](out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, Tk,
                            bool(causal), np.float32(scale), p,
                            np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), NH // NKV)
