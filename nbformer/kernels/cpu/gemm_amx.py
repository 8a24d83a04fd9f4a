"""fp32 matrix products on Intel AMX: operands split into three bfloat16 parts (amx_tiles.py says
why that is fp32-accurate), packed into 32-row / 32-column panels, multiplied in 32 x 32 blocks.

    gemm(out, a, b, a_trans=False)   out (R, C) = A @ B,  A = a (R, K) or a.T (a: (K, R)),  B = b (K, C)

and linear.py runs the same blocks: its forward with B = w.T (w (C, K), nn.Linear's weight, packed
by _pack_weight) and its epilogue (bias, activation, residual); its backward dX = G @ W and
dW = G.T @ X (a_trans). Operands that arrive transposed (w for B, G for A) are packed through
16 x 16 register transposes (transpose16.py), at about the cost of the plain packs.

When: `available()`, a host with AMX-TILE and AMX-BF16 whose kernel grants this process the
tile data state (Linux arch_prctl ARCH_REQ_XCOMP_PERM), and NBFORMER_AMX is not 0; and
`worth(R, C, K)`, a product big enough that padding to 32 and packing pay. Elsewhere the BLAS
path (gemm.py) runs, as it does on every other host.

Bits: every 32 x 32 block of out is computed by one thread, K in order (partial sums pass through
memory as fp32, exactly), so the result depends neither on the thread count nor on K_BLOCK; it
differs from sgemm's in the last bits (another summation order), as two sgemm libraries do. Its
error against a float64 product stays within twice sgemm's (tests/test_gemm_amx.py). Two edge
cases differ from IEEE fp32: an inf operand gives NaN where it meets a zero split part (its rows
or columns are non-finite either way), and magnitudes below 2^-100 lose their low parts (AMX
reads bfloat16 subnormals as zero).

Memory: packed operands take 1.5x their fp32 size. Each calling thread keeps one scratch buffer
grown to its largest product (`panels`); read-only weights keep their packed panels
(`packed_weight`, up to NBFORMER_AMX_CACHE_MB, 2048 by default), so an inference model's linear
weights cost 2.5x their fp32 size once they have all run.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

import numpy as np
from numba import get_num_threads, njit, prange, types

from .amx_tiles import (CHUNK, aligned, amx_block32, amx_config, amx_release, bits_f32, config_bytes, f32_bits,
                        store_fence, stream_block32)
from .bf16_split import split16, split_pairs16
from .precompile import BOOL, F2, I64, R2, array, kernel
from .transpose16 import transpose16

PANEL = 32  # rows of an A panel, columns of a B panel (two tiles of 16)
GROUP_BYTES = 1 << 20  # packed A panels a thread keeps in its L2 (2 MB) while B panels pass by
K_BLOCK = 16  # 32-wide K chunks per pass over the blocks (512 of K: a B panel's step is 96 KB)
MIN_ROWS = 64  # fewer rows (decoding, small batches): BLAS / the skinny kernel; padding to 32 wastes AMX
MIN_FLOPS = 1 << 21  # 2 R C K below this: the packing and three parallel regions cost more than they save

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 0x1023, 18
_state = {}


def _host_has_amx():
    from llvmlite import binding as llvm

    llvm.initialize_native_target()
    try:
        f = llvm.get_host_cpu_features()
        return bool(f.get("amx-tile")) and bool(f.get("amx-bf16"))
    except Exception:  # features unknown: the BLAS path
        return False


HOST_HAS_AMX = _host_has_amx()  # decides which kernels exist (and precompile) on this host


def _request_tile_data():
    """Ask Linux for the AMX tile data state (once per process; every thread then has it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0  # 158: SYS_arch_prctl (x86-64)
    except (OSError, AttributeError):
        return False


def available():
    """True where the AMX path runs: host ISA, the kernel's permission, NBFORMER_AMX != '0'."""
    ok = _state.get("ok")
    if ok is None:
        from numba.core import config as numba_config

        ok = (HOST_HAS_AMX and os.environ.get("NBFORMER_AMX", "1") != "0" and not numba_config.DISABLE_JIT
              and _request_tile_data())
        _state["ok"] = ok
    return ok


def _require():
    # a tile instruction without the kernel's permission is SIGILL: never run one without it
    if not available():
        raise RuntimeError("the AMX GEMM was called on a host or process without AMX tile data "
                           "(gemm_amx.available() is False)")


def worth(R, C, K):
    """Whether an (R x K) @ (K x C) product takes the AMX path (on a host where it is available)."""
    return R >= MIN_ROWS and C >= PANEL and K >= PANEL and 2 * R * C * K >= MIN_FLOPS


# ---------------------------------------------------------------- packing (fp32 -> three bf16 parts)

_SIGN_OFF, _INF, _QUIET, _HIGH = np.uint32(0x7FFFFFFF), np.uint32(0x7F800000), np.uint32(0x00400000), np.uint32(0xFFFF0000)
_HALF, _ONE, _EXP16 = np.uint32(0x7FFF), np.uint32(1), np.uint32(0x7F80)


@njit(inline="always")
def _bf16(x):
    # (bits of the nearest bfloat16 to x, ties to even, as a uint32 in its low 16 bits; its value)
    u = f32_bits(x)
    if (u & _SIGN_OFF) > _INF:  # NaN stays NaN (quiet), not rounded into inf
        r = (u | _QUIET) & _HIGH
    else:
        r = (u + _HALF + ((u >> np.uint32(16)) & _ONE)) & _HIGH
    return r >> np.uint32(16), bits_f32(r)


@njit(inline="always")
def _split3(x):
    # x = h + m + l, three bfloat16s (uint16 bits); inf / NaN: h alone (m = l = 0)
    hb, hv = _bf16(x)
    r = np.float32(x - hv) if (hb & _EXP16) != _EXP16 else np.float32(0.0)
    mb, mv = _bf16(r)
    lb, _ = _bf16(np.float32(r - mv))
    return np.uint16(hb), np.uint16(mb), np.uint16(lb)


@njit(inline="always")
def _put(dst, off, x):
    h, m, l = _split3(x)
    dst[off] = h
    dst[1024 + off] = m
    dst[2048 + off] = l


# The packers are ordinary (not IR-inlined) functions: Numba types and lowers each once per kernel
# instead of copying it into every parallel loop that packs (the GEMM packs A in two places, in two
# layouts): gemm_amx._gemm compiled in 6.8 CPU s instead of 8.9; LLVM still sees their bodies.
@njit
def _pack_a_rows(dst, base, a, p, K, R, kc0, kc1):
    # chunks kc0 <= kc < kc1 of panel p of A = a (R, K), chunk kc at dst[base + (kc - kc0) CHUNK:]
    # (dst flat uint16): tile row rr of a chunk holds A[32p + rr, 32kc : 32kc + 32]
    for kc in range(kc0, kc1):
        o = base + (kc - kc0) * CHUNK
        for rr in range(32):
            r = p * 32 + rr
            off = o + (rr // 16) * 512 + (rr % 16) * 32
            for half in range(2):
                k = kc * 32 + half * 16
                if r < R and k + 16 <= K:
                    split16(a, r * K + k, dst, off + half * 16)
                else:
                    for j in range(16):
                        _put(dst, off + half * 16 + j, a[r, k + j] if r < R and k + j < K else np.float32(0.0))


@njit
def _pack_b_rows(dst, base, b, p, K, C, kc0, kc1):
    # chunks kc0 <= kc < kc1 of panel p of B = b (K, C), chunk kc at dst[base + (kc - kc0) CHUNK:]
    # (dst flat uint16), VNNI: tile row kp of a chunk holds the pairs b[32kc + 2kp + e, 32p + c]
    for kc in range(kc0, kc1):
        o = base + (kc - kc0) * CHUNK
        for kp in range(16):
            k = kc * 32 + 2 * kp
            for half in range(2):
                c0 = p * 32 + half * 16
                off = o + half * 512 + kp * 32
                if k + 1 < K and c0 + 16 <= C:
                    split_pairs16(b, k * C + c0, (k + 1) * C + c0, dst, off)
                else:
                    for j in range(32):
                        kk, c = k + (j % 2), c0 + j // 2
                        _put(dst, off + j, b[kk, c] if kk < K and c < C else np.float32(0.0))


@njit
def _pack_at_rows(dst, base, a, p, K, R, kc0, kc1):
    # chunks kc0 <= kc < kc1 of panel p of A = a.T (a (K, R): training's dY, rows = tokens), placed
    # and laid out as _pack_a_rows': tile row rr of chunk kc holds a[32kc : 32kc + 32, 32p + rr];
    # whole 16 x 32 blocks through two register transposes into t (tile row i = t[32i : 32i + 32]),
    # ragged edges element by element
    t = np.empty(512, np.float32)
    for kc in range(kc0, kc1):
        k0 = kc * 32
        for half in range(2):
            r0 = p * 32 + half * 16
            o = base + (kc - kc0) * CHUNK + half * 512
            if r0 + 16 <= R and k0 + 32 <= K:
                transpose16(a, k0 * R + r0, R, t, 0, 32)
                transpose16(a, (k0 + 16) * R + r0, R, t, 16, 32)
                for i in range(16):
                    split16(t, 32 * i, dst, o + 32 * i)
                    split16(t, 32 * i + 16, dst, o + 32 * i + 16)
            else:
                for i in range(16):
                    r = r0 + i
                    for j in range(32):
                        k = k0 + j
                        _put(dst, o + 32 * i + j, a[k, r] if r < R and k < K else np.float32(0.0))


@njit
def _pack_bt_rows(dst, base, w, p, K, C, kc0, kc1):
    # chunks kc0 <= kc < kc1 of panel p of B = w.T (w (C, K), nn.Linear's weight), placed and laid
    # out as _pack_b_rows': tile row kp of chunk kc holds the pairs w[32p + c, 32kc + 2kp + e];
    # whole 32 x 16 blocks through two register transposes into t (t[16k + c] = w[c0 + c, k0 + k]),
    # ragged edges element by element
    t = np.empty(512, np.float32)
    for kc in range(kc0, kc1):
        k0 = kc * 32
        for half in range(2):
            c0 = p * 32 + half * 16
            o = base + (kc - kc0) * CHUNK + half * 512
            if c0 + 16 <= C and k0 + 32 <= K:
                transpose16(w, c0 * K + k0, K, t, 0, 16)
                transpose16(w, c0 * K + k0 + 16, K, t, 256, 16)
                for kp in range(16):
                    split_pairs16(t, 32 * kp, 32 * kp + 16, dst, o + 32 * kp)
            else:
                for kp in range(16):
                    for j in range(32):
                        k, c = k0 + 2 * kp + (j % 2), c0 + j // 2
                        _put(dst, o + 32 * kp + j, w[c, k] if c < C and k < K else np.float32(0.0))


B_PACKED, B_FROM_WT, B_FROM_ROWS = 0, 1, 2  # B's panels: packed already; from w.T (w (C, K)); from b (K, C)


@njit
def pack_b(dst, base, b, p, b_mode, kc0, kc1):
    """Chunks kc0 <= kc < kc1 of B panel p, B = b.T (b (C, K), B_FROM_WT) or b (K, C) (B_FROM_ROWS),
    chunk kc at dst[base + (kc - kc0) CHUNK:] (dst flat uint16)."""
    if b_mode == B_FROM_WT:
        _pack_bt_rows(dst, base, b, p, b.shape[1], b.shape[0], kc0, kc1)
    else:
        _pack_b_rows(dst, base, b, p, b.shape[0], b.shape[1], kc0, kc1)


@njit
def pack_a(dst, base, a, p, a_trans, kc0, kc1):
    """Chunks kc0 <= kc < kc1 of A panel p, A = a (R, K), or a.T (a (K, R)) where a_trans, chunk kc
    at dst[base + (kc - kc0) CHUNK:] (dst flat uint16)."""
    if a_trans:
        _pack_at_rows(dst, base, a, p, a.shape[0], a.shape[1], kc0, kc1)
    else:
        _pack_a_rows(dst, base, a, p, a.shape[1], a.shape[0], kc0, kc1)


@njit(inline="always")
def thread_panels(t, T, npa, npb, by_rows):
    """(a0, a1, b0, b1): the A and B panels whose blocks thread t of T computes: a share of the A
    panels and every B panel (by_rows), or every A panel and a share of the B panels."""
    if by_rows:
        return (t * npa) // T, ((t + 1) * npa) // T, 0, npb
    return 0, npa, (t * npb) // T, ((t + 1) * npb) // T


@njit(inline="always")
def product_blocks(dst, a, pa, b, pb, a_trans, b_mode, kb, T, cfg, stream):
    """dst (32 npa, 32 npb) = A @ B in 32 x 32 blocks over T threads, A = a (R, K) or a.T (a (K, R))
    where a_trans, B = b.T or b (b_mode, pack_b; B_PACKED: pb holds B's panels already); pa, pb
    room for the panels (npa, nk, CHUNK), (npb, nk, CHUNK); K in steps of kb chunks: every block of
    a step accumulates onto dst's partial sums (exact, so the bits do not depend on kb or T).

    With at least as many A panels as B panels the A panels are split between the threads (the rows:
    the packed rows never cross to another core's cache; splitting the B panels instead, each thread
    read A panels another core had just written, 5-13 % slower at MiniLM's 1344 x 1536 x 384 and
    1344 x 384 x 1536); each thread packs its own, one group's step of K at a time into a buffer of
    its own just before their products, so the packed chunks never leave L2 (packing a thread's
    whole share first sent an LM head's backward, 24 MB of panels a thread, through memory and
    back); B's panels are packed first, by all threads, into pb. With fewer (few rows, a wide weight:
    an LM head) the B panels are split: A's are packed first into pa, and each thread packs its B
    panels' steps into its own buffer just before their products (again per group of A panels).

    stream (streams(dst)): the blocks' last K step goes through an L1 block of the thread's to dst
    with non-temporal stores (an output far bigger than the caches, which a plain store first reads
    from memory: an LM head's 32 MB of logits took 3.6 ms more written than kept in cache)."""
    npa, nk, npb = pa.shape[0], pa.shape[1], pb.shape[0]
    ld = dst.shape[1]
    by_rows = npa >= npb
    if by_rows and b_mode != B_PACKED:
        for p in prange(npb):
            pack_b(pb.reshape(-1), p * nk * CHUNK, b, p, b_mode, 0, nk)
    if not by_rows:
        for p in prange(npa):
            pack_a(pa.reshape(-1), p * nk * CHUNK, a, p, a_trans, 0, nk)
    own_b = not by_rows and b_mode != B_PACKED
    step = min(nk, kb)
    group = max(1, GROUP_BYTES // (step * CHUNK * 2))
    for t in prange(T):
        a0, a1, b0, b1 = thread_panels(t, T, npa, npb, by_rows)
        # the thread's buffer: group A panels x one step of K chunks, panel-major (by rows), or one
        # B panel's step (own_b)
        own = aligned(group * step * CHUNK if by_rows else (step * CHUNK if own_b else 1), np.uint16)
        asrc = own if by_rows else pa.reshape(-1)
        bsrc = own if own_b else pb.reshape(-1)
        cblk = aligned(1024 if stream else 1, np.float32)
        amx_config(cfg)
        for k0 in range(0, nk, kb):
            kn = min(kb, nk - k0)
            for g0 in range(a0, a1, group):
                g1 = min(a1, g0 + group)
                if by_rows:
                    for p in range(g0, g1):
                        pack_a(own, (p - g0) * kn * CHUNK, a, p, a_trans, k0, k0 + kn)
                for ib in range(b0, b1):
                    if own_b:
                        pack_b(own, 0, b, ib, b_mode, k0, k0 + kn)
                    bo = 0 if own_b else (ib * nk + k0) * CHUNK
                    for ia in range(g0, g1):
                        o = ia * 32 * ld + ib * 32
                        ao = (ia - g0) * kn * CHUNK if by_rows else (ia * nk + k0) * CHUNK
                        if stream and k0 + kn >= nk:
                            amx_block32(cblk, 0, 32, dst, o, ld, asrc, ao, bsrc, bo, kn, k0 > 0)
                            stream_block32(dst, o, ld, cblk, 0)
                        else:
                            amx_block32(dst, o, ld, dst, o, ld, asrc, ao, bsrc, bo, kn, k0 > 0)
        if stream:
            store_fence()
        amx_release()


STREAM_BYTES = 8 << 20  # outputs from this size on are written with non-temporal stores (2x the cores' L2)


def streams(dst):
    """Whether product_blocks writes dst (its whole blocks) with non-temporal stores: big enough,
    and every row 64-byte aligned (the stores require it)."""
    return (dst.nbytes >= STREAM_BYTES and dst.ctypes.data % 64 == 0 and dst.strides[0] % 64 == 0
            and dst.shape[0] % 32 == 0 and dst.shape[1] % 32 == 0)


def _gemm(out, a, b, pa, pb, tc, kb, T, cfg, a_trans, stream):
    # out (R, C) = a (R, K) @ b (K, C), or a.T @ b (a (K, R)) where a_trans, both packed here;
    # through tc when out is not whole blocks; stream: streams(out)
    R, C = out.shape
    direct = R % 32 == 0 and C % 32 == 0
    dst = out if direct else tc
    product_blocks(dst, a, pa, b, pb, a_trans, B_FROM_ROWS, kb, T, cfg, stream and direct)
    if not direct:
        for r in prange(R):
            out[r, :] = tc[r, :C]


if HOST_HAS_AMX:  # (tile instructions do not compile for other hosts)
    _U16_3, _U8_1 = array(types.uint16, 3), array(types.uint8, 1)
    _gemm = kernel((F2, R2, R2, _U16_3, _U16_3, F2, I64, I64, _U8_1, BOOL, BOOL), cost=3.0)(
        njit(parallel=True, cache=True, nogil=True)(_gemm))
else:
    _gemm = None


# ---------------------------------------------------------------- scratch and launch

_local = threading.local()
_CFG = config_bytes()


def config():
    return _CFG


def panels(R, C, K, padded_out=False):
    """Scratch for an (R x K) @ (K x C) product: the packed panels pa, pb ((panels, chunks, CHUNK)
    uint16, on 64-byte boundaries) and float32 room for the product padded to whole blocks
    (32 npa, 32 npb) where padded_out (else 1 x 1). Reused by the calling Python thread (so never
    by two products at once), grown when a product needs more."""
    nk = (K + 31) // 32
    npa, npb = (R + 31) // 32, (C + 31) // 32
    na, nb = npa * nk * CHUNK, npb * nk * CHUNK
    tshape = (32 * npa, 32 * npb) if padded_out else (1, 1)
    n = na + nb + 2 * tshape[0] * tshape[1] + 32
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        raw = np.empty(n * 2 + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
        buf = raw[off:off + n * 2].view(np.uint16)
        _local.buf = buf
    pa = buf[:na].reshape(npa, nk, CHUNK)
    pb = buf[na:na + nb].reshape(npb, nk, CHUNK)
    t0 = na + nb + (-(na + nb)) % 32  # float32 room on a 64-byte boundary
    tc = buf[t0:t0 + 2 * tshape[0] * tshape[1]].view(np.float32).reshape(tshape)
    return pa, pb, tc


def gemm(out, a, b, a_trans=False):
    """out (R, C) = a (R, K) @ b (K, C), or a.T @ b (a (K, R)) where a_trans: float32, C-contiguous,
    shapes checked by the caller. The plain product on AMX (the linear forward runs linear.py's
    kernel, with its epilogue; its backward runs this)."""
    _require()
    R, C = out.shape
    K = b.shape[0]
    pa, pb, tc = panels(R, C, K, R % 32 != 0 or C % 32 != 0)
    _gemm(out, a, b, pa, pb, tc, K_BLOCK, get_num_threads(), _CFG, bool(a_trans), streams(out))


# ---------------------------------------------------------------- packed weights of inference

CACHE_MB = int(os.environ.get("NBFORMER_AMX_CACHE_MB", "2048"))  # packed weights kept (1.5x their fp32 size)
_packed: "dict" = {}  # (address, shape, strides) -> (w, pb); insertion order = least recently used first
_packed_bytes = [0]
_packed_lock = threading.Lock()


def _pack_weight(pb, w):
    # pb: panels of B = w.T, w (C, K) in nn.Linear layout
    for p in prange(pb.shape[0]):
        pack_b(pb.reshape(-1), p * pb.shape[1] * CHUNK, w, p, B_FROM_WT, 0, pb.shape[1])


_pack_weight = (kernel((_U16_3, R2), cost=1.5)(njit(parallel=True, nogil=True, cache=True)(_pack_weight))
                if HOST_HAS_AMX else None)


def packed_weight(w):
    """The packed panels of B = w.T for a read-only weight w (C, K), made once and kept (up to
    CACHE_MB, least recently used out first); None for a writable w (training updates weights in
    place: those are packed at every call). The entry holds w itself, so its memory cannot be
    freed and reused under the same address while the panels are kept. Whoever writes the memory
    under a read-only view (the trainer, through its writable parameters) calls forget."""
    if w.flags.writeable:
        return None
    key = (w.ctypes.data, w.shape, w.strides)
    with _packed_lock:
        hit = _packed.pop(key, None)
        if hit is not None:
            _packed[key] = hit
            return hit[1]
    C, K = w.shape
    nk, npb = (K + 31) // 32, (C + 31) // 32
    if npb * nk * CHUNK * 2 > CACHE_MB << 20:
        return None
    raw = np.empty(npb * nk * CHUNK * 2 + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    pb = raw[off:off + npb * nk * CHUNK * 2].view(np.uint16).reshape(npb, nk, CHUNK)
    _require()
    _pack_weight(pb, w)
    with _packed_lock:
        _packed[key] = (w, pb)
        _packed_bytes[0] += pb.nbytes
        while _packed_bytes[0] > CACHE_MB << 20 and len(_packed) > 1:
            _, (_, old) = next(iter(_packed.items()))
            del _packed[next(iter(_packed))]
            _packed_bytes[0] -= old.nbytes
    return pb


def forget(buf):
    """Drop the kept packs of weights that lie in buf's memory: for an array updated in place (a
    trainer's flat parameters) whose read-only views were packed (its evaluation model's), so that
    their next products pack the new values."""
    lo = buf.ctypes.data
    hi = lo + buf.nbytes
    with _packed_lock:
        for key in [k for k in _packed if lo <= k[0] < hi]:
            _, pb = _packed.pop(key)
            _packed_bytes[0] -= pb.nbytes


def clear_packed():
    """Drop every kept weight pack (their memory, and the references to the weights)."""
    with _packed_lock:
        _packed.clear()
        _packed_bytes[0] = 0
