"""Graph builders: one forward graph per architecture, for concrete (B, T).

Inputs: input_ids (B, T) i64, position_ids (B, T) i64, token_type_ids (B, T) i64 when the
model has token types, key_mask (B, T) u8 (1 = real token), last_idx (B,) i64 when only the
last position's logits are wanted (generation). Outputs: hidden (B, T, C) or logits.

Training graphs (build_train) add: linear layers that also keep their pre-activation for the
backward pass, dropout (embeddings, attention probabilities, residual branches) driven by a
per-step seed input, a loss, and the backward graph from graph.autodiff.
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from ..weights.params import param_shapes
from .ir import Graph


class _Builder:
    def __init__(self, cfg: ModelConfig, train: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0):
        self.cfg, self.g = cfg, Graph()
        self.train, self.dropout, self.attn_dropout = train, float(dropout), float(attn_dropout)
        self.streams = 0  # each dropout site draws from its own counter stream
        for name, shape in param_shapes(cfg).items():
            self.g.tensor(name, shape, kind="param")
        if cfg.sinusoidal:
            self.g.tensor("pos_emb", (cfg.max_positions, cfg.d_model), kind="const")
        if train and (self.dropout > 0 or self.attn_dropout > 0):
            self.g.tensor("dropout_seed", (1,), "i64", "input")

    def act(self, name, shape):
        return self.g.tensor(name, shape)

    def next_stream(self) -> int:
        self.streams += 1
        return self.streams

    def layernorm(self, x, prefix, out_name):
        g, shape = self.g, self.g.tensors[x].shape
        out = self.act(out_name, shape)
        mean, rstd = self.act(out_name + ".mean", shape[:-1]), self.act(out_name + ".rstd", shape[:-1])
        g.node("layernorm", {"x": x, "w": prefix + ".w", "b": prefix + ".b"},
               {"out": out, "mean": mean, "rstd": rstd}, {"eps": float(self.cfg.layer_norm_eps)})
        return out

    def linear(self, x, w, b, out_name, act="none", residual=None):
        """out = act(x @ w.T + b) [+ residual]; with dropout in training the residual add is split
        off: out = residual + dropout(x @ w.T + b)."""
        g = self.g
        if residual is not None and self.train and self.dropout > 0:
            branch = self.dropout_(self.linear(x, w, b, out_name + ".branch", act), out_name + ".drop")
            out = self.act(out_name, g.tensors[branch].shape)
            g.node("add", {"a": branch, "b": residual}, {"out": out}, inplace={"out": "a"})
            return out
        shape = g.tensors[x].shape[:-1] + (g.tensors[w].shape[0],)
        out = self.act(out_name, shape)
        ins = {"x": x, "w": w}
        if b is not None and b in g.tensors:
            ins["b"] = b
        if residual is not None:
            ins["residual"] = residual
        outs = {"out": out}
        if self.train and act != "none":
            outs["pre"] = self.act(out_name + ".pre", shape)  # saved for the activation's backward
        g.node("linear", ins, outs, {"act": act})
        return out

    def dropout_(self, x, out_name):
        if not (self.train and self.dropout > 0):
            return x
        out = self.act(out_name, self.g.tensors[x].shape)
        self.g.node("dropout", {"x": x, "seed": "dropout_seed"}, {"out": out},
                    {"p": self.dropout, "stream": self.next_stream()}, inplace={"out": "x"})
        return out

    def self_attention(self, x, p, mask, causal, name):
        cfg = self.cfg
        B, T, C = self.g.tensors[x].shape
        qkv = self.linear(x, p + "attn.qkv.w", p + "attn.qkv.b", name + ".qkv")  # (B, T, 3C)
        out = self.act(name + ".attn", (B, T, C))
        lse = self.act(name + ".lse", (B, cfg.n_heads, T))
        attrs = {"n_heads": cfg.n_heads, "head_size": cfg.head_size, "q_off": 0, "k_off": C, "v_off": 2 * C,
                 "causal": causal, "scale": 1.0 / math.sqrt(cfg.head_size)}
        ins = {"q": qkv, "kv": qkv, "key_mask": mask}
        if self.train and self.attn_dropout > 0:
            attrs.update(dropout_p=self.attn_dropout, stream=self.next_stream())
            ins["seed"] = "dropout_seed"
        self.g.node("attention", ins, {"out": out, "lse": lse}, attrs)
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
        g.node("embedding", ins, {"out": x}, {"scale": float(cfg.embedding_scale),
                                              "padding_idx": -1 if cfg.padding_idx is None else cfg.padding_idx})
        if cfg.embedding_layernorm:
            x = self.layernorm(x, "emb_ln", "emb.ln")
        return self.dropout_(x, "emb.drop")

    def stack(self, B, T, logits="all"):
        """Embeddings + layers (+ final LN) (+ LM head). Returns the output tensor name."""
        cfg, g = self.cfg, self.g
        mask = g.tensor("key_mask", (B, T), "u8", "input")
        x = self.embed(B, T)
        causal = cfg.arch == "decoder"
        for i in range(cfg.n_layers):
            x = self.block(x, i, mask, causal)
        if cfg.final_layernorm:
            x = self.layernorm(x, "final_ln", "final.ln")
        if not cfg.lm_head or logits is None:
            return x
        if logits == "last":
            idx = g.tensor("last_idx", (B,), "i64", "input")
            last = self.act("last_hidden", (B, cfg.d_model))
            g.node("take_rows", {"x": x, "idx": idx}, {"out": last})
            x = last
        w = "tok_emb" if cfg.tie_word_embeddings else "lm_head.w"
        return self.linear(x, w, "lm_head.b", "logits")


def build_forward(cfg: ModelConfig, B: int, T: int, logits: str = "all") -> Graph:
    """Encoder-only or decoder-only forward. logits: 'all' (B, T, V) | 'last' (B, V) via last_idx."""
    if cfg.arch == "encoder_decoder":
        raise NotImplementedError("encoder_decoder graphs are built by build_seq2seq")
    b = _Builder(cfg)
    b.g.mark_output(b.stack(B, T, logits))
    return b.g


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


def build_train(cfg: ModelConfig, B: int, T: int, loss: str = "lm", dropout: float = 0.0,
                attn_dropout: float | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                backward: bool = True):
    """Forward + loss (+ backward) graph for one training step.

    loss='lm': token cross-entropy of logits (B, T, V) against input `targets` (B, T) i64
      (already shifted; ignore_index rows skipped), scaled by input `loss_scale` (1,) = 1 / n_valid.
      Output: `losses` (B, T), per-token losses.
    loss='vjp': no loss; the gradient of the model output comes in as input `grad_output`
      (shape of the output); output: the model output itself.
    Returns (graph, grads) with grads: parameter name -> name of its 'grad' tensor (bound outside).
    """
    from .autodiff import autodiff

    b = _Builder(cfg, train=True, dropout=dropout,
                 attn_dropout=dropout if attn_dropout is None else attn_dropout)
    g = b.g
    y = b.stack(B, T, "all")
    if loss == "lm":
        if not cfg.lm_head:
            raise ValueError("loss='lm' needs a model with a language-model head")
        V = cfg.vocab_size
        targets = g.tensor("targets", (B, T), "i64", "input")
        scale = g.tensor("loss_scale", (1,), "f32", "input")
        losses, lse = b.act("losses", (B, T)), b.act("losses.lse", (B, T))
        g.node("cross_entropy", {"logits": y, "targets": targets}, {"losses": losses, "lse": lse},
               {"label_smoothing": float(label_smoothing), "ignore_index": int(ignore_index), "vocab": V})
        g.mark_output(losses)
        seeds = {losses: scale}
    elif loss == "vjp":
        g.mark_output(y)
        seeds = {y: g.tensor("grad_output", g.tensors[y].shape, "f32", "input")}
    else:
        raise ValueError(f"unknown loss {loss!r}")
    grads = autodiff(g, seeds) if backward else {}
    return g, grads
