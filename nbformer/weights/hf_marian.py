"""Hugging Face `marian` (MarianMTModel / MarianModel): the real-world encoder-decoder format.

Post-LN encoder and decoder, static sinusoidal positions with sines and cosines in separate
halves (positions 0.. on both sides), shared source/target/output embeddings scaled by sqrt(d)
when scale_embedding, q/k/v/out projections with biases, and final_logits_bias added to the
logits (a buffer in transformers: it is loaded here as lm_head.b).
"""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from .mapping import Rule

_ACT = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh"}
PREFIXES = ("model.", "")
PROBE = "shared.weight"
# generation settings transformers reads from config.json / generation_config.json that change
# which tokens come out; nbformer.generate applies them as defaults
GENERATION_KEYS = ("forced_eos_token_id", "bad_words_ids", "num_beams", "max_length", "max_new_tokens",
                   "length_penalty", "early_stopping", "repetition_penalty", "min_length", "no_repeat_ngram_size")


def config_from_hf(c: dict, where: str) -> ModelConfig:
    def need(key):
        if key not in c:
            raise ConfigError(f"{where}: missing '{key}' for model_type 'marian'")
        return c[key]

    act = c.get("activation_function", "gelu")
    if act not in _ACT:
        raise ConfigError(f"{where}: activation_function {act!r} is not supported (expected one of {sorted(_ACT)})")
    V = need("vocab_size")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if need(a) != need(b):
            raise ConfigError(f"{where}: {a} = {c[a]} differs from {b} = {c[b]}; nbformer needs them equal")
    if (c.get("decoder_vocab_size") or V) != V or c.get("share_encoder_decoder_embeddings", True) is not True:
        raise ConfigError(f"{where}: separate source and target vocabularies (decoder_vocab_size / "
                          f"share_encoder_decoder_embeddings = false) are not supported")
    if c.get("normalize_before", False):
        raise ConfigError(f"{where}: normalize_before = true is not supported for marian (post-LN only)")

    def tok(key):
        v = c.get(key)
        return v if isinstance(v, int) and 0 <= v < V else None

    d = need("d_model")
    gen = {k: c[k] for k in GENERATION_KEYS if c.get(k) is not None}
    return ModelConfig(
        arch="encoder_decoder", family="marian", vocab_size=V, d_model=d, n_heads=need("encoder_attention_heads"),
        n_layers=need("encoder_layers"), n_decoder_layers=need("decoder_layers"), d_ff=need("encoder_ffn_dim"),
        max_positions=need("max_position_embeddings"), norm="post", activation=_ACT[act],
        positions="sinusoidal_split", layer_norm_eps=1e-5, embedding_layernorm=False, final_layernorm=False,
        embedding_scale=d ** 0.5 if c.get("scale_embedding", False) else 1.0, qkv_bias=True, lm_head=True,
        lm_head_bias=True, tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        pad_token_id=tok("pad_token_id"), padding_idx=tok("pad_token_id"), eos_token_id=tok("eos_token_id"),
        bos_token_id=tok("bos_token_id"), decoder_start_token_id=tok("decoder_start_token_id"),
        extra={"generation": gen} if gen else {},
    )


def rules(cfg: ModelConfig, prefix: str) -> list:
    p = prefix
    r = [Rule("tok_emb", (p + "shared.weight",))]
    if cfg.lm_head_bias:
        r.append(Rule("lm_head.b", ("final_logits_bias",), "flat"))

    def attn(L, h, name, canon, fused):
        a = f"{L}{name}."
        if fused == "qkv":
            out = [Rule(h + canon + ".qkv.w", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "cat0"),
                   Rule(h + canon + ".qkv.b", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "cat0")]
        else:  # cross-attention: queries from the decoder, keys/values from the encoder
            out = [Rule(h + canon + ".q.w", (a + "q_proj.weight",)), Rule(h + canon + ".q.b", (a + "q_proj.bias",)),
                   Rule(h + canon + ".kv.w", (a + "k_proj.weight", a + "v_proj.weight"), "cat0"),
                   Rule(h + canon + ".kv.b", (a + "k_proj.bias", a + "v_proj.bias"), "cat0")]
        return out + [Rule(h + canon + ".out.w", (a + "out_proj.weight",)),
                      Rule(h + canon + ".out.b", (a + "out_proj.bias",))]

    def ln(canon, name):
        return [Rule(canon + ".w", (name + ".weight",)), Rule(canon + ".b", (name + ".bias",))]

    for side, n, canon_side in (("encoder", cfg.n_layers, ""), ("decoder", cfg.n_decoder_layers, "dec.")):
        for i in range(n):
            L, h = f"{p}{side}.layers.{i}.", f"{canon_side}h{i}."
            r += attn(L, h, "self_attn", "attn", "qkv") + ln(h + "ln1", L + "self_attn_layer_norm")
            if side == "decoder":
                r += attn(L, h, "encoder_attn", "xattn", "x") + ln(h + "lnx", L + "encoder_attn_layer_norm")
            r += [Rule(h + "ffn.up.w", (L + "fc1.weight",)), Rule(h + "ffn.up.b", (L + "fc1.bias",)),
                  Rule(h + "ffn.down.w", (L + "fc2.weight",)), Rule(h + "ffn.down.b", (L + "fc2.bias",))]
            r += ln(h + "ln2", L + "final_layer_norm")
    if not cfg.tie_word_embeddings:
        r.append(Rule("lm_head.w", ("lm_head.weight",)))
    return r
