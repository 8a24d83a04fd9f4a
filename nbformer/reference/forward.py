"""Float64 NumPy oracle for every kernel and for whole-model forwards.

Written for clarity, not speed: each function follows the textbook formula so that the
Numba kernels (float32, tiled, fused) can be checked against it. Shapes use B, T, C, NH, HS.
"""
import math

import numpy as np


def f64(a):
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- activations
def gelu_erf(x):
    x = f64(x)
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    x = f64(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
    return np.maximum(f64(x), 0.0)


def silu(x):
    x = f64(x)
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"none": lambda x: f64(x), "relu": relu, "gelu": gelu_erf, "gelu_tanh": gelu_tanh, "silu": silu}


# ---------------------------------------------------------------- basic kernels
def embedding(ids, wte, wpe=None, pos_ids=None, wtt=None, type_ids=None, scale=1.0):
    """ids (B, T) -> (B, T, C) = scale * wte[ids] + wpe[pos] + wtt[type]."""
    out = f64(wte)[ids] * scale
    if wpe is not None:
        out = out + f64(wpe)[pos_ids]
    if wtt is not None:
        out = out + f64(wtt)[type_ids]
    return out


def sinusoidal_table(n_pos, C):
    """The seeds' formula: PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(...)."""
    pe = np.zeros((n_pos, C))
    pos = np.arange(n_pos)[:, None]
    i2 = np.arange(0, C, 2)[None, :]
    angle = pos / np.power(10000.0, i2 / C)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : C // 2])
    return pe


def layernorm(x, w, b, eps):
    """x (..., C) -> (out, mean, rstd) with mean/rstd of shape x.shape[:-1]."""
    x = f64(x)
    mean = x.mean(-1)
    var = ((x - mean[..., None]) ** 2).mean(-1)
    rstd = 1.0 / np.sqrt(var + eps)
    out = (x - mean[..., None]) * rstd[..., None] * f64(w) + f64(b)
    return out, mean, rstd


def linear(x, w, b=None, act="none", residual=None):
    """x (..., K), w (N, K) in nn.Linear layout -> act(x @ w.T + b) [+ residual]."""
    y = f64(x) @ f64(w).T
    if b is not None:
        y = y + f64(b)
    y = ACTIVATIONS[act](y)
    if residual is not None:
        y = y + f64(residual)
    return y


def softmax(x, axis=-1):
    x = f64(x)
    m = x.max(axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = f64(x)
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def attention(q, k, v, key_mask=None, causal=False, scale=None):
    """Scaled dot-product attention, one (B, NH) slice set at a time.

    q (B, NH, Tq, HS), k/v (B, NH, Tk, HS), key_mask (B, Tk) with 1 = attend.
    Causal is bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq).
    Rows with no visible key give out = 0 and lse = -inf (FlashAttention convention).
    Returns out (B, NH, Tq, HS) and lse (B, NH, Tq) of the scaled scores.
    """
    q, k, v = f64(q), f64(k), f64(v)
    B, NH, Tq, HS = q.shape
    Tk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(HS)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    allowed = np.ones((B, 1, Tq, Tk), dtype=bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, dtype=bool)[:, None, None, :]
    if causal:
        qi = np.arange(Tq)[:, None] + (Tk - Tq)
        kj = np.arange(Tk)[None, :]
        allowed &= (kj <= qi)[None, None]
    allowed = np.broadcast_to(allowed, s.shape)
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    any_row = np.isfinite(m)
    m_safe = np.where(any_row, m, 0.0)
    e = np.where(allowed, np.exp(s - m_safe), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = np.where(any_row, e / np.where(denom > 0, denom, 1.0), 0.0)
    out = np.einsum("bhqk,bhkd->bhqd", p, v)
    lse = np.where(any_row[..., 0], m_safe[..., 0] + np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1.0)), -np.inf)
    return out, lse


