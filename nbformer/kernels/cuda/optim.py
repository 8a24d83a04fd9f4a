"""Fused Adam / AdamW over flat float32 device buffers, the global gradient norm for clipping, and
in-place scaling (CUDA twin of kernels/cpu/optim.py: same launchers, same arguments).

adam_step is the CPU kernel operation by operation (torch.optim.Adam's single-tensor path): bias
corrections in float64 on the host, every elementwise step in float32, torch's fused multiply-adds
in lerp_/addcmul_ reproduced as a float64 add of an exact float32 product with one rounding, a
correctly rounded float32 sqrt and division (no fastmath; the sm_90 PTX has sqrt.rn.f32 and
div.rn.f32 and no float32 fma, its float64 fmas multiply exact float32 products). The update is
therefore bit-identical to the CPU's: checked under the simulator; on a GPU the tests ask for 1e-6.

global_grad_norm is deterministic: the flat buffers are cut into fixed chunks of `chunk` elements;
a block sums the squares of one chunk in float64 (strided over its threads, then a fixed-order
shared-memory tree) into a partials buffer; one block then sums the partials in a fixed order and
the host takes the square root of that one float64 copied back. The bits depend on chunk and
threads (the TUNABLES), never on the grid or the run; they agree with the CPU's to rounding only.

The LR schedules are host functions: the CPU ones, re-exported.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ..cpu.optim import cosine_lr, noam_lr  # noqa: F401  (host schedules, re-exported)
from ._jit import SIMULATOR, cuda, kernel
from .elementwise import block_sum_f64, check_device_array, grid_blocks, launch_threads

# threads per block and grid caps of the grid-stride kernels; for the norm also the chunk of the
# float64 partial sums (a bit-changing tunable) and the threads of both of its stages (power of two)
if SIMULATOR:
    TUNABLES = {
        "adam_step": {"threads": 64, "max_blocks": 64},
        "global_grad_norm": {"threads": 32, "chunk": 1024, "max_blocks": 64},
        "scale_": {"threads": 64, "max_blocks": 64},
        "mean_loss_": {"threads": 32},
    }
else:
    TUNABLES = {
        "adam_step": {"threads": 256, "max_blocks": 8192},
        "global_grad_norm": {"threads": 256, "chunk": 16384, "max_blocks": 8192},
        "scale_": {"threads": 256, "max_blocks": 8192},
        "mean_loss_": {"threads": 256},
    }


@kernel(cache=True)
def _adam_kernel(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, wd, decay,
                 l2, use_decay):
    # all (n,) float32; every scalar is float32 so the arithmetic stays float32 (the CPU kernel's lines)
    n = p.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        pi = p[i]
        gi = g[i]
        if l2:
            gi = float32(float64(wd) * float64(pi) + float64(gi))  # grad.add(param, alpha=wd): fma
        if use_decay:
            pi = pi * decay  # param.mul_(1 - lr * wd)
        mi = m[i]
        # exp_avg.lerp_(grad, 1 - beta1) = fma(w, g - m, m): the float32 product is exact in float64
        mi = float32(float64(one_minus_beta1) * float64(gi - mi) + float64(mi))
        # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2) = fma((1 - beta2) * g, g, v * beta2)
        vi = float32(float64(one_minus_beta2 * gi) * float64(gi) + float64(v[i] * beta2))
        denom = float32(math.sqrt(vi)) / bc2_sqrt + eps
        p[i] = pi + neg_step_size * mi / denom  # param.addcdiv_(exp_avg, denom, value=-step_size)
        m[i] = mi
        v[i] = vi


@kernel(cache=True)
def _sumsq_chunks_kernel(part, x, base, chunk):
    # part[base + k] = sum of x[k*chunk : (k+1)*chunk]**2 in float64; block b takes chunks b, b + grid, ...
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = x.shape[0]
    nchunk = (n + chunk - 1) // chunk
    for k in range(cuda.blockIdx.x, nchunk, cuda.gridDim.x):
        lo = k * chunk
        hi = min(n, lo + chunk)
        s = float64(0.0)
        for i in range(lo + tid, hi, nt):
            xi = float64(x[i])
            s += xi * xi
        s = block_sum_f64(sh, s, tid, nt)
        if tid == 0:
            part[base + k] = s


@kernel(cache=True)
def _sum_partials_kernel(part, n):
    # one block: part[n] = sum of part[0:n], each thread's strided run in order, then the tree
    sh = cuda.shared.array(0, float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    s = float64(0.0)
    for k in range(tid, n, nt):
        s += part[k]
    s = block_sum_f64(sh, s, tid, nt)
    if tid == 0:
        part[n] = s


@kernel(cache=True)
def _scale_kernel(x, factor):
    n = x.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        x[i] = x[i] * factor


@kernel(cache=True)
def _norm_into_kernel(stats, slot, part, n):
    # one thread: stats[slot, 1] = sqrt(sum of squares) (float64, correctly rounded like math.sqrt)
    if cuda.grid(1) == 0:
        stats[slot, 1] = math.sqrt(part[n])


@kernel(cache=True)
def _clip_scale_kernel(x, stats, slot, max_norm):
    # x *= float32(max_norm / (norm + 1e-6)) when norm > max_norm: the host's decision, made here so the
    # norm never crosses to the host; every thread reads the same float64 norm and computes the same factor
    norm = stats[slot, 1]
    if not (norm > max_norm):
        return
    f = float32(max_norm / (norm + 1e-6))
    n = x.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        x[i] = x[i] * f


@kernel(cache=True)
def _mean_loss_kernel(stats, slot, losses, count):
    # one block: stats[slot, 0] = sum(losses) / count in float64, each thread's strided run in order,
    # then the fixed shared-memory tree
    sh = cuda.shared.array(0, float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    s = float64(0.0)
    for i in range(tid, losses.shape[0], nt):
        s += float64(losses[i])
    s = block_sum_f64(sh, s, tid, nt)
    if tid == 0:
        stats[slot, 0] = s / count


_PARTIALS = {}  # (device id, elements) -> float64 scratch of the norm, reused by every step


def _partials(total):
    key = (getattr(cuda.get_current_device(), "id", 0), total)
    buf = _PARTIALS.get(key)
    if buf is None:
        buf = _PARTIALS[key] = cuda.device_array(total, np.float64)
    return buf


def _check_stats(op, stats, slot):
    check_device_array(op, "stats", stats, dtype=np.float64, ndim=2)
    if stats.shape[1] != 2 or not 0 <= int(slot) < stats.shape[0]:
        raise GraphError(f"{op}: 'stats' is {tuple(stats.shape)} and slot {slot}; expected (K, 2) with "
                         f"0 <= slot < K")


def clip_by_global_norm_(grads, max_norm, stats, slot):
    """The gradient norm into stats[slot, 1] and, when max_norm > 0 and the norm exceeds it,
    grads *= max_norm / (norm + 1e-6), decided on the device: nothing is copied to the host.

    stats: float64 (K, 2) device array (the trainer's per-step loss / norm slots). Same reduction
    (chunks, threads) as global_grad_norm, so the norm has the same bits."""
    op, tun = "clip_by_global_norm_", TUNABLES["global_grad_norm"]
    _check_stats(op, stats, slot)
    flats = [_flat(op, f"grads[{i}]", a) for i, a in enumerate(_as_list(grads))]
    t = launch_threads(op, tun, None, pow2=True)
    ch = int(tun["chunk"])
    counts = [-(-int(a.size) // ch) for a in flats]
    total = sum(counts)
    slot = int(slot)
    if total == 0:
        _norm_into_kernel[1, 1](stats, slot, cuda.to_device(np.zeros(1)), 0)
        return
    part = _partials(total + 1)
    base = 0
    for a, c in zip(flats, counts):
        if c:
            _sumsq_chunks_kernel[min(c, int(tun["max_blocks"])), t, 0, 8 * t](part, a, base, ch)
        base += c
    _sum_partials_kernel[1, t, 0, 8 * t](part, total)
    _norm_into_kernel[1, 1](stats, slot, part, total)
    max_norm = float(max_norm)
    if max_norm > 0:
        st = TUNABLES["scale_"]
        ts = launch_threads("scale_", st, None)
        for a in flats:
            if a.size:
                _clip_scale_kernel[grid_blocks("scale_", st, int(a.size), ts, None), ts](a, stats, slot, max_norm)


def mean_loss_(stats, slot, losses, count):
    """stats[slot, 0] = sum(losses) / max(count, 1) in float64 on the device (a fixed-order sum:
    the same bits every run; equal to the CPU's float64 sum to rounding)."""
    op = "mean_loss_"
    _check_stats(op, stats, slot)
    flat = _flat(op, "losses", losses)
    t = launch_threads(op, TUNABLES[op], None, pow2=True)
    _mean_loss_kernel[1, t, 0, 8 * t](stats, int(slot), flat, float(max(int(count), 1)))


def _flat(op, name, a, size=None):
    check_device_array(op, name, a)
    if size is not None and a.size != size:
        raise GraphError(f"{op}: '{name}' has {a.size} elements, expected {size}")
    return a.reshape(int(a.size))


def _as_list(grads):
    return list(grads) if isinstance(grads, (list, tuple)) else [grads]


def adam_step(params, grads, m, v, lr, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.0, step=1,
              decoupled=False, *, threads=None, max_blocks=None):
    """One in-place Adam (decoupled=False) or AdamW (decoupled=True) update of params, m, v.

    Float32 C-contiguous device arrays of one size (any shapes). step is 1-based (the count after
    this update, like torch's state['step']). grads is read only."""
    op, tun = "adam_step", TUNABLES["adam_step"]
    p = _flat(op, "params", params)
    g = _flat(op, "grads", grads, p.size)
    mm = _flat(op, "m", m, p.size)
    vv = _flat(op, "v", v, p.size)
    step = int(step)
    if step < 1:
        raise GraphError(f"{op}: 'step' is {step}, expected >= 1 (1-based)")
    t = launch_threads(op, tun, threads)
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bc2_sqrt = bias_correction2 ** 0.5
    n = int(p.size)
    if n == 0:
        return
    f32 = np.float32
    _adam_kernel[grid_blocks(op, tun, n, t, max_blocks), t](
        p, g, mm, vv, f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(bc2_sqrt), f32(eps), f32(-step_size), f32(wd),
        f32(1 - lr * wd), wd != 0.0 and not decoupled, wd != 0.0 and decoupled)


def global_grad_norm(grads, *, threads=None, chunk=None, max_blocks=None, partials=None):
    """sqrt(sum of squares) over one device array or a list of them, as a Python float (one float64
    copied back). Deterministic (fixed chunks, fixed-order float64 sums): the same bits every run.

    partials: optional float64 device scratch of at least (total chunks + 1) elements; allocated
    per call when None."""
    op, tun = "global_grad_norm", TUNABLES["global_grad_norm"]
    flats = [_flat(op, f"grads[{i}]", a) for i, a in enumerate(_as_list(grads))]
    t = launch_threads(op, tun, threads, pow2=True)
    ch = int(tun["chunk"] if chunk is None else chunk)
    if ch < 1:
        raise GraphError(f"{op}: chunk must be >= 1, got {ch}")
    counts = [-(-int(a.size) // ch) for a in flats]
    total = sum(counts)
    if total == 0:
        return 0.0
    if partials is None:
        partials = cuda.device_array(total + 1, np.float64)
    else:
        check_device_array(op, "partials", partials, dtype=np.float64, ndim=1)
        if partials.shape[0] < total + 1:
            raise GraphError(f"{op}: 'partials' has {partials.shape[0]} elements, expected >= {total + 1}")
    mb = int(tun["max_blocks"] if max_blocks is None else max_blocks)
    if mb < 1:
        raise GraphError(f"{op}: max_blocks must be >= 1, got {mb}")
    base = 0
    for a, c in zip(flats, counts):
        if c:
            _sumsq_chunks_kernel[min(c, mb), t, 0, 8 * t](partials, a, base, ch)
        base += c
    _sum_partials_kernel[1, t, 0, 8 * t](partials, total)
    return math.sqrt(float(partials[total:total + 1].copy_to_host()[0]))


def scale_(grads, factor, *, threads=None, max_blocks=None):
    """grads *= float32(factor) in place (one device array or a list of them)."""
    op, tun = "scale_", TUNABLES["scale_"]
    f = np.float32(factor)
    flats = [_flat(op, f"grads[{i}]", a) for i, a in enumerate(_as_list(grads))]
    t = launch_threads(op, tun, threads)
    for a in flats:
        if a.size:
            _scale_kernel[grid_blocks(op, tun, int(a.size), t, max_blocks), t](a, f)


def clip_grad_norm_(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1; returns the norm."""
    norm = global_grad_norm(grads)
    coef = float(max_norm) / (norm + 1e-6)
    if coef < 1.0:
        scale_(grads, coef)
    return norm
