"""Graph builders: one forward graph per architecture, for concrete (B, T).

Inputs: input_ids (B, T) i64, position_ids (B, T) i64, token_type_ids (B, T) i64 when the
model has token types, key_mask (B, T) u8 (1 = real token), last_idx (B,) i64 when only the
last position's logits are wanted (generation). Outputs: hidden (B, T, C) or logits.

Encoder-decoder models (build_seq2seq): the source comes in as src_ids / src_pos / src_mask (B, S),
the decoder input as input_ids / position_ids / key_mask (B, T); every decoder layer attends to the
encoder output through cross-attention (queries T, keys S).

Incremental decoding (build_encode_source, build_decode): keys/values live in 'state' tensors bound
by a KV cache (nbformer.kv_cache) that persist across runs: self-attention cache.{i} (B, Tmax, 2C)
written at runtime position cache_pos (1,) i64, cross-attention xcache.{i} (B, S, 2C) written once
per source. A decode graph for Tq new tokens then costs O(Tq * L) attention work, not O(L^2).

Llama-style configs (norm_type 'rmsnorm', positions 'rope', ffn_type 'glu', n_kv_heads, head_dim):
RMSNorm nodes instead of LayerNorm; the fused qkv (B, T, (NH + 2*NKV)*HS) has RoPE applied in place
to its Q and K columns (angles from position_ids, so left padding counts real tokens) before
attention; query head h attends with kv head h // (NH / NKV); the FFN's first layer is one fused
gate|up GEMM with the product act(gate) * up in its epilogue ('linear_glu'). Caches then hold the
NKV heads only: cache.{i} (B, Tmax, 2*NKV*HS), keys stored after RoPE.

Quantized weights (nbformer.quant; config.extra['quantized'] = {name: qtype}): a linear layer
whose weight is listed becomes a 'qlinear' node (a gated FFN input 'qlinear_glu') reading the
packed ggml blocks from a uint8 param '<name>.q' (M, row_bytes); the float32 param is then not in
the graph (except tok_emb, whose float table still serves the embedding lookup of a tied head).

Training graphs (build_train) add: linear layers that also keep their pre-activation for the
backward pass, dropout (embeddings, attention probabilities, residual branches) driven by a
per-step seed input, a loss, and the backward graph from graph.autodiff.
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from ..quant import q_param_name, quantized_names, row_bytes
from ..weights.params import param_shapes
from ..errors import GraphError
from .ir import Graph


class _Builder:
    def __init__(self, cfg: ModelConfig, train: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0):
        self.cfg, self.g = cfg, Graph()
        self.train, self.dropout, self.attn_dropout = train, float(dropout), float(attn_dropout)
        self.streams = 0  # each dropout site draws from its own counter stream
        # weights kept quantized (nbformer.quant): read as uint8 '<name>.q' tensors by qlinear nodes
        self.quant = quantized_names(cfg)
        if self.quant and train:
            raise GraphError("this model holds quantized weights (" + ", ".join(sorted(set(self.quant.values())))
                             + "), which cannot be trained; load a float checkpoint (or dequantize) to train")
        self.shapes = shapes = param_shapes(cfg)
        for name, shape in shapes.items():
            if name not in self.quant or name == "tok_emb":  # tok_emb: the float table serves the lookup
                self.g.tensor(name, shape, kind="param")
        for name, qtype in self.quant.items():
            if name not in shapes:
                raise GraphError(f"quantized weight '{name}' is not a parameter of this model")
            M, K = shapes[name]
            self.g.tensor(q_param_name(name), (M, row_bytes(qtype, K)), "u8", "param")
        if cfg.sinusoidal:
            self.g.tensor("pos_emb", (cfg.max_positions, cfg.d_model), kind="const")
        self.cache_pos = None  # name of the (1,) i64 input of a decode graph
        self.pos_ids = None  # positions = 'rope': the (B, T) position input the rotations read
        self.inv_freq = None
        if cfg.positions == "rope":
            from ..weights.positions import rope_inv_freq_of

            self.inv_freq = rope_inv_freq_of(cfg)  # (HS/2,) float64, an attr of every rope node
        if train and (self.dropout > 0 or self.attn_dropout > 0):
            self.g.tensor("dropout_seed", (1,), "i64", "input", host=True)

    def act(self, name, shape):
        return self.g.tensor(name, shape)

    def next_stream(self) -> int:
        self.streams += 1
        return self.streams

    def layernorm(self, x, prefix, out_name):
        """The config's norm layer: LayerNorm (saves mean, rstd) or RMSNorm (saves rstd)."""
        g, shape = self.g, self.g.tensors[x].shape
        out = self.act(out_name, shape)
        if self.cfg.norm_type == "rmsnorm":
            rstd = self.act(out_name + ".rstd", shape[:-1])
            g.node("rmsnorm", {"x": x, "w": prefix + ".w"}, {"out": out, "rstd": rstd},
                   {"eps": float(self.cfg.layer_norm_eps)})
            return out
        mean, rstd = self.act(out_name + ".mean", shape[:-1]), self.act(out_name + ".rstd", shape[:-1])
        g.node("layernorm", {"x": x, "w": prefix + ".w", "b": prefix + ".b"},
               {"out": out, "mean": mean, "rstd": rstd}, {"eps": float(self.cfg.layer_norm_eps)})
        return out

    def linear(self, x, w, b, out_name, act="none", residual=None):
        """out = act(x @ w.T + b) [+ residual]; with dropout in training the residual add is split
        off: out = residual + dropout(x @ w.T + b)."""
        g = self.g
        if w in self.quant:
            return self.qlinear("qlinear", x, w, b, out_name, act, residual)
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

    def linear_glu(self, x, w, b, out_name, act):
        """out (..., F) = act(x @ Wg.T + bg) * (x @ Wu.T + bu), w = Wg|Wu (2F, C) fused; training
        keeps pre = gate | up (..., 2F) for the backward pass."""
        g = self.g
        if w in self.quant:
            return self.qlinear("qlinear_glu", x, w, b, out_name, act)
        lead = g.tensors[x].shape[:-1]
        M = g.tensors[w].shape[0]
        out = self.act(out_name, lead + (M // 2,))
        ins = {"x": x, "w": w}
        if b is not None and b in g.tensors:
            ins["b"] = b
        outs = {"out": out}
        if self.train:
            outs["pre"] = self.act(out_name + ".pre", lead + (M,))
        g.node("linear_glu", ins, outs, {"act": act})
        return out

    def qlinear(self, op, x, w, b, out_name, act, residual=None):
        """A linear layer (op 'qlinear') or gated FFN input (op 'qlinear_glu') whose weight w is
        kept quantized: the node reads its packed blocks '<w>.q' (M, row_bytes) uint8."""
        g = self.g
        M = self.shapes[w][0]
        shape = g.tensors[x].shape[:-1] + ((M // 2,) if op == "qlinear_glu" else (M,))
        out = self.act(out_name, shape)
        ins = {"x": x, "w": q_param_name(w)}
        if b is not None and b in g.tensors:
            ins["b"] = b
        if residual is not None:
            ins["residual"] = residual
        g.node(op, ins, {"out": out}, {"act": act, "qtype": self.quant[w]})
        return out

    def ffn(self, h, p, n, residual):
        """FFN of one layer with its residual: down(act(up(h))) or down(act(gate(h)) * up(h))."""
        cfg = self.cfg
        if cfg.ffn_type == "glu":
            u = self.linear_glu(h, p + "ffn.gate_up.w", p + "ffn.gate_up.b", n + ".ffn", cfg.activation)
        else:
            u = self.linear(h, p + "ffn.up.w", p + "ffn.up.b", n + ".ffn", act=cfg.activation)
        return self.linear(u, p + "ffn.down.w", p + "ffn.down.b", n + ".res2", residual=residual)

    def dropout_(self, x, out_name):
        if not (self.train and self.dropout > 0):
            return x
        out = self.act(out_name, self.g.tensors[x].shape)
        self.g.node("dropout", {"x": x, "seed": "dropout_seed"}, {"out": out},
                    {"p": self.dropout, "stream": self.next_stream()}, inplace={"out": "x"})
        return out

    def attention(self, q, kv, mask, causal, name, q_off, k_off, v_off, cache_pos=None):
        cfg = self.cfg
        B, Tq = self.g.tensors[q].shape[:2]
        out = self.act(name + ".attn", (B, Tq, cfg.attn_width))
        lse = self.act(name + ".lse", (B, cfg.n_heads, Tq))
        attrs = {"n_heads": cfg.n_heads, "head_size": cfg.head_size, "q_off": q_off, "k_off": k_off,
                 "v_off": v_off, "causal": causal, "scale": 1.0 / math.sqrt(cfg.head_size)}
        if cfg.kv_heads != cfg.n_heads:  # grouped-query attention (absent otherwise: graphs stay as they were)
            attrs["n_kv_heads"] = cfg.kv_heads
        ins = {"q": q, "kv": kv, "key_mask": mask}
        if cache_pos is not None:  # keys are the cache's first cache_pos + Tq rows
            ins["cache_pos"] = cache_pos
        if self.train and self.attn_dropout > 0:
            attrs.update(dropout_p=self.attn_dropout, stream=self.next_stream())
            ins["seed"] = "dropout_seed"
        self.g.node("attention", ins, {"out": out, "lse": lse}, attrs)
        return out

    def self_attention(self, x, p, mask, causal, name, cache=None):
        cfg = self.cfg
        A, KVW = cfg.attn_width, cfg.kv_heads * cfg.head_size  # Q columns [0, A), K [A, A + KVW), V after
        qkv = self.linear(x, p + "attn.qkv.w", p + "attn.qkv.b", name + ".qkv")  # (B, T, A + 2 KVW)
        if cfg.positions == "rope":  # rotate Q and K in place (the planner aliases the two tensors)
            rot = self.act(name + ".qkv.rope", self.g.tensors[qkv].shape)
            self.g.node("rope", {"x": qkv, "pos_ids": self.pos_ids}, {"out": rot},
                        {"inv_freq": self.inv_freq, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                         "head_size": cfg.head_size}, inplace={"out": "x"})
            qkv = rot
        if cache is None:
            return self.attention(qkv, qkv, mask, causal, name, 0, A, A + KVW)
        # decode: K, V of the new tokens go into the cache at cache_pos, then attend over the cache
        self.g.node("kv_write", {"qkv": qkv, "pos": self.cache_pos}, {"cache": cache}, {"offset": A})
        return self.attention(qkv, cache, mask, causal, name, 0, 0, KVW, cache_pos=self.cache_pos)

    def cross_attention(self, x, p, name, enc_kv, src_mask):
        C = self.cfg.d_model
        q = self.linear(x, p + "xattn.q.w", p + "xattn.q.b", name + ".xq")  # (B, T, C)
        return self.attention(q, enc_kv, src_mask, False, name + ".x", 0, 0, C)

    def cross_kv(self, enc, p, name):
        return self.linear(enc, p + "xattn.kv.w", p + "xattn.kv.b", name + ".xkv")  # (B, S, 2C)

    def block(self, x, i, mask, causal, side="", cross=None, cache=None):
        """One transformer layer; pre-LN: x + f(LN(x)); post-LN: LN(x + f(x)).
        cross: (encoder keys/values (B, S, 2C), source mask) for a decoder layer of an encoder-decoder."""
        cfg, p, n = self.cfg, f"{side}h{i}.", f"{side}h{i}"
        if cfg.norm == "pre":
            h = self.layernorm(x, p + "ln1", n + ".ln1")
            a = self.self_attention(h, p, mask, causal, n, cache)
            x = self.linear(a, p + "attn.out.w", p + "attn.out.b", n + ".res1", residual=x)
            if cross is not None:
                h = self.layernorm(x, p + "lnx", n + ".lnx")
                a = self.cross_attention(h, p, n, *cross)
                x = self.linear(a, p + "xattn.out.w", p + "xattn.out.b", n + ".resx", residual=x)
            h = self.layernorm(x, p + "ln2", n + ".ln2")
            return self.ffn(h, p, n, residual=x)
        a = self.self_attention(x, p, mask, causal, n, cache)
        s = self.linear(a, p + "attn.out.w", p + "attn.out.b", n + ".res1", residual=x)
        x = self.layernorm(s, p + "ln1", n + ".ln1")
        if cross is not None:
            a = self.cross_attention(x, p, n, *cross)
            s = self.linear(a, p + "xattn.out.w", p + "xattn.out.b", n + ".resx", residual=x)
            x = self.layernorm(s, p + "lnx", n + ".lnx")
        s = self.ffn(x, p, n, residual=x)
        return self.layernorm(s, p + "ln2", n + ".ln2")

    def embed(self, B, T, side="", ids="input_ids", pos="position_ids"):
        cfg, g = self.cfg, self.g
        ins = {"ids": g.tensor(ids, (B, T), "i64", "input"), "wte": "tok_emb"}
        if cfg.positions == "rope":  # positions enter inside attention, not as an embedding
            self.pos_ids = g.tensor(pos, (B, T), "i64", "input")
        elif cfg.positions != "none":
            ins["pos_ids"] = g.tensor(pos, (B, T), "i64", "input")
            ins["wpe"] = "pos_emb" if cfg.sinusoidal else side + "pos_emb"
        if cfg.type_vocab_size and side == "" and cfg.arch != "encoder_decoder":
            ins["type_ids"] = g.tensor("token_type_ids", (B, T), "i64", "input")
            ins["wtt"] = "type_emb"
        x = self.act(side + "emb", (B, T, cfg.d_model))
        g.node("embedding", ins, {"out": x}, {"scale": float(cfg.embedding_scale),
                                              "padding_idx": -1 if cfg.padding_idx is None else cfg.padding_idx})
        if cfg.embedding_layernorm:
            x = self.layernorm(x, side + "emb_ln", side + "emb.ln")
        return self.dropout_(x, side + "emb.drop")

    def head(self, x, logits):
        """(Final hidden) -> logits (B, T, V), or (B, V) at last_idx when logits == 'last'."""
        cfg, g = self.cfg, self.g
        if logits == "last":
            B = g.tensors[x].shape[0]
            idx = g.tensor("last_idx", (B,), "i64", "input")
            last = self.act("last_hidden", (B, cfg.d_model))
            g.node("take_rows", {"x": x, "idx": idx}, {"out": last})
            x = last
        w = "tok_emb" if cfg.tie_word_embeddings else "lm_head.w"
        return self.linear(x, w, "lm_head.b", "logits")

    def encoder(self, B, S, ids="input_ids", pos="position_ids", mask="key_mask"):
        """Embeddings + encoder layers (+ final LN) -> hidden (B, S, C)."""
        cfg = self.cfg
        mask = self.g.tensor(mask, (B, S), "u8", "input")
        x = self.embed(B, S, "", ids, pos)
        for i in range(cfg.n_layers):
            x = self.block(x, i, mask, cfg.arch == "decoder")
        if cfg.final_layernorm:
            x = self.layernorm(x, "final_ln", "final.ln")
        return x

    def stack(self, B, T, logits="all"):
        """Embeddings + layers (+ final LN) (+ LM head). Returns the output tensor name."""
        x = self.encoder(B, T)
        if not self.cfg.lm_head or logits is None:
            return x
        return self.head(x, logits)

    def decoder(self, B, T, src_mask, enc_kv, cache=False, logits="all"):
        """Decoder of an encoder-decoder: enc_kv(i) -> keys/values (B, S, 2C) of layer i."""
        cfg = self.cfg
        mask = self.g.tensor("key_mask", (B, cache or T), "u8", "input")  # cache: (B, Tmax)
        x = self.embed(B, T, "dec.")
        for i in range(cfg.n_decoder_layers):
            kv_cache = self.g.tensor(f"cache.{i}", (B, cache, 2 * cfg.d_model), kind="state") if cache else None
            x = self.block(x, i, mask, True, "dec.", cross=(enc_kv(i), src_mask), cache=kv_cache)
        if cfg.final_layernorm:
            x = self.layernorm(x, "dec.final_ln", "dec.final.ln")
        return self.head(x, logits)

    def seq2seq(self, B, S, T, logits="all"):
        enc = self.encoder(B, S, "src_ids", "src_pos", "src_mask")
        return self.decoder(B, T, "src_mask", lambda i: self.cross_kv(enc, f"dec.h{i}.", f"dec.h{i}"),
                            logits=logits)


def build_forward(cfg: ModelConfig, B: int, T: int, logits: str = "all") -> Graph:
    """Encoder-only or decoder-only forward. logits: 'all' (B, T, V) | 'last' (B, V) via last_idx."""
    if cfg.arch == "encoder_decoder":
        raise GraphError("build_forward: encoder_decoder graphs are built by build_seq2seq")
    b = _Builder(cfg)
    b.g.mark_output(b.stack(B, T, logits))
    return b.g


def build_seq2seq(cfg: ModelConfig, B: int, S: int, T: int, logits: str = "all") -> Graph:
    """Encoder-decoder forward without a cache: source (B, S), decoder input (B, T) -> logits."""
    b = _Builder(cfg)
    b.g.mark_output(b.seq2seq(B, S, T, logits))
    return b.g


def build_encode_source(cfg: ModelConfig, B: int, S: int) -> Graph:
    """Encoder of an encoder-decoder: hidden (B, S, C) as output, and every decoder layer's
    cross-attention keys/values written into state xcache.{i} (B, S, 2C) for decoding."""
    b = _Builder(cfg)
    enc = b.encoder(B, S, "src_ids", "src_pos", "src_mask")
    for i in range(cfg.n_decoder_layers):
        p = f"dec.h{i}."
        b.g.tensor(f"xcache.{i}", (B, S, 2 * cfg.d_model), kind="state")
        b.g.node("linear", {"x": enc, "w": p + "xattn.kv.w", **({"b": p + "xattn.kv.b"} if cfg.qkv_bias else {})},
                 {"out": f"xcache.{i}"}, {"act": "none"})
    b.g.mark_output(enc)
    return b.g


def build_decode(cfg: ModelConfig, B: int, Tq: int, Tmax: int, S: int | None = None) -> Graph:
    """One incremental decoding call over a KV cache: Tq new tokens per row (Tq > 1: a prompt
    prefill), appended at runtime position cache_pos. Inputs: input_ids / position_ids (B, Tq),
    key_mask (B, Tmax) (1 = a cached position this row may attend to), cache_pos (1,) i64, and for
    encoder-decoders src_mask (B, S). States: cache.{i} (B, Tmax, 2C) [+ xcache.{i} (B, S, 2C)]
    (2*NKV*HS columns instead of 2C with grouped-query attention / head_dim).
    Output: logits (B, V) at input last_idx (B,) (the last new token: Tq - 1)."""
    b = _Builder(cfg)
    g = b.g
    b.cache_pos = g.tensor("cache_pos", (1,), "i64", "input", host=True)
    if cfg.arch == "encoder_decoder":
        if S is None:
            raise GraphError("build_decode: an encoder_decoder needs the source length S")
        g.tensor("src_mask", (B, S), "u8", "input")
        for i in range(cfg.n_decoder_layers):
            g.tensor(f"xcache.{i}", (B, S, 2 * cfg.d_model), kind="state")
        out = b.decoder(B, Tq, "src_mask", lambda i: f"xcache.{i}", cache=Tmax, logits="last")
    elif cfg.arch == "decoder":
        mask = g.tensor("key_mask", (B, Tmax), "u8", "input")
        x = b.embed(B, Tq)
        for i in range(cfg.n_layers):
            cache = g.tensor(f"cache.{i}", (B, Tmax, 2 * cfg.kv_heads * cfg.head_size), kind="state")
            x = b.block(x, i, mask, True, cache=cache)
        if cfg.final_layernorm:
            x = b.layernorm(x, "final_ln", "final.ln")
        out = b.head(x, "last")
    else:
        raise GraphError("build_decode: encoder models do not decode")
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


def build_train(cfg: ModelConfig, B: int, T: int, loss: str = "lm", dropout: float = 0.0,
                attn_dropout: float | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                backward: bool = True, S: int | None = None):
    """Forward + loss (+ backward) graph for one training step.

    Encoder-decoders also take the source (src_ids / src_pos / src_mask, (B, S)); T is then the
    decoder length and targets are the labels themselves (the decoder input is already shifted).

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
    if cfg.arch == "encoder_decoder":
        if S is None:
            raise GraphError("build_train: an encoder_decoder needs the source length S")
        y = b.seq2seq(B, S, T, "all")
    else:
        y = b.stack(B, T, "all")
    if loss == "lm":
        if not cfg.lm_head:
            raise ValueError("loss='lm' needs a model with a language-model head")
        V = cfg.vocab_size
        targets = g.tensor("targets", (B, T), "i64", "input")
        scale = g.tensor("loss_scale", (1,), "f32", "input", host=True)
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
    if backward and loss == "lm":
        fuse_cross_entropy(g)
    return g, grads


def fuse_cross_entropy(g):
    """The loss's forward and its backward as one node (the forward node gains the backward's dloss
    input and dlogits output): one pass over the N x V logits, the largest activation of a language
    model's step, instead of three (cross_entropy_fused; the same bits). Only where the logits have
    no other reader: the fused node may overwrite them with their gradient (in place, as the
    backward did)."""
    fwd = [n for n in g.nodes if n.op == "cross_entropy" and n.direction == "forward"]
    bwd = [n for n in g.nodes if n.op == "cross_entropy" and n.direction == "backward"]
    if len(fwd) != 1 or len(bwd) != 1:
        return
    f, b = fwd[0], bwd[0]
    logits = f.inputs["logits"]
    readers = [n for n in g.nodes if logits in n.inputs.values()]
    if b.inputs["logits"] != logits or len(readers) != 2 or logits in g.outputs:
        return
    f.inputs["dloss"] = b.inputs["dloss"]
    f.outputs["dlogits"] = b.outputs["dlogits"]
    f.inplace = {**f.inplace, **b.inplace}
    g.nodes.remove(b)
