"""Float64 NumPy oracle for the backward kernels, loss, dropout and optimizer.

Textbook formulas, no fusion; the forwards come from forward.py. numerical_grad checks these
references themselves against central differences of the float64 forward.
"""
import math

import numpy as np

from .forward import ACTIVATIONS, f64, layernorm, linear  # noqa: F401  (re-exported for tests)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------- finite differences
def numerical_grad(f, x, h=1e-6):
    """Central differences of the scalar f at float64 array x (x is perturbed in place and restored)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


# ---------------------------------------------------------------- layernorm
def layernorm_backward(dout, x, w, eps):
    """dx (..., C), dw (C,), db (C,) of out = layernorm(x, w, b, eps) for upstream dout."""
    x, dout, w = f64(x), f64(dout), f64(w)
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True))
    C = x.shape[-1]
    dw = (dout * norm).reshape(-1, C).sum(0)
    db = dout.reshape(-1, C).sum(0)
    return dx, dw, db


# ---------------------------------------------------------------- activations / linear
def activation_grad(pre, act):
    """d act(pre) / d pre, elementwise, float64."""
    v = f64(pre)
    if act == "none":
        return np.ones_like(v)
    if act == "relu":
        return (v > 0).astype(np.float64)
    if act == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * (1.0 + erf(v / math.sqrt(2.0))) + v * np.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
    if act == "gelu_tanh":
        t = np.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v ** 3))
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * v * v)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-v))
        return s * (1.0 + v * (1.0 - s))
    raise ValueError(act)


def linear_pre(x, w, b=None):
    """pre (..., M) = x @ w.T + b."""
    y = f64(x) @ f64(w).T
    return y if b is None else y + f64(b)


def linear_backward(dout, x, w, b=None, act="none"):
    """dx (..., K), dw (M, K), db (M,) of out = act(x @ w.T + b) for upstream dout (..., M)."""
    x, w, dout = f64(x), f64(w), f64(dout)
    g = dout * activation_grad(linear_pre(x, w, b), act)
    K, M = x.shape[-1], w.shape[0]
    g2, x2 = g.reshape(-1, M), x.reshape(-1, K)
    return (g @ w), g2.T @ x2, g2.sum(0)


# ---------------------------------------------------------------- embedding
def embedding_backward(dout, ids, V, pos_ids=None, P=None, type_ids=None, TT=None, scale=1.0):
    """(dwte (V, C), dwpe (P, C) or None, dwtt (TT, C) or None): scatter-adds of dout rows."""
    dout = f64(dout)
    C = dout.shape[-1]
    d2 = dout.reshape(-1, C)

    def scatter(idx, n, s):
        out = np.zeros((n, C))
        np.add.at(out, np.asarray(idx).reshape(-1), d2 * s)
        return out

    return (scatter(ids, V, scale),
            scatter(pos_ids, P, 1.0) if P is not None else None,
            scatter(type_ids, TT, 1.0) if TT is not None else None)


# ---------------------------------------------------------------- cross-entropy
def cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100):
    """Per-row losses (N,) (0 where ignored) and lse (N,), torch semantics (reduction='none')."""
    x = f64(logits)
    t = np.asarray(targets)
    V = x.shape[-1]
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    nll = -np.take_along_axis(logp, tt[..., None], -1)[..., 0]
    smooth = -logp.sum(-1) / V
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth
    return np.where(valid, loss, 0.0), lse


def cross_entropy_mean(logits, targets, label_smoothing=0.0, ignore_index=-100):
    losses, _ = cross_entropy(logits, targets, label_smoothing, ignore_index)
    n = int((np.asarray(targets) != ignore_index).sum())
    return (losses.sum() / n if n else 0.0), n


def cross_entropy_backward(logits, targets, label_smoothing=0.0, ignore_index=-100, dloss=1.0):
    """dlogits (N, V) for upstream dloss (scalar or (N,)) on the per-row losses."""
    x = f64(logits)
    t = np.asarray(targets)
    V = x.shape[-1]
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    valid = t != ignore_index
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.where(valid, t, 0)[..., None], 1.0, -1)
    d = p - (1 - label_smoothing) * onehot - label_smoothing / V
    scale = np.broadcast_to(f64(dloss), t.shape)
    return np.where(valid[..., None], d * scale[..., None], 0.0)


# ---------------------------------------------------------------- dropout
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def uniform(seed, counters):
    """rng.uniform(seed, counter) for an array of counters: SplitMix64 finaliser, 24 bits -> [0, 1)."""
    u = np.uint64
    with np.errstate(over="ignore"):
        z = u(seed) + (np.asarray(counters, dtype=np.uint64) + u(1)) * u(_GOLDEN)
        z = (z ^ (z >> u(30))) * u(_M1)
        z = (z ^ (z >> u(27))) * u(_M2)
        z = z ^ (z >> u(31))
    return (z >> u(40)).astype(np.float64) / 16777216.0


def dropout(x, p, seed, offset=0):
    """x * keep / (1 - p) over the flattened array, keep = uniform(seed, offset + i) >= p."""
    x = f64(x)
    if p == 0:
        return x.copy()
    keep = uniform(seed, offset + np.arange(x.size, dtype=np.uint64)) >= np.float32(p)
    return np.where(keep.reshape(x.shape), x / (1 - p), 0.0)


# ---------------------------------------------------------------- optimizer and schedules
def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam / AdamW step in float64, returns new (p, m, v)."""
    p, g, m, v = f64(p).copy(), f64(g).copy(), f64(m).copy(), f64(v).copy()
    if weight_decay:
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1 ** step)
    vhat = v / (1 - beta2 ** step)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


