"""Canonical parameter names and shapes of an nbformer model, derived from its ModelConfig.

Linear weights use the nn.Linear layout (out_features, in_features); the attention input
projection is one fused (3C, C) matrix so Q, K and V come out of a single GEMM.

Llama-style configs: with grouped-query attention / head_dim the fused projection has
(NH + 2*NKV)*HS rows (Q | K | V) and attn.out.w is (C, NH*HS); RMSNorm layers have a weight and
no bias; a gated FFN (ffn_type 'glu') has one fused ffn.gate_up.w (2F, C) (gate rows first, then
up) and ffn.down.w (C, F); biases follow qkv_bias / attn_out_bias / ffn_bias.
"""
from __future__ import annotations

from ..config import ModelConfig


def _norm(p: dict, name: str, C: int, cfg: ModelConfig):
    p[name + ".w"] = (C,)
    if cfg.norm_type == "layernorm":
        p[name + ".b"] = (C,)


def _layer(p: dict, h: str, C: int, F: int, qkv_bias: bool, cross: bool, cfg: ModelConfig):
    A, W = cfg.attn_width, cfg.qkv_width  # NH*HS, (NH + 2*NKV)*HS: both 3C / C for classic models
    _norm(p, h + "ln1", C, cfg)
    p[h + "attn.qkv.w"] = (W, C)
    if qkv_bias:
        p[h + "attn.qkv.b"] = (W,)
    p[h + "attn.out.w"] = (C, A)
    if cfg.attn_out_bias:
        p[h + "attn.out.b"] = (C,)
    if cross:  # decoder layer of an encoder-decoder: queries from the decoder, keys/values from the encoder
        _norm(p, h + "lnx", C, cfg)
        p[h + "xattn.q.w"] = (C, C)
        p[h + "xattn.kv.w"] = (2 * C, C)
        if qkv_bias:
            p[h + "xattn.q.b"], p[h + "xattn.kv.b"] = (C,), (2 * C,)
        p[h + "xattn.out.w"] = (C, C)
        if cfg.attn_out_bias:
            p[h + "xattn.out.b"] = (C,)
    _norm(p, h + "ln2", C, cfg)
    up = "ffn.gate_up" if cfg.ffn_type == "glu" else "ffn.up"
    p[h + up + ".w"] = (2 * F if cfg.ffn_type == "glu" else F, C)
    if cfg.ffn_bias:
        p[h + up + ".b"] = (2 * F if cfg.ffn_type == "glu" else F,)
    p[h + "ffn.down.w"] = (C, F)
    if cfg.ffn_bias:
        p[h + "ffn.down.b"] = (C,)


def param_shapes(cfg: ModelConfig) -> dict:
    """name -> shape for every trainable tensor the graph of `cfg` reads.

    Encoder-decoder models: the encoder uses the plain names (h{i}., emb_ln, final_ln, pos_emb),
    the decoder the same names under 'dec.' plus cross-attention (dec.h{i}.lnx / xattn.q / xattn.kv
    / xattn.out); tok_emb is shared by source, target and output projection."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    p = {"tok_emb": (V, C)}
    seq2seq = cfg.arch == "encoder_decoder"
    sides = ("", "dec.") if seq2seq else ("",)
    for side in sides:
        if cfg.positions == "learned":
            p[side + "pos_emb"] = (cfg.max_positions, C)
        if cfg.type_vocab_size and side == "":
            p["type_emb"] = (cfg.type_vocab_size, C)
        if cfg.embedding_layernorm:
            _norm(p, side + "emb_ln", C, cfg)
        n = cfg.n_decoder_layers if side == "dec." else cfg.n_layers
        for i in range(n):
            _layer(p, f"{side}h{i}.", C, F, cfg.qkv_bias, cross=side == "dec.", cfg=cfg)
        if cfg.final_layernorm:
            _norm(p, side + "final_ln", C, cfg)
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


ALIGN_FLOATS = 16  # every tensor of a flat buffer starts on a 64-byte boundary


def flat_layout(shapes: dict) -> tuple:
    """name -> (offset, size) in floats of each tensor in one flat float32 buffer, and its length."""
    offsets, n = {}, 0
    for name, shape in shapes.items():
        size = 1
        for s in shape:
            size *= int(s)
        offsets[name] = (n, size)
        n = (n + size + ALIGN_FLOATS - 1) // ALIGN_FLOATS * ALIGN_FLOATS
    return offsets, n
