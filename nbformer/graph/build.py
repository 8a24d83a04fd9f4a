"""Graph builders: one forward graph per architecture, for concrete (B, T).

Inputs: input_ids (B, T) i64, position_ids (B, T) i64, token_type_ids (B, T) i64 when the
model has token types, key_mask (B, T) u8 (1 = real token), last_idx (B,) i64 when only the
last position's logits are wanted (generation). Outputs: hidden (B, T, C) or logits.
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from ..weights.params import param_shapes
from .ir import Graph


class _Builder:
    def __init__(self, cfg: ModelConfig):
        self.cfg, self.g = cfg, Graph()
        for name, shape in param_shapes(cfg).items():
            self.g.tensor(name, shape, kind="param")
        if cfg.positions == "sinusoidal":
            self.g.tensor("pos_emb", (cfg.max_positions, cfg.d_model), kind="const")

    def act(self, name, shape):
        return self.g.tensor(name, shape)

    def layernorm(self, x, prefix, out_name):
        g, shape = self.g, self.g.tensors[x].shape
        out = self.act(out_name, shape)
        mean, rstd = self.act(out_name + ".mean", shape[:-1]), self.act(out_name + ".rstd", shape[:-1])
        g.node("layernorm", {"x": x, "w": prefix + ".w", "b": prefix + ".b"},
               {"out": out, "mean": mean, "rstd": rstd}, {"eps": float(self.cfg.layer_norm_eps)})
        return out

    def linear(self, x, w, b, out_name, act="none", residual=None):
        g = self.g
        shape = g.tensors[x].shape[:-1] + (g.tensors[w].shape[0],)
        out = self.act(out_name, shape)
        ins = {"x": x, "w": w}
        if b is not None and b in g.tensors:
            ins["b"] = b
        if residual is not None:
            ins["residual"] = residual
        g.node("linear", ins, {"out": out}, {"act": act})
        return out

    def self_attention(self, x, p, mask, causal, name):
        cfg = self.cfg
        B, T, C = self.g.tensors[x].shape
        qkv = self.linear(x, p + "attn.qkv.w", p + "attn.qkv.b", name + ".qkv")  # (B, T, 3C)
        out = self.act(name + ".attn", (B, T, C))
        lse = self.act(name + ".lse", (B, cfg.n_heads, T))
        self.g.node("attention", {"q": qkv, "kv": qkv, "key_mask": mask}, {"out": out, "lse": lse},
                    {"n_heads": cfg.n_heads, "head_size": cfg.head_size, "q_off": 0, "k_off": C,
                     "v_off": 2 * C, "causal": causal, "scale": 1.0 / math.sqrt(cfg.head_size)})
        return out

    def block(self, x, i, mask, causal):
        """One transformer layer; pre-LN: x + f(LN(x)); post-LN: LN(x + f(x))."""
        cfg, p, n = self.cfg, f"h{i}.", f"h{i}"
        if cfg.norm == "pre":
            h = self.layernorm(x, p + "ln1", n + ".ln1")
            a = self.self_attention(h, p, mask, causal, n)
            x = self.linear(a, p + "attn.out.w", p + "attn.out.b", n + ".res1", residual=x)
            h = self.layernorm(x, p + "ln2", n + ".ln2")
            u = self.linear(h, p + "ffn.up.w", p + "ffn.up.b", n + ".ffn", act=cfg.activation)
            return self.linear(u, p + "ffn.down.w", p + "ffn.down.b", n + ".res2", residual=x)
        a = self.self_attention(x, p, mask, causal, n)
        s = self.linear(a, p + "attn.out.w", p + "attn.out.b", n + ".res1", residual=x)
        x = self.layernorm(s, p + "ln1", n + ".ln1")
        u = self.linear(x, p + "ffn.up.w", p + "ffn.up.b", n + ".ffn", act=cfg.activation)
        s = self.linear(u, p + "ffn.down.w", p + "ffn.down.b", n + ".res2", residual=x)
        return self.layernorm(s, p + "ln2", n + ".ln2")

    def embed(self, B, T):
        cfg, g = self.cfg, self.g
        ins = {"ids": g.tensor("input_ids", (B, T), "i64", "input"), "wte": "tok_emb"}
        if cfg.positions != "none":
            ins["pos_ids"] = g.tensor("position_ids", (B, T), "i64", "input")
            ins["wpe"] = "pos_emb"
        if cfg.type_vocab_size:
            ins["type_ids"] = g.tensor("token_type_ids", (B, T), "i64", "input")
            ins["wtt"] = "type_emb"
        x = self.act("emb", (B, T, cfg.d_model))
        g.node("embedding", ins, {"out": x}, {"scale": float(cfg.embedding_scale)})
        if cfg.embedding_layernorm:
            x = self.layernorm(x, "emb_ln", "emb.ln")
        return x


def build_forward(cfg: ModelConfig, B: int, T: int, logits: str = "all") -> Graph:
    """Encoder-only or decoder-only forward. logits: 'all' (B, T, V) | 'last' (B, V) via last_idx."""
    if cfg.arch == "encoder_decoder":
        raise NotImplementedError("encoder_decoder graphs are built by build_seq2seq")
    b = _Builder(cfg)
    g = b.g
    mask = g.tensor("key_mask", (B, T), "u8", "input")
    x = b.embed(B, T)
    causal = cfg.arch == "decoder"
    for i in range(cfg.n_layers):
        x = b.block(x, i, mask, causal)
    if cfg.final_layernorm:
        x = b.layernorm(x, "final_ln", "final.ln")
    if not cfg.lm_head:
        g.mark_output(x)
        return g
    if logits == "last":
        idx = g.tensor("last_idx", (B,), "i64", "input")
        last = b.act("last_hidden", (B, cfg.d_model))
        g.node("take_rows", {"x": x, "idx": idx}, {"out": last})
        x = last
    w = "tok_emb" if cfg.tie_word_embeddings else "lm_head.w"
    out = b.linear(x, w, "lm_head.b", "logits")
    g.mark_output(out)
    return g


def build_embed(cfg: ModelConfig, B: int, T: int, pooling: str = "mean", normalize: bool = True) -> Graph:
    """Encoder forward + sentence pooling over real tokens (+ L2 normalisation): output (B, C)."""
    g = build_forward(cfg, B, T)
    hidden = g.outputs.pop()
    pooled = g.tensor("pooled", (B, cfg.d_model))
    g.node("pool", {"x": hidden, "mask": "key_mask"}, {"out": pooled}, {"mode": pooling})
    if normalize:
        out = g.tensor("embedding", (B, cfg.d_model))
        g.node("l2_normalize", {"x": pooled}, {"out": out}, inplace={"out": "x"})
        pooled = out
    g.mark_output(pooled)
    return g
