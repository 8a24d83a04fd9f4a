"""Hugging Face `bert` (BertModel and the encoder of sentence-transformers models)."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from .mapping import Rule

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
PREFIXES = ("", "bert.", "model.")
PROBE = "embeddings.word_embeddings.weight"


def config_from_hf(c: dict, where: str) -> ModelConfig:
    def need(key):
        if key not in c:
            raise ConfigError(f"{where}: missing '{key}' for model_type 'bert'")
        return c[key]

    act = c.get("hidden_act", "gelu")
    if act not in _ACT:
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (expected one of {sorted(_ACT)})")
    pet = c.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise ConfigError(f"{where}: position_embedding_type {pet!r} is not supported (expected 'absolute')")
    pad = c.get("pad_token_id")
    return ModelConfig(
        arch="encoder", family="bert",
        vocab_size=need("vocab_size"), d_model=need("hidden_size"), n_heads=need("num_attention_heads"),
        n_layers=need("num_hidden_layers"), d_ff=need("intermediate_size"),
        max_positions=need("max_position_embeddings"), norm="post", activation=_ACT[act],
        positions="learned", type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)), embedding_layernorm=True,
        final_layernorm=False, lm_head=False, tie_word_embeddings=False,
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < need("vocab_size") else None,
        padding_idx=pad if isinstance(pad, int) and 0 <= pad < need("vocab_size") else None,
    )


def rules(cfg: ModelConfig, prefix: str) -> list:
    p = prefix
    r = [Rule("tok_emb", (p + "embeddings.word_embeddings.weight",)),
         Rule("pos_emb", (p + "embeddings.position_embeddings.weight",)),
         Rule("emb_ln.w", (p + "embeddings.LayerNorm.weight",)),
         Rule("emb_ln.b", (p + "embeddings.LayerNorm.bias",))]
    if cfg.type_vocab_size:
        r.append(Rule("type_emb", (p + "embeddings.token_type_embeddings.weight",)))
    for i in range(cfg.n_layers):
        L, h = f"{p}encoder.layer.{i}.", f"h{i}."
        a = L + "attention.self."
        r += [Rule(h + "attn.qkv.w", (a + "query.weight", a + "key.weight", a + "value.weight"), "cat0"),
              Rule(h + "attn.qkv.b", (a + "query.bias", a + "key.bias", a + "value.bias"), "cat0"),
              Rule(h + "attn.out.w", (L + "attention.output.dense.weight",)),
              Rule(h + "attn.out.b", (L + "attention.output.dense.bias",)),
              Rule(h + "ln1.w", (L + "attention.output.LayerNorm.weight",)),
              Rule(h + "ln1.b", (L + "attention.output.LayerNorm.bias",)),
              Rule(h + "ffn.up.w", (L + "intermediate.dense.weight",)),
              Rule(h + "ffn.up.b", (L + "intermediate.dense.bias",)),
              Rule(h + "ffn.down.w", (L + "output.dense.weight",)),
              Rule(h + "ffn.down.b", (L + "output.dense.bias",)),
              Rule(h + "ln2.w", (L + "output.LayerNorm.weight",)),
              Rule(h + "ln2.b", (L + "output.LayerNorm.bias",))]
    return r
