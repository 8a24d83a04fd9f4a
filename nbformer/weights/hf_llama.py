"""Hugging Face `llama` (LlamaForCausalLM / LlamaModel).

Pre-norm decoder with RMSNorm, rotary positions (rotate-half layout), grouped-query attention
(num_key_value_heads), a SwiGLU FFN and by default no biases. Mapping to canonical tensors:
  q_proj | k_proj | v_proj          -> h{i}.attn.qkv.w  ((NH + 2*NKV)*HS, C), rows stacked in that order
  gate_proj | up_proj               -> h{i}.ffn.gate_up.w  (2F, C)
  input / post_attention_layernorm  -> h{i}.ln1.w / h{i}.ln2.w;  model.norm -> final_ln.w
Every rule inverts (np.split at the recorded row counts), so gradients come back keyed by the HF
names. Both config layouts are read: transformers 5's `rope_parameters` dict and 4.x's
`rope_theta` + `rope_scaling`.

GGUF: llama.cpp's converter permutes the Q and K rows of each head into interleaved pairs for its
rotation; a GGUF loader calls unpermute_gguf_qk to get back this (HF) layout, so nbformer needs one
RoPE kernel only.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from .mapping import Rule

_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "relu": "relu"}
PREFIXES = ("model.", "")
PROBE = "embed_tokens.weight"
ROPE_TYPES = ("default", "linear", "llama3")  # rope_type values nbformer computes
_UNSUPPORTED_ROPE = ("dynamic", "yarn", "longrope", "proportional")  # known to transformers, not here


def _rope(c: dict, where: str) -> dict:
    """ModelConfig rope fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x)."""
    rp = c.get("rope_parameters")
    nested = isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict)
    if nested:  # per-layer-type layout
        rp = rp["full_attention"]
    if not isinstance(rp, dict) or not rp:
        rp = c.get("rope_scaling")
    rp = dict(rp) if isinstance(rp, dict) else {}
    if "rope_theta" in c:  # transformers' standardize_rope_params: the top-level value fills a missing one
        rp.setdefault("rope_theta", c["rope_theta"])
    kind = rp.get("rope_type", rp.get("type", "default")) or "default"
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not a string")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (supported: "
                          f"{', '.join(ROPE_TYPES)}; not yet: {', '.join(_UNSUPPORTED_ROPE)})")
    partial = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor = {partial!r} is not supported (rotary positions "
                          f"over the whole head only)")

    def num(key, default=None):
        v = rp.get(key, default)
        if v is None:
            raise ConfigError(f"{where}: rope scaling {kind!r} needs {key!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: rope parameter {key!r} = {v!r}, expected a positive number")
        return float(v)

    out = {"rope_theta": num("rope_theta", 10000.0)}
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=num("factor"))
    elif kind == "llama3":
        # the pre-training length as transformers takes it: a top-level original_max_position_embeddings
        # wins (non-nested layout), then the rope dict's, then max_position_embeddings
        orig = c.get("original_max_position_embeddings") if not nested else None
        if orig is None:
            orig = rp.get("original_max_position_embeddings", c.get("max_position_embeddings"))
        if isinstance(orig, float) and orig.is_integer():
            orig = int(orig)
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise ConfigError(f"{where}: rope scaling 'llama3' needs a positive integer "
                              f"'original_max_position_embeddings', got {orig!r}")
        out.update(rope_scaling="llama3", rope_factor=num("factor"), rope_low_freq_factor=num("low_freq_factor"),
                   rope_high_freq_factor=num("high_freq_factor"), rope_original_max_positions=orig)
    return out


def config_from_hf(c: dict, where: str) -> ModelConfig:
    def need(key):
        if key not in c:
            raise ConfigError(f"{where}: missing '{key}' for model_type 'llama'")
        return c[key]

    act = c.get("hidden_act", "silu")
    if act not in _ACT:
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (expected one of {sorted(_ACT)})")
    C, NH, V = need("hidden_size"), need("num_attention_heads"), need("vocab_size")
    NKV = c.get("num_key_value_heads") or NH
    hd = c.get("head_dim")
    if not isinstance(NKV, int) or NKV <= 0 or NH % NKV:
        raise ConfigError(f"{where}: num_key_value_heads = {NKV!r} must be a positive divisor of "
                          f"num_attention_heads = {NH}")

    def tok(key):
        v = c.get(key)
        if isinstance(v, list):  # several EOS ids (Llama 3): the first one
            v = next((x for x in v if isinstance(x, int)), None)
        return v if isinstance(v, int) and 0 <= v < V else None

    bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        arch="decoder", family="llama", vocab_size=V, d_model=C, n_heads=NH, n_layers=need("num_hidden_layers"),
        d_ff=need("intermediate_size"), max_positions=int(c.get("max_position_embeddings", 2048)), norm="pre",
        norm_type="rmsnorm", activation=_ACT[act], ffn_type="glu", positions="rope",
        n_kv_heads=None if NKV == NH else NKV,
        head_dim=None if hd is None or (C % NH == 0 and hd == C // NH) else hd,
        qkv_bias=bias, attn_out_bias=bias, ffn_bias=bool(c.get("mlp_bias", False)),
        layer_norm_eps=float(c.get("rms_norm_eps", 1e-6)), embedding_layernorm=False, final_layernorm=True,
        lm_head=True, lm_head_bias=False, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("pad_token_id"),
        **_rope(c, where),
    )


def rules(cfg: ModelConfig, prefix: str) -> list:
    p = prefix
    HS, NH, NKV, F = cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.d_ff
    qkv_rows = (NH * HS, NKV * HS, NKV * HS)
    r = [Rule("tok_emb", (p + "embed_tokens.weight",)), Rule("final_ln.w", (p + "norm.weight",))]
    for i in range(cfg.n_layers):
        L, h = f"{p}layers.{i}.", f"h{i}."
        a, m = L + "self_attn.", L + "mlp."
        r += [Rule(h + "ln1.w", (L + "input_layernorm.weight",)),
              Rule(h + "attn.qkv.w", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "cat0",
                   qkv_rows),
              Rule(h + "attn.out.w", (a + "o_proj.weight",)),
              Rule(h + "ln2.w", (L + "post_attention_layernorm.weight",)),
              Rule(h + "ffn.gate_up.w", (m + "gate_proj.weight", m + "up_proj.weight"), "cat0", (F, F)),
              Rule(h + "ffn.down.w", (m + "down_proj.weight",))]
        if cfg.qkv_bias:
            r.append(Rule(h + "attn.qkv.b", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "cat0",
                          qkv_rows))
        if cfg.attn_out_bias:
            r.append(Rule(h + "attn.out.b", (a + "o_proj.bias",)))
        if cfg.ffn_bias:
            r += [Rule(h + "ffn.gate_up.b", (m + "gate_proj.bias", m + "up_proj.bias"), "cat0", (F, F)),
                  Rule(h + "ffn.down.b", (m + "down_proj.bias",))]
    if not cfg.tie_word_embeddings:
        r.append(Rule("lm_head.w", ("lm_head.weight",)))
    return r


def unpermute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute of a Q (n_heads = NH) or K (n_heads = NKV)
    projection weight (rows: heads x HS) or bias: its per-head rows (2, HS/2) -> (HS/2, 2) order for
    interleaved-pair RoPE goes back to the Hugging Face rotate-half order this runtime uses."""
    w = np.asarray(w)
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"unpermute_gguf_qk: {rows} rows are not {n_heads} heads of an even size")
    return np.ascontiguousarray(
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