def split_heads(x, NH):
    """(B, T, NH*HS) -> (B, NH, T, HS)."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, HS) -> (B, T, NH*HS)."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def pool(x, mask, mode="mean"):
    """sentence-transformers pooling of x (B, T, C) over tokens with mask (B, T) == 1."""
    x, m = f64(x), f64(mask)[..., None]
    if mode == "cls":
        return x[:, 0]
    if mode == "max":
        return np.where(m > 0, x, -np.inf).max(1)
    if mode == "lasttoken":
        last = np.asarray(mask).shape[1] - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)
        return x[np.arange(x.shape[0]), last]
    s = (x * m).sum(1)
    n = np.maximum(m.sum(1), 1e-9)
    return s / (np.sqrt(n) if mode == "mean_sqrt_len" else n)


# ---------------------------------------------------------------- whole models
def model_forward(cfg, params, ids, mask=None, type_ids=None, pos_ids=None):
    """Whole encoder-only / decoder-only forward over nbformer's canonical parameter names.

    Returns the last hidden state (B, T, C) for encoders, logits (B, T, V) for decoders.
    """
    p = {k: f64(v) for k, v in params.items()}
    ids = np.asarray(ids)
    B, T = ids.shape
    C, NH = cfg.d_model, cfg.n_heads
    mask = np.ones((B, T)) if mask is None else np.asarray(mask)
    if pos_ids is None:
        pos_ids = np.broadcast_to(np.arange(T), (B, T))
    wpe = None
    if cfg.positions == "learned":
        wpe = p["pos_emb"]
    elif cfg.positions == "sinusoidal":
        wpe = sinusoidal_table(cfg.max_positions, C)
    wtt = p.get("type_emb") if cfg.type_vocab_size else None
    if type_ids is None:
        type_ids = np.zeros((B, T), dtype=np.int64)
    x = embedding(ids, p["tok_emb"], wpe, pos_ids, wtt, type_ids, cfg.embedding_scale)
    eps = cfg.layer_norm_eps

    def ln(v, name):
        return layernorm(v, p[name + ".w"], p[name + ".b"], eps)[0]

    def attn(v, h):
        qkv = linear(v, p[h + "attn.qkv.w"], p.get(h + "attn.qkv.b"))
        q, k, vv = (split_heads(qkv[..., i * C:(i + 1) * C], NH) for i in range(3))
        o, _ = attention(q, k, vv, mask, causal=cfg.arch == "decoder")
        return linear(merge_heads(o), p[h + "attn.out.w"], p[h + "attn.out.b"])

    def ffn(v, h):
        u = linear(v, p[h + "ffn.up.w"], p[h + "ffn.up.b"], act=cfg.activation)
        return linear(u, p[h + "ffn.down.w"], p[h + "ffn.down.b"])

    if cfg.embedding_layernorm:
        x = ln(x, "emb_ln")
    for i in range(cfg.n_layers):
        h = f"h{i}."
        if cfg.norm == "pre":
            x = x + attn(ln(x, h + "ln1"), h)
            x = x + ffn(ln(x, h + "ln2"), h)
        else:
            x = ln(x + attn(x, h), h + "ln1")
            x = ln(x + ffn(x, h), h + "ln2")
    if cfg.final_layernorm:
        x = ln(x, "final_ln")
    if not cfg.lm_head:
        return x
    w = p["tok_emb"] if cfg.tie_word_embeddings else p["lm_head.w"]
    return linear(x, w, p.get("lm_head.b"))


# ---------------------------------------------------------------- Llama family (issue 12)
def rmsnorm(x, w, eps):
    """x (..., C) -> (out, rstd): out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) of shape x.shape[:-1]."""
    x = f64(x)
    rstd = 1.0 / np.sqrt((x * x).mean(-1) + eps)
    return x * rstd[..., None] * f64(w), rstd


def rope_inv_freq(HS, theta, scaling="none", factor=1.0, low=1.0, high=4.0, original_max=0):
    """theta^(-2i/HS), i < HS/2, with Hugging Face's 'linear' / 'llama3' rescaling, element by element."""
    out = []
    for i in range(HS // 2):
        f = theta ** (-2.0 * i / HS)
        if scaling == "linear":
            f /= factor
        elif scaling == "llama3":
            wl = 2 * math.pi / f
            if wl > original_max / low:
                f /= factor
            elif wl >= original_max / high:
                s = (original_max / wl - low) / (high - low)
                f = (1 - s) * f / factor + s * f
        out.append(f)
    return np.array(out)


def rope(x, pos_ids, inv_freq):
    """Rotate-half RoPE of x (B, T, n, HS) at positions pos_ids (B, T): pairs (i, i + HS/2)."""
    x = f64(x).copy()
    half = x.shape[-1] // 2
    ang = np.asarray(pos_ids, np.float64)[..., None] * f64(inv_freq)  # (B, T, half)
    c, s = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    x1, x2 = x[..., :half].copy(), x[..., half:].copy()
    x[..., :half] = x1 * c - x2 * s
    x[..., half:] = x2 * c + x1 * s
    return x


def rope_qkv(qkv, pos_ids, inv_freq, NH, NKV, HS):
    """RoPE on the Q and K heads of a fused qkv (B, T, (NH + 2 NKV) HS); V columns unchanged."""
    out = f64(qkv).copy()
    B, T, _ = out.shape
    n = (NH + NKV) * HS
    out[..., :n] = rope(out[..., :n].reshape(B, T, NH + NKV, HS), pos_ids, inv_freq).reshape(B, T, n)
    return out


def glu(pre, act="silu"):
    """act(pre[..., :F]) * pre[..., F:] for pre (..., 2F) = gate | up."""
    pre = f64(pre)
    F = pre.shape[-1] // 2
    return ACTIVATIONS[act](pre[..., :F]) * pre[..., F:]


def linear_glu(x, w, b=None, act="silu"):
    """The gated FFN input layer: act(x @ Wg.T + bg) * (x @ Wu.T + bu) with w = Wg | Wu (2F, K)."""
    return glu(linear(x, w, b), act)


def attention_gqa(q, k, v, key_mask=None, causal=False, scale=None):
    """Grouped-query attention: q (B, NH, Tq, HS), k/v (B, NKV, Tk, HS); query head h uses kv head
    h // (NH / NKV). Returns out (B, NH, Tq, HS), lse (B, NH, Tq)."""
    G = q.shape[1] // k.shape[1]
    return attention(q, np.repeat(f64(k), G, axis=1), np.repeat(f64(v), G, axis=1), key_mask, causal, scale)


def llama_forward(cfg, params, ids, mask=None, pos_ids=None):
    """Whole Llama-style decoder forward (RMSNorm, RoPE, GQA, gated FFN) over canonical names -> logits."""
    p = {k: f64(v) for k, v in params.items()}
    ids = np.asarray(ids)
    B, T = ids.shape
    NH, NKV, HS = cfg.n_heads, cfg.kv_heads, cfg.head_size
    mask = np.ones((B, T)) if mask is None else np.asarray(mask)
    if pos_ids is None:
        pos_ids = np.broadcast_to(np.arange(T), (B, T))
    inv = rope_inv_freq(HS, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                        cfg.rope_high_freq_factor, cfg.rope_original_max_positions)
    ff = getattr(cfg, "rope_freq_factors", ())
    if len(ff):  # a GGUF's rope_freqs divisors (llama.cpp: theta_i = pos * inv_i / ff_i)
        inv = inv / np.asarray(ff, dtype=np.float64)
    eps = cfg.layer_norm_eps
    x = p["tok_emb"][ids] * cfg.embedding_scale
    for i in range(cfg.n_layers):
        h = f"h{i}."
        qkv = rope_qkv(linear(rmsnorm(x, p[h + "ln1.w"], eps)[0], p[h + "attn.qkv.w"], p.get(h + "attn.qkv.b")),
                       pos_ids, inv, NH, NKV, HS)
        q = split_heads(qkv[..., :NH * HS], NH)
        k = split_heads(qkv[..., NH * HS:(NH + NKV) * HS], NKV)
        v = split_heads(qkv[..., (NH + NKV) * HS:], NKV)
        o, _ = attention_gqa(q, k, v, mask, causal=True, scale=1.0 / math.sqrt(HS))
        x = x + linear(merge_heads(o), p[h + "attn.out.w"], p.get(h + "attn.out.b"))
        u = linear_glu(rmsnorm(x, p[h + "ln2.w"], eps)[0], p[h + "ffn.gate_up.w"], p.get(h + "ffn.gate_up.b"),
                       cfg.activation)
        x = x + linear(u, p[h + "ffn.down.w"], p.get(h + "ffn.down.b"))
    x = rmsnorm(x, p["final_ln.w"], eps)[0]
    w = p["tok_emb"] if cfg.tie_word_embeddings else p["lm_head.w"]
    return linear(x, w, p.get("lm_head.b"))
