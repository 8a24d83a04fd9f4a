"""Fused Adam / AdamW over flat float32 buffers, global gradient norm for clipping, LR schedules.

adam_step follows torch.optim.Adam's single-tensor path (the CPU default) operation by operation:
bias corrections in float64 on the host, every elementwise step in float32, with torch's fused
multiply-adds in lerp_/addcmul_ reproduced (single rounding). torch's CPU sqrt is not correctly
rounded (1 ulp off on ~17% of inputs, MKL), ours is, so parameters agree with torch to a few ulps. decoupled=False is
Adam with L2 (g += wd * p), decoupled=True is AdamW (p *= 1 - lr * wd).
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError, InputError
from .precompile import BOOL, F1, F32, I64, R1, kernel

NORM_CHUNK = 1 << 16  # fixed chunk for the norm's float64 partial sums: never depends on thread count


@kernel((F1, R1, F1, F1) + (F32,) * 8 + (BOOL, BOOL), cost=1.3)
@njit(parallel=True, cache=True)
def _adam_step(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
               wd, decay, l2, use_decay):
    # all (n,) float32; every scalar is float32 so the arithmetic stays float32 like torch's
    for i in prange(p.shape[0]):
        pi = p[i]
        gi = g[i]
        if l2:
            gi = np.float32(np.float64(wd) * np.float64(pi) + np.float64(gi))  # grad.add(param, alpha=wd): fma
        if use_decay:
            pi = pi * decay  # param.mul_(1 - lr * wd)
        mi = m[i]
        # exp_avg.lerp_(grad, 1 - beta1): torch computes fma(w, g - m, m); the float32 product is
        # exact in float64, so one float64 add + one rounding gives the same single-rounding result
        mi = np.float32(np.float64(one_minus_beta1) * np.float64(gi - mi) + np.float64(mi))
        # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2): fma((1 - beta2) * g, g, v * beta2)
        vi = np.float32(np.float64(one_minus_beta2 * gi) * np.float64(gi) + np.float64(v[i] * beta2))
        denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi + neg_step_size * mi / denom  # param.addcdiv_(exp_avg, denom, value=-step_size)
        m[i] = mi
        v[i] = vi


@kernel((R1, I64), cost=1.35)
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _sumsq(x, chunk):
    n = x.shape[0]
    nchunk = (n + chunk - 1) // chunk
    part = np.zeros(nchunk)
    for k in prange(nchunk):
        # reassoc lets LLVM vectorise the chunk's float64 sum (several vector accumulators, added up
        # in the order the compiled loop fixes): 1.7 -> 1.2 ms for 5.3M gradients on 2 threads against
        # 8 scalar running sums. The order depends on the compiled code, never on the thread count.
        i0, end = np.int64(k) * chunk, min(n, (np.int64(k) + 1) * chunk)
        s = 0.0
        for i in range(i0, end):
            xi = np.float64(x[i])
            s += xi * xi
        part[k] = s
    total = 0.0
    for k in range(nchunk):  # fixed order: deterministic
        total += part[k]
    return total


@kernel((F1, F32), cost=0.8)
@njit(parallel=True, cache=True)
def _scale(x, factor):
    for i in prange(x.shape[0]):
        x[i] = x[i] * factor


def _flat(op, name, a, size=None):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise GraphError(f"{op}: '{name}' is {got}, expected a float32 array")
    if not a.flags.c_contiguous:
        raise GraphError(f"{op}: '{name}' must be C-contiguous")
    if size is not None and a.size != size:
        raise GraphError(f"{op}: '{name}' has {a.size} elements, expected {size}")
    return a.reshape(-1)


def adam_step(params, grads, m, v, lr, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.0, step=1,
              decoupled=False):
    """One in-place Adam (decoupled=False) or AdamW (decoupled=True) update of params, m, v.

    step is 1-based (the count after this update, like torch's state['step']). grads is read only.
    """
    op = "adam_step"
    p = _flat(op, "params", params)
    g = _flat(op, "grads", grads, p.size)
    mm = _flat(op, "m", m, p.size)
    vv = _flat(op, "v", v, p.size)
    step = int(step)
    if step < 1:
        raise GraphError(f"{op}: 'step' is {step}, expected >= 1 (1-based)")
    lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bc2_sqrt = bias_correction2 ** 0.5
    f32 = np.float32
    _adam_step(p, g, mm, vv, f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(bc2_sqrt), f32(eps),
               f32(-step_size), f32(wd), f32(1 - lr * wd), wd != 0.0 and not decoupled, wd != 0.0 and decoupled)


def _as_list(grads):
    return list(grads) if isinstance(grads, (list, tuple)) else [grads]


def global_grad_norm(grads):
    """sqrt(sum of squares) over one array or a list of arrays, as a Python float. Float64 partial sums
    over fixed 65536-element chunks reduced in a fixed order: bit-identical for any thread count."""
    total = 0.0
    for i, a in enumerate(_as_list(grads)):
        total += _sumsq(_flat("global_grad_norm", f"grads[{i}]", a), NORM_CHUNK)
    return math.sqrt(total)


def scale_(grads, factor):
    """grads *= factor in place (one array or a list of arrays)."""
    f = np.float32(factor)
    for i, a in enumerate(_as_list(grads)):
        _scale(_flat("scale_", f"grads[{i}]", a), f)


def clip_by_global_norm_(grads, max_norm, stats, slot):
    """The gradient norm into stats[slot, 1] (a float64 (K, 2) array of per-step loss / norm slots)
    and, when max_norm > 0 and the norm exceeds it, grads *= max_norm / (norm + 1e-6). The CUDA twin
    decides on the device, so a training step reads nothing back."""
    _check_stats("clip_by_global_norm_", stats, slot)
    norm = global_grad_norm(grads)
    stats[int(slot), 1] = norm
    if max_norm > 0 and norm > max_norm:
        scale_(grads, float(max_norm) / (norm + 1e-6))


def mean_loss_(stats, slot, losses, count):
    """stats[slot, 0] = sum(losses) / max(count, 1), summed in float64."""
    _check_stats("mean_loss_", stats, slot)
    stats[int(slot), 0] = float(np.sum(losses, dtype=np.float64) / max(int(count), 1))


def _check_stats(op, stats, slot):
    if (not isinstance(stats, np.ndarray) or stats.dtype != np.float64 or stats.ndim != 2 or stats.shape[1] != 2
            or not 0 <= int(slot) < stats.shape[0]):
        raise GraphError(f"{op}: 'stats' must be a float64 (K, 2) array and 0 <= slot < K; got "
                         f"{getattr(stats, 'shape', type(stats).__name__)} and slot {slot}")


def clip_grad_norm_(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1; returns the norm."""
    norm = global_grad_norm(grads)
    coef = float(max_norm) / (norm + 1e-6)
    if coef < 1.0:
        scale_(grads, coef)
    return norm


# ---------------------------------------------------------------- schedules (pure Python)
def noam_lr(step, d_model, warmup, factor=1.0):
    """factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5) ("Attention Is All You Need")."""
    if step < 1:
        raise InputError(f"noam_lr: 'step' is {step}, expected >= 1")
    if warmup < 1:
        raise InputError(f"noam_lr: 'warmup' is {warmup}, expected >= 1")
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def cosine_lr(step, base_lr, warmup, total, min_lr=0.0):
    """Linear warmup 0 -> base_lr over `warmup` steps, then cosine decay to min_lr at `total` (held after)."""
    if step < 0:
        raise InputError(f"cosine_lr: 'step' is {step}, expected >= 0")
    if warmup > 0 and step < warmup:
        return base_lr * step / warmup
    if total <= warmup:
        return min_lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
