"""Attention backward on CUDA, FlashAttention-2 style, deterministic: the twin of
nbformer/kernels/cpu/attention_backward.py (same launcher signature, outputs first, same semantics).

P is recomputed from the forward's logsumexp, P = exp(scale * q.k - lse), with D = rowsum(dO * O)
per (b, h, i). Two kernels, the CPU's two passes, so that no two threads ever add into the same
gradient element (no float atomics; same inputs, same bits, every run):

  dq pass, one block per (batch*head, query tile of BQ rows), last tiles first (most causal work):
      stages the Q and dO tiles, computes D for its rows (one thread per row, float64 in column
      order: the CPU's bits) and writes it to `delta`, then walks the key tiles up to the causal
      limit of its last row: S = Q K^T and dP = dO V^T, dS = P (dP - D) scale, dQ += dS K.
  dkdv pass, one block per (batch*head, key tile of BK keys), launched after the dq pass (it
      reads `delta`): stages the K and V tiles once, then walks the query tiles from the first row
      that sees the tile (causal): S, dP as above, dV += P^T dO, dK += dS^T Q.

Grouped-query attention (n_kv_heads = NKV < NH): query head h reads key/value head h // (NH // NKV);
the dq pass is unchanged, and a dkdv block is (batch*kv head, key tile), walking the query tiles of
each query head of its group in increasing head order, summing into the same registers: dK/dV of a
kv head are the group's sums in a fixed order (no atomics, deterministic).

Both passes write every element of their column ranges (zeros for keys no row sees, for rows that
see no key, for key tiles that are all padding), exactly as the CPU kernel does; dq_buf and
dkv_buf may be the same array (self-attention on a fused QKV buffer): the column ranges written
are disjoint and neither pass reads them. Key tiles whose keys are all padding (a
syncthreads_or over the tile's mask bytes, uniform over the block) and query/key tiles beyond the
causal diagonal (bottom-right aligned: query i sees key j iff j <= i + Tk - Tq) are skipped.
Memory is linear in T: per block O((BQ + BK) * HS) floats of shared memory, nothing of size
Tq x Tk. Exponentials are clamped at 0 (exp(min(s*scale - lse, 0))) and never taken for a masked
key, so huge scores on padded keys cannot turn into inf * 0 = NaN; rows with lse = -inf (no visible
key) contribute nothing.

Thread layouts (NT threads per block, all compile-time constants of a cached variant):
  scores: TY x TX threads (TY | BQ, TX | BK), thread (ty, tx) owns rows ty + r*TY (r < RQ) and
      keys tx + c*TX (c < RK) of the BQ x BK tile, in registers; rows of the Q/dO/K/V tiles are
      padded to an odd stride, so the TX threads reading TX key rows hit distinct banks.
  accumulators: TR x TD threads (TR | BK for dK/dV, TR | BQ for dQ), thread (tr, td) owns rows
      tr + a*TR and head columns td + e*TD (consecutive td: coalesced stores, conflict-free reads).

Attention dropout (dropout_p > 0): the kept probability of (b, h, i, j) is the CPU's
keep(seed, ((b*NH + h)*Tq + i)*Tk + j, p) (nbformer/kernels/cpu/rng.py, SplitMix64), through the
device port in cuda/attention.py, with scale 1/(1-p): the mask is regenerated, not stored, and is
the same on either device for the same seed.

Tunables (TUNABLES, read at every call; keywords override): block_q (BQ), block_k (BK), threads
(NT, threads per block of both passes). They change the summation order (bits), not the
semantics. Constraints: NT <= 1024, NT = TY*TX with TY | BQ and TX | BK, dynamic shared memory
<= 48 KiB per block, at most MAX_LOCAL_FLOATS register floats per thread. With no tile keyword
the launcher uses TUNABLES, or for heads too wide for them the first valid of CANDIDATES and
smaller fallbacks (default_tiles). The head size is a compile-time constant of a variant too.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from nbformer.errors import GraphError
from nbformer.kernels.cuda._jit import SIMULATOR, cuda, kernel
from nbformer.kernels.cuda.attention import _keep  # the CPU's rng.keep as a device function

__all__ = ["attention_backward", "TUNABLES", "CANDIDATES", "check_variant", "default_tiles",
           "get_variants", "attention_backward_flops", "SIMULATOR"]

# Under the simulator (one Python thread per CUDA thread) tiny tiles keep the tests quick and
# still run the multi-tile, ragged-tail and skipped-tile paths.
if SIMULATOR:
    TUNABLES = {"block_q": 4, "block_k": 4, "threads": 4}
else:
    TUNABLES = {"block_q": 32, "block_k": 32, "threads": 128}
CANDIDATES = [  # (block_q, block_k, threads) for a tuner / benchmarks/gpu/bench_attention_backward.py
    (32, 32, 128), (32, 32, 256), (32, 32, 64), (16, 32, 128), (32, 16, 128), (16, 16, 64),
    (16, 32, 64), (32, 16, 64),
]
_FALLBACK_TILES = [(16, 16, 64), (8, 8, 64), (16, 8, 32), (8, 8, 16), (4, 4, 4)]
BIT_CHANGING = {"block_q": True, "block_k": True, "threads": True}

SHARED_LIMIT = 48 * 1024  # dynamic shared memory per block without an opt-in
MAX_THREADS = 1024
MAX_LOCAL_FLOATS = 256    # register arrays per thread; more would spill to local memory
_GRID_Y_MAX = 65535

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_NEG_INF = np.float32(-np.inf)
_D0 = np.float64(0.0)


# ---------------------------------------------------------------- geometry
def _score_layout(bq, bk, nt):
    """(TY, TX), TY*TX = nt, TY | bq, TX | bk: fewest shared loads per head column (RQ + RK),
    ties to the larger TX. None when impossible."""
    best = None
    for tx in range(1, nt + 1):
        if nt % tx or bk % tx or bq % (nt // tx):
            continue
        ty = nt // tx
        key = (bq // ty + bk // tx, -tx)
        if best is None or key < best[0]:
            best = (key, ty, tx)
    return None if best is None else best[1:]


def _acc_layout(rows, hs, nt):
    """(TR, TD), TR*TD = nt, TR | rows: least work per thread (RR*RD, RD = ceil(hs/TD)), then
    fewest loads (RR + RD), ties to the larger TD (coalesced stores)."""
    best = None
    for tr in range(1, nt + 1):
        if nt % tr or rows % tr:
            continue
        td = nt // tr
        rr, rd = rows // tr, -(-hs // td)
        key = (rr * rd, rr + rd, -td)
        if best is None or key < best[0]:
            best = (key, tr, td)
    return best[1:]


def _odd(n):
    return n if n % 2 else n + 1


def _geometry(bq, bk, nt, hs):
    ty, tx = _score_layout(bq, bk, nt)
    tj, tdk = _acc_layout(bk, hs, nt)
    ti, tdq = _acc_layout(bq, hs, nt)
    hsp, bkp = _odd(hs), _odd(bk)
    rq, rk = bq // ty, bk // tx
    rj, rdk = bk // tj, -(-hs // tdk)
    ri, rdq = bq // ti, -(-hs // tdq)
    # shared floats: dkdv (K, V, Q, dO, P, dS, lse, D, mask) and dq (Q, dO, K, V, dS, lse, D, mask)
    f_dkdv = 2 * bk * hsp + 2 * bq * hsp + 2 * bq * bkp + 2 * bq + bk
    f_dq = 2 * bq * hsp + 2 * bk * hsp + bq * bkp + 2 * bq + bk
    local_dkdv = 2 * rq * rk + 2 * rq + 2 * rk + 2 * rj * rdk + 2 * rdk
    local_dq = 2 * rq * rk + 2 * rq + 2 * rk + ri * rdq + rdq + ri
    return dict(TY=ty, TX=tx, RQ=rq, RK=rk, TJ=tj, TDK=tdk, RJ=rj, RDK=rdk, TI=ti, TDQ=tdq, RI=ri,
                RDQ=rdq, HSP=hsp, BKP=bkp, smem_dkdv=4 * f_dkdv, smem_dq=4 * f_dq,
                local=max(local_dkdv, local_dq))


def check_variant(bq, bk, nt, hs):
    """The geometry of (block_q, block_k, threads) at head size hs; GraphError if invalid."""
    what = f"block_q={bq}, block_k={bk}, threads={nt}, head_size={hs}"
    for name, v in (("block_q", bq), ("block_k", bk), ("threads", nt), ("head_size", hs)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise GraphError(f"attention_backward on cuda: {name} must be an int >= 1, got {v!r}")
    if nt > MAX_THREADS:
        raise GraphError(f"attention_backward on cuda: threads={nt} > {MAX_THREADS} per block")
    if _score_layout(bq, bk, nt) is None:
        raise GraphError(f"attention_backward on cuda: threads={nt} cannot be split as TY*TX with TY "
                         f"dividing block_q={bq} and TX dividing block_k={bk} ({what})")
    g = _geometry(bq, bk, nt, hs)
    smem = max(g["smem_dkdv"], g["smem_dq"])
    if smem > SHARED_LIMIT:
        raise GraphError(f"attention_backward on cuda: {what} needs {smem} bytes of shared memory per "
                         f"block, more than {SHARED_LIMIT} (smaller block_q/block_k)")
    if g["local"] > MAX_LOCAL_FLOATS:
        raise GraphError(f"attention_backward on cuda: {what} keeps {g['local']} floats per thread "
                         f"(> {MAX_LOCAL_FLOATS}, would spill); use more threads or smaller tiles")
    return g


_DEFAULT_TILES: dict = {}


def default_tiles(hs):
    """(block_q, block_k, threads) when the caller names none: TUNABLES if valid for this head
    size, else the first valid of CANDIDATES and smaller fallbacks."""
    first = (TUNABLES["block_q"], TUNABLES["block_k"], TUNABLES["threads"])
    key = (first, hs)
    t = _DEFAULT_TILES.get(key)
    if t is None:
        for cand in [first] + CANDIDATES + _FALLBACK_TILES:
            try:
                check_variant(*cand, hs)
            except GraphError:
                continue
            t = _DEFAULT_TILES[key] = tuple(int(x) for x in cand)
            break
        else:
            check_variant(*first, hs)  # raises, naming the default
    return t


_VARIANTS: dict = {}


def get_variants(bq, bk, nt, hs, dropout=False):
    """(dq kernel, dkdv kernel, geometry) for these compile-time constants, built once per process."""
    key = (int(bq), int(bk), int(nt), int(hs), bool(dropout))
    v = _VARIANTS.get(key)
    if v is None:
        g = check_variant(*key[:4])
        v = _VARIANTS[key] = (_build_dq(*key, **g), _build_dkdv(*key, **g), g)
    return v


# ---------------------------------------------------------------- dq pass (and delta)
def _build_dq(BQ, BK, NT, HS, DROP, *, TY, TX, RQ, RK, TI, TDQ, RI, RDQ, HSP, BKP, **_):
    TD, RD = TDQ, RDQ
    NS = RQ * RK
    NA = RI * RD
    # dynamic shared memory layout (floats)
    OQ = 0
    OG = OQ + BQ * HSP
    OK = OG + BQ * HSP
    OV = OK + BK * HSP
    OS = OV + BK * HSP
    OL = OS + BQ * BKP
    OD = OL + BQ
    OM = OD + BQ

    @kernel(cache=True)  # closure: plain ints and bools only (the disk cache keys on them)
    def attention_bwd_dq(dq_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                         NH, causal, scale, p_drop, seed, group):
        sh = cuda.shared.array(0, float32)
        s = cuda.local.array(NS, float32)    # scores s[r*RK + c]: row ty + r*TY, key tx + c*TX
        dp = cuda.local.array(NS, float32)   # dO V^T, same layout
        qa = cuda.local.array(RQ, float32)
        ga = cuda.local.array(RQ, float32)
        ka = cuda.local.array(RK, float32)
        va = cuda.local.array(RK, float32)
        acc = cuda.local.array(NA, float32)  # dQ acc[a*RD + e]: row ti + a*TI, column td + e*TD
        sa = cuda.local.array(RI, float32)
        kb = cuda.local.array(RD, float32)

        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        ti = tid // TD
        td = tid - ti * TD
        bh = cuda.blockIdx.x
        b = bh // NH
        h = bh - b * NH
        Tq = q_buf.shape[1]
        Tk = kv_buf.shape[1]
        shift = Tk - Tq
        i0 = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * BQ  # last query tiles first
        nq = min(BQ, Tq - i0)
        hk = h // group  # grouped-query attention: the key/value head of query head h
        qc = q_off + h * HS
        kc = k_off + hk * HS
        vc = v_off + hk * HS
        oc = h * HS
        inv_keep = _ONE
        if DROP:
            inv_keep = float32(1.0 / (1.0 - p_drop))

        # Q and dO tiles (zero rows past nq)
        for e in range(tid, BQ * HS, NT):
            r = e // HS
            c = e - r * HS
            xq = _ZERO
            xg = _ZERO
            if r < nq:
                xq = q_buf[b, i0 + r, qc + c]
                xg = dout[b, i0 + r, oc + c]
            sh[OQ + r * HSP + c] = xq
            sh[OG + r * HSP + c] = xg
        cuda.syncthreads()
        # D = rowsum(dO * O): one thread per row, float64 in column order (the CPU's sum)
        for r in range(tid, BQ, NT):
            dsum = _D0
            L = _NEG_INF
            if r < nq:
                for c in range(HS):
                    dsum += float64(sh[OG + r * HSP + c] * out[b, i0 + r, oc + c])
                delta[b, h, i0 + r] = float32(dsum)
                L = lse[b, h, i0 + r]
            sh[OD + r] = float32(dsum)
            sh[OL + r] = L
        for x in range(NA):
            acc[x] = _ZERO

        j_stop = Tk
        if causal:
            j_stop = min(Tk, i0 + nq + shift)  # keys visible to the tile's last row
        n_kt = (max(j_stop, 0) + BK - 1) // BK
        uq = np.uint32(OQ + ty * HSP)
        ug = np.uint32(OG + ty * HSP)
        uk = np.uint32(OK + tx * HSP)
        uv = np.uint32(OV + tx * HSP)
        us = np.uint32(OS + ti * BKP)
        ukd = np.uint32(OK + td)
        for kt in range(n_kt):
            j0 = kt * BK
            nk = min(BK, j_stop - j0)
            # mask flags; the barrier also ends the previous tile's reads of sK and sS
            flag = 0
            for jl in range(tid, BK, NT):
                f = 0
                if jl < nk:
                    if key_mask[b, j0 + jl] != 0:
                        f = 1
                sh[OM + jl] = float32(f)
                flag |= f
            if cuda.syncthreads_or(flag) == 0:
                continue  # every key of this tile is padding (uniform over the block)
            for e in range(tid, BK * HS, NT):
                r = e // HS
                c = e - r * HS
                xk = _ZERO
                xv = _ZERO
                if r < nk:
                    xk = kv_buf[b, j0 + r, kc + c]
                    xv = kv_buf[b, j0 + r, vc + c]
                sh[OK + r * HSP + c] = xk
                sh[OV + r * HSP + c] = xv
            cuda.syncthreads()
            # S = Q K^T and dP = dO V^T for this thread's RQ x RK entries
            for x in range(NS):
                s[x] = _ZERO
                dp[x] = _ZERO
            for d in range(HS):
                ud = np.uint32(d)
                for r in range(RQ):
                    qa[r] = sh[uq + ud + np.uint32(r * TY * HSP)]
                    ga[r] = sh[ug + ud + np.uint32(r * TY * HSP)]
                for c in range(RK):
                    ka[c] = sh[uk + ud + np.uint32(c * TX * HSP)]
                    va[c] = sh[uv + ud + np.uint32(c * TX * HSP)]
                for r in range(RQ):
                    for c in range(RK):
                        s[r * RK + c] += qa[r] * ka[c]
                        dp[r * RK + c] += ga[r] * va[c]
            # dS = P (dP - D) scale, with dP dropped like the forward's P
            for r in range(RQ):
                row = ty + r * TY
                i = i0 + row
                L = sh[OL + row]
                Di = sh[OD + row]
                for c in range(RK):
                    jl = tx + c * TX
                    j = j0 + jl
                    ds = _ZERO
                    if row < nq and L != _NEG_INF and sh[OM + jl] != _ZERO and (not causal or j <= i + shift):
                        p = math.exp(min(s[r * RK + c] * scale - L, _ZERO))
                        g = dp[r * RK + c]
                        if DROP:
                            if _keep(seed, ((b * NH + h) * Tq + i) * Tk + j, p_drop):
                                g = g * inv_keep
                            else:
                                g = _ZERO
                        ds = p * (g - Di) * scale
                    sh[OS + row * BKP + jl] = ds
            cuda.syncthreads()
            # dQ += dS K
            for jl in range(nk):
                uj = np.uint32(jl)
                for a in range(RI):
                    sa[a] = sh[us + uj + np.uint32(a * TI * BKP)]
                for e in range(RD):
                    kb[e] = _ZERO
                    if td + e * TD < HS:
                        kb[e] = sh[ukd + uj * np.uint32(HSP) + np.uint32(e * TD)]
                for a in range(RI):
                    for e in range(RD):
                        acc[a * RD + e] += sa[a] * kb[e]
            # the next tile's syncthreads_or ends these reads before sK / sS are overwritten

        for a in range(RI):
            row = ti + a * TI
            if row < nq:
                for e in range(RD):
                    col = td + e * TD
                    if col < HS:
                        dq_buf[b, i0 + row, qc + col] = acc[a * RD + e]

    return attention_bwd_dq


# ---------------------------------------------------------------- dkdv pass
def _build_dkdv(BQ, BK, NT, HS, DROP, *, TY, TX, RQ, RK, TJ, TDK, RJ, RDK, HSP, BKP, **_):
    TD, RD = TDK, RDK
    NS = RQ * RK
    NA = RJ * RD
    OK = 0
    OV = OK + BK * HSP
    OQ = OV + BK * HSP
    OG = OQ + BQ * HSP
    OP = OG + BQ * HSP
    OS = OP + BQ * BKP
    OL = OS + BQ * BKP
    OD = OL + BQ
    OM = OD + BQ

    @kernel(cache=True)  # closure: plain ints and bools only
    def attention_bwd_dkdv(dkv_buf, delta, dout, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                           NH, causal, scale, p_drop, seed, group):
        sh = cuda.shared.array(0, float32)
        s = cuda.local.array(NS, float32)
        dp = cuda.local.array(NS, float32)
        qa = cuda.local.array(RQ, float32)
        ga = cuda.local.array(RQ, float32)
        ka = cuda.local.array(RK, float32)
        va = cuda.local.array(RK, float32)
        dk = cuda.local.array(NA, float32)   # dK dk[a*RD + e]: key tj + a*TJ, column td + e*TD
        dv = cuda.local.array(NA, float32)
        qb = cuda.local.array(RD, float32)
        gb = cuda.local.array(RD, float32)

        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        tj = tid // TD
        td = tid - tj * TD
        NKV = NH // group  # one block per (batch, kv head, key tile): the group's query heads in order
        bh = cuda.blockIdx.x
        b = bh // NKV
        hk = bh - b * NKV
        Tq = q_buf.shape[1]
        Tk = kv_buf.shape[1]
        shift = Tk - Tq
        k0 = cuda.blockIdx.y * BK  # first key tiles first (most causal work)
        nk = min(BK, Tk - k0)
        kc = k_off + hk * HS
        vc = v_off + hk * HS
        inv_keep = _ONE
        if DROP:
            inv_keep = float32(1.0 / (1.0 - p_drop))
        for x in range(NA):
            dk[x] = _ZERO
            dv[x] = _ZERO

        flag = 0
        for jl in range(tid, BK, NT):
            f = 0
            if jl < nk:
                if key_mask[b, k0 + jl] != 0:
                    f = 1
            sh[OM + jl] = float32(f)
            flag |= f
        if cuda.syncthreads_or(flag) != 0:  # else every key is padding: dK = dV = 0
            for e in range(tid, BK * HS, NT):
                r = e // HS
                c = e - r * HS
                xk = _ZERO
                xv = _ZERO
                if r < nk:
                    xk = kv_buf[b, k0 + r, kc + c]
                    xv = kv_buf[b, k0 + r, vc + c]
                sh[OK + r * HSP + c] = xk
                sh[OV + r * HSP + c] = xv
            i_first = 0
            if causal:
                i_first = max(0, k0 - shift)  # earlier queries see none of these keys
            uq = np.uint32(OQ + ty * HSP)
            ug = np.uint32(OG + ty * HSP)
            uk = np.uint32(OK + tx * HSP)
            uv = np.uint32(OV + tx * HSP)
            up = np.uint32(OP + tj)
            uss = np.uint32(OS + tj)
            uqd = np.uint32(OQ + td)
            ugd = np.uint32(OG + td)
            for h in range(hk * group, (hk + 1) * group):  # the group's query heads, in order
                qc = q_off + h * HS
                oc = h * HS
                for i0 in range((i_first // BQ) * BQ, Tq, BQ):
                    nq = min(BQ, Tq - i0)
                    # Q, dO tiles, lse and D of the rows (zeros past nq); the first barrier after
                    # staging K, V; at the end of the loop body the last one ends the reads
                    for e in range(tid, BQ * HS, NT):
                        r = e // HS
                        c = e - r * HS
                        xq = _ZERO
                        xg = _ZERO
                        if r < nq:
                            xq = q_buf[b, i0 + r, qc + c]
                            xg = dout[b, i0 + r, oc + c]
                        sh[OQ + r * HSP + c] = xq
                        sh[OG + r * HSP + c] = xg
                    for r in range(tid, BQ, NT):
                        L = _NEG_INF
                        Di = _ZERO
                        if r < nq:
                            L = lse[b, h, i0 + r]
                            Di = delta[b, h, i0 + r]
                        sh[OL + r] = L
                        sh[OD + r] = Di
                    cuda.syncthreads()
                    for x in range(NS):
                        s[x] = _ZERO
                        dp[x] = _ZERO
                    for d in range(HS):
                        ud = np.uint32(d)
                        for r in range(RQ):
                            qa[r] = sh[uq + ud + np.uint32(r * TY * HSP)]
                            ga[r] = sh[ug + ud + np.uint32(r * TY * HSP)]
                        for c in range(RK):
                            ka[c] = sh[uk + ud + np.uint32(c * TX * HSP)]
                            va[c] = sh[uv + ud + np.uint32(c * TX * HSP)]
                        for r in range(RQ):
                            for c in range(RK):
                                s[r * RK + c] += qa[r] * ka[c]
                                dp[r * RK + c] += ga[r] * va[c]
                    # P (dropped and rescaled for dV) and dS, the CPU's formulas
                    for r in range(RQ):
                        row = ty + r * TY
                        i = i0 + row
                        L = sh[OL + row]
                        Di = sh[OD + row]
                        for c in range(RK):
                            jl = tx + c * TX
                            j = k0 + jl
                            pd = _ZERO
                            ds = _ZERO
                            if row < nq and L != _NEG_INF and sh[OM + jl] != _ZERO and (not causal or j <= i + shift):
                                p = math.exp(min(s[r * RK + c] * scale - L, _ZERO))
                                if DROP:
                                    if _keep(seed, ((b * NH + h) * Tq + i) * Tk + j, p_drop):
                                        ds = p * (dp[r * RK + c] * inv_keep - Di) * scale
                                        pd = p * inv_keep
                                    else:
                                        ds = -p * Di * scale
                                else:
                                    ds = p * (dp[r * RK + c] - Di) * scale
                                    pd = p
                            sh[OP + row * BKP + jl] = pd
                            sh[OS + row * BKP + jl] = ds
                    cuda.syncthreads()
                    # dV += P^T dO, dK += dS^T Q, query rows in order
                    for ii in range(nq):
                        ui = np.uint32(ii)
                        for e in range(RD):
                            qb[e] = _ZERO
                            gb[e] = _ZERO
                            if td + e * TD < HS:
                                qb[e] = sh[uqd + ui * np.uint32(HSP) + np.uint32(e * TD)]
                                gb[e] = sh[ugd + ui * np.uint32(HSP) + np.uint32(e * TD)]
                        for a in range(RJ):
                            pj = sh[up + ui * np.uint32(BKP) + np.uint32(a * TJ)]
                            sj = sh[uss + ui * np.uint32(BKP) + np.uint32(a * TJ)]
                            for e in range(RD):
                                dv[a * RD + e] += pj * gb[e]
                                dk[a * RD + e] += sj * qb[e]
                    cuda.syncthreads()  # before the next query tile overwrites sQ, sG, sP, sS

        for a in range(RJ):
            key = tj + a * TJ
            if key < nk:
                for e in range(RD):
                    col = td + e * TD
                    if col < HS:
                        dkv_buf[b, k0 + key, kc + col] = dk[a * RD + e]
                        dkv_buf[b, k0 + key, vc + col] = dv[a * RD + e]

    return attention_bwd_dkdv


# ---------------------------------------------------------------- launcher
def _device_array(name, a, dtype, ndim):
    """a as a C-contiguous numba device array of dtype/ndim; GraphError naming it otherwise.
    Objects exposing __cuda_array_interface__ (e.g. torch CUDA tensors) are wrapped, no copy."""
    op = "attention_backward on cuda"
    if isinstance(a, np.ndarray):
        raise GraphError(f"{op}: {name} must be a CUDA device array (numba.cuda.to_device / "
                         f"device_array), got a host numpy array")
    if (not hasattr(a, "copy_to_host") and hasattr(a, "__cuda_array_interface__")
            and hasattr(cuda, "as_cuda_array")):
        a = cuda.as_cuda_array(a)
    if not all(hasattr(a, x) for x in ("shape", "dtype", "is_c_contiguous", "copy_to_host")):
        raise GraphError(f"{op}: {name} must be a CUDA device array, got {type(a).__name__}")
    if a.dtype != dtype or len(a.shape) != ndim:
        raise GraphError(f"{op}: {name} must be a {ndim}-d {np.dtype(dtype)} device array, got "
                         f"{a.dtype} of {len(a.shape)} dims")
    if not a.is_c_contiguous():
        raise GraphError(f"{op}: {name} must be C-contiguous")
    return a


def _span(a):
    """(first byte, end byte) of a device array's memory, or None when it cannot be told."""
    try:
        if SIMULATOR and isinstance(getattr(a, "_ary", None), np.ndarray):  # the simulator's host copy
            ptr = int(a._ary.__array_interface__["data"][0])
        else:
            ptr = int(a.__cuda_array_interface__["data"][0])
    except Exception:  # noqa: BLE001 (no interface: identity is the only overlap check)
        return None
    n = int(np.prod(tuple(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return ptr, ptr + n


def _overlap(a, b):
    if a is b:
        return True
    sa, sb = _span(a), _span(b)
    return (sa is not None and sb is not None and sa[1] > sa[0] and sb[1] > sb[0]
            and sa[0] < sb[1] and sb[0] < sa[1])


def attention_backward_flops(B, NH, Tq, Tk, HS, causal):
    """FLOPs by the usual convention for the backward (5 matmuls: S, dP, dV, dK, dQ):
    10*B*NH*Tq*Tk*HS, half of that if causal (this kernel recomputes S and dP in both passes)."""
    f = 10 * B * NH * Tq * Tk * HS
    return f // 2 if causal else f


def attention_backward(dq_buf, dkv_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off,
                       key_mask, n_heads, head_size, causal, scale, dropout_p=0.0, seed=0, block_q=None,
                       block_k=None, threads=None, n_kv_heads=None):
    """Gradients of attention_forward on CUDA (the CPU kernel's contract, on device arrays).

    dq_buf (shape of q_buf): columns q_off + h*HS written with dQ; dkv_buf (shape of kv_buf):
    columns k_off/v_off + h*HS written with dK/dV (every element of those ranges is written, zeros
    included; other columns are left alone). For self-attention on a fused QKV buffer pass the same
    array as dq_buf and dkv_buf: the three column ranges are disjoint. delta (B, NH, Tq) is scratch,
    written with rowsum(dO * O). dout, out (B, Tq, NH*HS); lse (B, NH, Tq) from the forward (-inf
    for rows that saw no key); q_buf (B, Tq, Wq), kv_buf (B, Tk, Wkv), key_mask (B, Tk) uint8 and
    causal (bottom-right aligned), scale, dropout_p, seed as in attention_forward (dropout_p/seed
    must be those of the forward call). All arrays C-contiguous device arrays (numba, or anything
    with __cuda_array_interface__); the gradient buffers must not overlap the inputs.
    block_q/block_k/threads override TUNABLES (None: default_tiles). n_kv_heads: grouped-query
    attention as in attention_forward (NKV kv heads dividing NH, widths NKV*HS); dK/dV of a kv head
    are the sums over its NH // NKV query heads, in increasing head order inside one block (no
    atomics: deterministic). Two launches on numba's default stream (dq pass, which also writes
    delta, then dK/dV), asynchronous.
    """
    op = "attention_backward on cuda"
    for name, v in (("n_heads", n_heads), ("head_size", head_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise GraphError(f"{op}: {name} must be an int >= 1, got {v!r}")
    NH, HS = int(n_heads), int(head_size)
    C = NH * HS
    if n_kv_heads is not None and (isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, (int, np.integer))):
        raise GraphError(f"{op}: n_kv_heads must be an int or None, got {n_kv_heads!r}")
    NKV = NH if n_kv_heads is None else int(n_kv_heads)
    if NKV < 1 or NH % NKV:
        raise GraphError(f"{op}: n_kv_heads = {NKV} must be >= 1 and divide n_heads = {NH}")
    CKV = NKV * HS
    if block_q is None and block_k is None and threads is None:
        bq, bk, nt = default_tiles(HS)
    else:
        bq = TUNABLES["block_q"] if block_q is None else block_q
        bk = TUNABLES["block_k"] if block_k is None else block_k
        nt = TUNABLES["threads"] if threads is None else threads
    q_buf = _device_array("q_buf", q_buf, np.float32, 3)
    kv_buf = _device_array("kv_buf", kv_buf, np.float32, 3)
    B, Tq, Wq = (int(x) for x in q_buf.shape)
    Bk, Tk, Wkv = (int(x) for x in kv_buf.shape)
    if Bk != B:
        raise GraphError(f"{op}: kv_buf batch {Bk} != q_buf batch {B}")
    arrays = {}
    for name, a, shape in (("dq_buf", dq_buf, (B, Tq, Wq)), ("dkv_buf", dkv_buf, (B, Tk, Wkv)),
                           ("delta", delta, (B, NH, Tq)), ("dout", dout, (B, Tq, C)),
                           ("out", out, (B, Tq, C)), ("lse", lse, (B, NH, Tq))):
        a = _device_array(name, a, np.float32, len(shape))
        if tuple(int(x) for x in a.shape) != shape:
            raise GraphError(f"{op}: {name} must have shape {shape}, got {tuple(a.shape)}")
        arrays[name] = a
    key_mask = _device_array("key_mask", key_mask, np.uint8, 2)
    if tuple(key_mask.shape) != (B, Tk):
        raise GraphError(f"{op}: key_mask must be uint8 {(B, Tk)}, got {tuple(key_mask.shape)}")
    for name, v in (("q_off", q_off), ("k_off", k_off), ("v_off", v_off)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GraphError(f"{op}: {name} must be an int, got {v!r}")
    q_off, k_off, v_off = int(q_off), int(k_off), int(v_off)
    if q_off < 0 or q_off + C > Wq:
        raise GraphError(f"{op}: q_buf width {Wq} cannot hold {NH} heads x {HS} at offset q_off={q_off}")
    for name, off in (("k_off", k_off), ("v_off", v_off)):
        if off < 0 or off + CKV > Wkv:
            raise GraphError(f"{op}: kv_buf width {Wkv} cannot hold {NKV} heads x {HS} at offset "
                             f"{name}={off}")
    if abs(k_off - v_off) < CKV:
        raise GraphError(f"{op}: k_off={k_off} and v_off={v_off} overlap ({NKV} heads x {HS}): dK and dV "
                         f"would be written over each other")
    dq_buf, dkv_buf = arrays["dq_buf"], arrays["dkv_buf"]
    if _overlap(dq_buf, dkv_buf):
        if not (dq_buf is dkv_buf or _span(dq_buf) == _span(dkv_buf)) or (B, Tq, Wq) != (B, Tk, Wkv):
            raise GraphError(f"{op}: dq_buf and dkv_buf overlap but are not the same array")
        if any(q_off < off + CKV and off < q_off + C for off in (k_off, v_off)):
            raise GraphError(f"{op}: dq_buf is dkv_buf, but q_off={q_off} overlaps k_off={k_off} or "
                             f"v_off={v_off} ({NH} heads x {HS}): the gradients would overwrite each other")
    for gname, g in (("dq_buf", dq_buf), ("dkv_buf", dkv_buf), ("delta", arrays["delta"])):
        for iname, x in (("q_buf", q_buf), ("kv_buf", kv_buf), ("dout", arrays["dout"]),
                         ("out", arrays["out"]), ("lse", arrays["lse"])):
            if _overlap(g, x):
                raise GraphError(f"{op}: {gname} overlaps {iname}: the gradients must go to separate memory")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise GraphError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    kq, kkv, g = get_variants(bq, bk, nt, HS, p > 0.0)
    nqt, nkt = -(-Tq // bq), -(-Tk // bk)
    if max(nqt, nkt) > _GRID_Y_MAX:
        raise GraphError(f"{op}: {Tq} query / {Tk} key rows need {max(nqt, nkt)} tiles of block_q={bq} / "
                         f"block_k={bk}, more than {_GRID_Y_MAX}")
    if B == 0 or Tq == 0:
        return
    sc = np.float32(scale)
    sd = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    nt, causal = int(nt), bool(causal)
    # dq pass first: it writes delta, which the dK/dV pass reads (same stream: ordered)
    kq[(B * NH, nqt), nt, 0, g["smem_dq"]](dq_buf, arrays["delta"], arrays["dout"], arrays["out"],
                                           arrays["lse"], q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                                           NH, causal, sc, p, sd, NH // NKV)
    if Tk == 0:
        return
    kkv[(B * NKV, nkt), nt, 0, g["smem_dkdv"]](dkv_buf, arrays["delta"], arrays["dout"], arrays["lse"],
                                              q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, causal,
                                              sc, p, sd, NH // NKV)
