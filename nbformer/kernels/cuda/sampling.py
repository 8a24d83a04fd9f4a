"""Next-token choice on the GPU for N rows of logits at once: greedy, temperature, top-k and top-p
(CUDA twin of kernels/cpu/sampling.py).

Each row gives exactly the token that the CPU's `_sample` gives for the same logits row and
uniform u: the same float64 scaled logits, the same order (descending value, ties and NaNs as
numpy's stable argsort of -scaled: lower id first, NaN last), and the cumulative part (total,
top-p prefix, mass, the draw target = u * mass) summed by one thread in the CPU's sequential order.

One block per row:
- temperature <= 0: greedy, a shared-memory tree argmax (ties: the lowest id; NaN never wins,
  but a NaN logit 0 gives token 0, as the CPU's `logits[j] > logits[best]` loop does);
- otherwise a block bitonic sort of (value, id) pairs in a padded power-of-two scratch in global
  memory, (N, 2, P) float64 (values, ids), then exp(value - max) by all threads in parallel (each
  element's value does not depend on who computes it), then the sequential sums by thread 0 from
  chunks that all threads stage in shared memory.

On a real GPU `math.exp` is libdevice's (within 1 ulp) rather than the host's libm, so a token may
differ from the CPU only when u lands within ~1e-16 (relative) of a cumulative boundary; under the
simulator both use the same libm and the tokens are identical.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64, int64

from ...errors import GraphError
from ._jit import cuda, device_function, kernel
from .elementwise import check_device_array, is_device_array, launch_threads

# threads per block (a power of two; one block per row) and stage: float64 elements staged in
# (dynamic) shared memory per chunk of the sequential walk (2048: 16 KiB; at most MAX_STAGE)
TUNABLES = {"sample_tokens": {"threads": 512, "stage": 2048}}
MAX_STAGE = 6000  # 48 KiB of dynamic shared memory per block without an opt-in


def scratch_shape(N: int, V: int) -> tuple:
    """Shape of the sort scratch for N rows of V logits: (N, 2, P) float64, P = next power of two >= V."""
    P = 1
    while P < V:
        P *= 2
    return (int(N), 2, P)


def sampling_scratch(N: int, V: int):
    """A device scratch for sample_tokens (allocate once per decoding session and pass it in)."""
    return cuda.device_array(scratch_shape(N, V), dtype=np.float64)


# ---------------------------------------------------------------- greedy
@kernel(cache=True)
def _greedy_kernel(out_ids, logits):
    # out_ids (N,) int64; logits (N, V) float32; block `row` takes the argmax of its row.
    # dynamic shared memory, 2 * threads float64: values (float32, exact in float64), then ids
    sh = cuda.shared.array(0, float64)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    shv = sh[:nt]
    shi = sh[nt:]
    V = logits.shape[1]
    bv = float64(0.0)
    bi = int64(-1)  # -1: this thread saw no non-NaN logit
    for j in range(tid, V, nt):
        v = float64(logits[row, j])
        if v == v and (bi < 0 or v > bv):  # strict: the first (lowest) id of a tie stays
            bv = v
            bi = j
    shv[tid] = bv
    shi[tid] = bi
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            oi = shi[tid + s]
            if oi >= 0:
                mi = shi[tid]
                ov = shv[tid + s]
                mv = shv[tid]
                if mi < 0 or ov > mv or (ov == mv and oi < mi):
                    shv[tid] = ov
                    shi[tid] = oi
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        first = logits[row, 0]
        best = int64(shi[0])
        if first != first or best < 0:  # the CPU's loop never leaves a NaN logits[0]
            best = 0
        out_ids[row] = best


# ---------------------------------------------------------------- temperature / top-k / top-p
@device_function
def _before(a, ia, b, ib):
    """(a, ia) sorts before (b, ib): descending value, NaN last, ties by ascending id."""
    if a != a:
        return b != b and ia < ib
    if b != b:
        return True
    if a > b:
        return True
    if a < b:
        return False
    return ia < ib


@kernel(cache=True)
def _sample_kernel(out_ids, logits, temperature, top_k, top_p, u, scratch, nstage):
    # out_ids (N,) int64; logits (N, V) float32; u (N,) float64; scratch (N, 2, P) float64:
    # [row, 0] values (then probabilities), [row, 1] ids. Dynamic shared memory, nstage + 2 float64:
    # the staged chunk, then ctl = (stop flag, keep)
    sh = cuda.shared.array(0, float64)
    stage = sh[:nstage]
    ctl = sh[nstage:]
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    V = logits.shape[1]
    P = scratch.shape[2]
    for j in range(tid, P, nt):
        if j < V:
            scratch[row, 0, j] = float64(logits[row, j]) / temperature
        else:
            scratch[row, 0, j] = math.nan  # padding: NaN with an id >= V sorts after everything
        scratch[row, 1, j] = j
    cuda.syncthreads()

    # bitonic sort into _before order; every stage ends with a barrier
    half = P // 2
    k = 2
    while k <= P:
        j = k // 2
        while j > 0:
            for t in range(tid, half, nt):
                lo = (t // j) * 2 * j + (t - (t // j) * j)
                hi = lo + j
                a = scratch[row, 0, lo]
                ia = scratch[row, 1, lo]
                b = scratch[row, 0, hi]
                ib = scratch[row, 1, hi]
                if (lo & k) == 0:
                    swap = _before(b, ib, a, ia)
                else:
                    swap = _before(a, ia, b, ib)
                if swap:
                    scratch[row, 0, lo] = b
                    scratch[row, 1, lo] = ib
                    scratch[row, 0, hi] = a
                    scratch[row, 1, hi] = ia
            cuda.syncthreads()
            j //= 2
        k *= 2

    kk = V if (top_k <= 0 or top_k > V) else top_k
    m = scratch[row, 0, 0]
    cuda.syncthreads()  # everyone has read the max before it is overwritten
    for r in range(tid, kk, nt):
        scratch[row, 0, r] = math.exp(scratch[row, 0, r] - m)
    cuda.syncthreads()

    # the CPU's sequential sums, by thread 0, over chunks that all threads stage in shared memory:
    # phase 0: total over kk; phase 1 (top_p < 1): cumulative prefix -> keep and its mass;
    # phase 2: the draw. ctl[0] (stop) and ctl[1] (keep) are shared so every thread loops alike.
    if tid == 0:
        ctl[1] = kk
    total = float64(0.0)
    cum = float64(0.0)
    run = float64(0.0)
    acc = float64(0.0)
    target = float64(0.0)
    choice = int64(0)
    for phase in range(3):
        if phase == 1 and not top_p < 1.0:
            continue
        cuda.syncthreads()  # every thread has read the last phase's stop flag
        if tid == 0:
            ctl[0] = 0
            if phase == 2:
                keep = int64(ctl[1])
                mass = run if top_p < 1.0 else total  # = the sum of probs[0:keep] in order, as the CPU's
                target = u[row] * mass
                choice = int64(scratch[row, 1, keep - 1])
        cuda.syncthreads()
        n = kk if phase < 2 else int64(ctl[1])
        base = 0
        while base < n:
            for r in range(tid, nstage, nt):
                if base + r < n:
                    stage[r] = scratch[row, 0, base + r]
            cuda.syncthreads()
            if tid == 0:
                end = min(nstage, n - base)
                for r in range(end):
                    p = stage[r]
                    if phase == 0:
                        total += p
                    elif phase == 1:
                        cum += p / total
                        run += p
                        if cum >= top_p:  # the smallest prefix whose mass reaches top_p
                            ctl[1] = base + r + 1
                            ctl[0] = 1
                            break
                    else:
                        acc += p
                        if target < acc:
                            choice = int64(scratch[row, 1, base + r])
                            ctl[0] = 1
                            break
            cuda.syncthreads()
            if ctl[0] != 0:
                break
            base += nstage
    if tid == 0:
        out_ids[row] = choice


# ---------------------------------------------------------------- launchers
def sample_tokens(out_ids, logits, temperature, top_k, top_p, u, scratch=None, *, threads=None, stage=None):
    """out_ids (N,) int64 <- one token per row of logits (N, V) float32, with uniforms u (N,)
    float64 in [0, 1): all device arrays, C-contiguous. temperature <= 0 is greedy (u unused);
    top_k None/0 and top_p None mean off. scratch: an optional (N, 2, P) float64 device array
    (see scratch_shape / sampling_scratch), allocated per call when None."""
    op = "sample_tokens"
    check_device_array(op, "logits", logits, ndim=2)
    N, V = logits.shape
    if V < 1:
        raise GraphError(f"{op}: 'logits' has shape {tuple(logits.shape)}, expected (N, V) with V >= 1")
    check_device_array(op, "out_ids", out_ids, (N,), np.int64)
    check_device_array(op, "u", u, (N,), np.float64)
    temperature = float(temperature)
    top_k = int(top_k or 0)
    top_p = float(1.0 if top_p is None else top_p)
    if math.isnan(temperature) or math.isnan(top_p):
        raise GraphError(f"{op}: temperature and top_p must be numbers, got {temperature} and {top_p}")
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    stage = int(TUNABLES[op]["stage"] if stage is None else stage)
    if not 1 <= stage <= MAX_STAGE:
        raise GraphError(f"{op}: stage must be in [1, {MAX_STAGE}], got {stage}")
    if N == 0:
        return
    if temperature <= 0.0:
        _greedy_kernel[N, t, 0, 16 * t](out_ids, logits)
        return
    if scratch is None:
        scratch = sampling_scratch(N, V)
    else:
        check_device_array(op, "scratch", scratch, scratch_shape(N, V), np.float64)
    _sample_kernel[N, t, 0, 8 * (stage + 2)](out_ids, logits, temperature, np.int64(top_k), top_p, u, scratch,
                                             np.int64(stage))


def sample_tokens_host(logits_dev, temperature, top_k, top_p, u_host, scratch=None, *, threads=None,
                       stage=None) -> np.ndarray:
    """logits (N, V) on the device, u (N,) host uniforms -> (N,) int64 host ids: uploads u, runs
    sample_tokens and copies back only the N ids."""
    op = "sample_tokens"
    check_device_array(op, "logits", logits_dev, ndim=2)
    N = logits_dev.shape[0]
    if is_device_array(u_host):
        raise GraphError(f"{op}: 'u_host' must be a host array (use sample_tokens for device uniforms)")
    u = np.ascontiguousarray(u_host, dtype=np.float64)
    if u.shape != (N,):
        raise GraphError(f"{op}: 'u_host' has shape {u.shape}, expected ({N},)")
    out = cuda.device_array(N, dtype=np.int64)
    sample_tokens(out, logits_dev, temperature, top_k, top_p, cuda.to_device(u), scratch, threads=threads, stage=stage)
    return out.copy_to_host()


sample_rows = sample_tokens_host  # the name the op adapters look up ("sample_rows")
