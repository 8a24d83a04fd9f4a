"""Canonical parameter names and shapes of an nbformer model, derived from its ModelConfig.

Linear weights use the nn.Linear layout (out_features, in_features); the attention input
projection is one fused (3C, C) matrix so Q, K and V come out of a single GEMM.
"""
from __future__ import annotations

from ..config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict:
    """name -> shape for every trainable tensor the graph of `cfg` reads."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    p = {"tok_emb": (V, C)}
    if cfg.positions == "learned":
        p["pos_emb"] = (cfg.max_positions, C)
    if cfg.type_vocab_size:
        p["type_emb"] = (cfg.type_vocab_size, C)
    if cfg.embedding_layernorm:
        p["emb_ln.w"], p["emb_ln.b"] = (C,), (C,)
    for i in range(cfg.n_layers):
        h = f"h{i}."
        p[h + "ln1.w"], p[h + "ln1.b"] = (C,), (C,)
        p[h + "attn.qkv.w"] = (3 * C, C)
        if cfg.qkv_bias:
            p[h + "attn.qkv.b"] = (3 * C,)
        p[h + "attn.out.w"], p[h + "attn.out.b"] = (C, C), (C,)
        p[h + "ln2.w"], p[h + "ln2.b"] = (C,), (C,)
        p[h + "ffn.up.w"], p[h + "ffn.up.b"] = (F, C), (F,)
        p[h + "ffn.down.w"], p[h + "ffn.down.b"] = (C, F), (C,)
    if cfg.final_layernorm:
        p["final_ln.w"], p["final_ln.b"] = (C,), (C,)
    if cfg.lm_head and not cfg.tie_word_embeddings:
        p["lm_head.w"] = (V, C)
    if cfg.lm_head and cfg.lm_head_bias:
        p["lm_head.b"] = (V,)
    return p


def count_params(cfg: ModelConfig) -> int:
    n = 0
    for shape in param_shapes(cfg).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n