def global_grad_norm(grads):
    if not isinstance(grads, (list, tuple)):
        grads = [grads]
    return math.sqrt(sum(float((f64(a) ** 2).sum()) for a in grads))


def noam_lr(step, d_model, warmup, factor=1.0):
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def cosine_lr(step, base_lr, warmup, total, min_lr=0.0):
    if step < warmup:
        return base_lr * step / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------- Llama family (issue 12)
def rmsnorm_backward(dout, x, w, eps):
    """dx (..., C), dw (C,) of out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps)."""
    x, dout, w = f64(x), f64(dout), f64(w)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    norm = x * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - norm * (dnorm * norm).mean(-1, keepdims=True))
    C = x.shape[-1]
    return dx, (dout * norm).reshape(-1, C).sum(0)


def rope_backward(dout, pos_ids, inv_freq, NH, NKV, HS):
    """Adjoint of reference.rope_qkv on a qkv gradient (B, T, W): the transposed rotation of each
    (i, i + HS/2) pair of the Q and K heads, the V columns passed through."""
    d = f64(dout).copy()
    B, T, _ = d.shape
    half = HS // 2
    ang = np.asarray(pos_ids, np.float64)[..., None] * f64(inv_freq)
    c, s = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    n = (NH + NKV) * HS
    h = d[..., :n].reshape(B, T, NH + NKV, HS)
    d1, d2 = h[..., :half].copy(), h[..., half:].copy()
    h[..., :half] = d1 * c + d2 * s  # R^T: x1' = x1 c - x2 s, x2' = x2 c + x1 s
    h[..., half:] = d2 * c - d1 * s
    d[..., :n] = h.reshape(B, T, n)
    return d


def glu_backward(dout, pre, act="silu"):
    """dpre (..., 2F) of out = act(gate) * up, pre = gate | up: [dout * up * act'(gate) | dout * act(gate)]."""
    pre, dout = f64(pre), f64(dout)
    F = pre.shape[-1] // 2
    g, u = pre[..., :F], pre[..., F:]
    return np.concatenate([dout * u * activation_grad(g, act), dout * ACTIVATIONS[act](g)], axis=-1)


def attention_gqa_backward(q, k, v, dout, key_mask, causal, scale):
    """float64 grouped-query attention backward: q (B, NH, Tq, HS), k/v (B, NKV, Tk, HS) ->
    (dq, dk, dv); dk/dv of a kv head sum its NH / NKV query heads."""
    q, k, v, dout = (f64(a) for a in (q, k, v, dout))
    B, NH, Tq, HS = q.shape
    NKV, Tk = k.shape[1], k.shape[2]
    G = NH // NKV
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kr) * scale
    allowed = np.ones((B, 1, Tq, Tk), bool) & np.asarray(key_mask, bool)[:, None, None, :]
    if causal:
        allowed &= (np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq))[None, None]
    allowed = np.broadcast_to(allowed, s.shape)
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    has = np.isfinite(m)
    e = np.where(allowed, np.exp(s - np.where(has, m, 0)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.where(has, e / np.where(den > 0, den, 1), 0.0)
    dv = np.einsum("bhqk,bhqd->bhkd", p, dout)
    dp = np.einsum("bhqd,bhkd->bhqk", dout, vr)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bhkd->bhqd", ds, kr) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    return dq, dk.reshape(B, NKV, G, Tk, HS).sum(2), dv.reshape(B, NKV, G, Tk, HS).sum(2)
