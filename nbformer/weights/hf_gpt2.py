"""Hugging Face `gpt2` (GPT2Model / GPT2LMHeadModel). Its Conv1D weights are (in, out)."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from .mapping import Rule

_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
PREFIXES = ("transformer.", "")
PROBE = "wte.weight"


def config_from_hf(c: dict, where: str) -> ModelConfig:
    def need(key):
        if key not in c:
            raise ConfigError(f"{where}: missing '{key}' for model_type 'gpt2'")
        return c[key]

    act = c.get("activation_function", "gelu_new")
    if act not in _ACT:
        raise ConfigError(f"{where}: activation_function {act!r} is not supported (expected one of {sorted(_ACT)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if c.get(key, ok) != ok:
            raise ConfigError(f"{where}: {key} = {c[key]!r} is not supported (expected {ok!r})")
    C = need("n_embd")
    V = need("vocab_size")

    def tok(key):
        v = c.get(key)
        return v if isinstance(v, int) and 0 <= v < V else None

    return ModelConfig(
        arch="decoder", family="gpt2", vocab_size=V, d_model=C, n_heads=need("n_head"),
        n_layers=need("n_layer"), d_ff=c.get("n_inner") or 4 * C, max_positions=need("n_positions"),
        norm="pre", activation=_ACT[act], positions="learned", type_vocab_size=0,
        layer_norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), embedding_layernorm=False,
        final_layernorm=True, lm_head=True, tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("pad_token_id"),
    )


def rules(cfg: ModelConfig, prefix: str) -> list:
    p = prefix
    r = [Rule("tok_emb", (p + "wte.weight",)), Rule("pos_emb", (p + "wpe.weight",)),
         Rule("final_ln.w", (p + "ln_f.weight",)), Rule("final_ln.b", (p + "ln_f.bias",))]
    for i in range(cfg.n_layers):
        L, h = f"{p}h.{i}.", f"h{i}."
        r += [Rule(h + "ln1.w", (L + "ln_1.weight",)), Rule(h + "ln1.b", (L + "ln_1.bias",)),
              Rule(h + "attn.qkv.w", (L + "attn.c_attn.weight",), "transpose"),
              Rule(h + "attn.qkv.b", (L + "attn.c_attn.bias",)),
              Rule(h + "attn.out.w", (L + "attn.c_proj.weight",), "transpose"),
              Rule(h + "attn.out.b", (L + "attn.c_proj.bias",)),
              Rule(h + "ln2.w", (L + "ln_2.weight",)), Rule(h + "ln2.b", (L + "ln_2.bias",)),
              Rule(h + "ffn.up.w", (L + "mlp.c_fc.weight",), "transpose"),
              Rule(h + "ffn.up.b", (L + "mlp.c_fc.bias",)),
              Rule(h + "ffn.down.w", (L + "mlp.c_proj.weight",), "transpose"),
              Rule(h + "ffn.down.b", (L + "mlp.c_proj.bias",))]
    if not cfg.tie_word_embeddings:
        r.append(Rule("lm_head.w", ("lm_head.weight",)))
    return r
