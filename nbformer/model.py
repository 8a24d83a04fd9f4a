"""Model: a loaded checkpoint plus cached executors, one per input shape.

All numerics go through graphs run by the executor; this file validates user input (Numba
does no bounds checks, so every id, mask and length is checked here first) and shapes it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import ops
from .config import ModelConfig
from .devices import get_device
from .errors import InputError
from .executor import Executor
from .graph.build import build_decode, build_encode_source, build_forward, build_seq2seq
from .graph.plan import plan_memory
from .weights import Checkpoint
from .quant.binding import bind_quantized, refuse_training, split_quantized
from .weights.params import count_params
from .weights.positions import position_table

# Executors kept per model (one per graph shape, each with its arena), least recently used first out:
# at most this many, and at most this many arena bytes together (the newest is always kept). An
# embedder's batches take several shapes per call (nbformer/batching.py), each arena a few MiB; a
# GPT-2 prefill arena holds its (T, vocab) logits, ~50 MiB at T=256.
_MAX_CACHED_EXECUTORS = 32
_MAX_CACHED_ARENA_BYTES = 512 << 20


def _as_id_matrix(x, name) -> np.ndarray:
    """Array-like of integers, (T,) or (B, T) -> contiguous int64 (B, T)."""
    try:
        a = np.asarray(x)
    except ValueError:
        raise InputError(f"{name}: rows have different lengths; pad them and pass attention_mask") from None
    if a.dtype == object:
        raise InputError(f"{name}: rows have different lengths; pad them and pass attention_mask")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InputError(f"{name}: expected shape (T,) or (B, T), got {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integer ids, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _read_only(a):
    if isinstance(a, np.ndarray) and a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


class Model:
    def __init__(self, ckpt: Checkpoint, device=None):
        """device: 'cpu', 'cuda', 'cuda:N' (None: $NBFORMER_DEVICE, else 'cpu'). On CUDA the
        parameters are uploaded once, as one flat device buffer, and every executor reads it."""
        self.dev = get_device(device)
        split_quantized(ckpt)  # linear weights kept quantized (nbformer.quant): ckpt.quantized, config.extra
        self.ckpt, self.config, self.device = ckpt, ckpt.config, self.dev.name
        cfg = self.config
        host = dict(ckpt.params)
        if cfg.sinusoidal:
            host["pos_emb"] = position_table(cfg)
        self.param_buffer = None
        if self.dev.kind == "cpu":
            # read-only views: what inference binds never changes under it, so a kernel may keep
            # work derived from a weight (gemm_amx.packed_weight: AMX panels packed once)
            self.bound = {k: _read_only(v) for k, v in host.items()}
        elif all(self.dev.is_device_array(a) for a in ckpt.params.values()):
            # parameters already on this device (a trainer's live flat buffer): bound as they are
            self.bound = {**ckpt.params, **({"pos_emb": self.dev.upload(host["pos_emb"])} if cfg.sinusoidal else {})}
        else:
            self.param_buffer, self.bound = self.dev.upload_flat(host, f"the parameters of {ckpt.path}")
        self.quant_buffer, qviews = bind_quantized(self.dev, ckpt.quantized, f"the quantized weights of {ckpt.path}")
        self.bound.update(qviews)
        self._executors: OrderedDict = OrderedDict()
        self._graphs: OrderedDict = OrderedDict()  # decode graphs + plans; sessions bind their own caches
        self._tokenizer = None

    # ------------------------------------------------------------ plumbing
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            embedded = self.ckpt.metadata.get("nbformer_tokenizer")
            if self.ckpt.tokenizer_file is not None:
                self._tokenizer = Tokenizer(self.ckpt.tokenizer_file)
            elif embedded:
                self._tokenizer = Tokenizer(json_text=embedded, where=f"{self.ckpt.path} (embedded tokenizer)")
            elif getattr(self.ckpt, "tokenizer_json", None) is not None:  # GGUF: rebuilt from its metadata
                self._tokenizer = Tokenizer(json_text=self.ckpt.tokenizer_json(), where=f"{self.ckpt.path} (GGUF tokenizer)")
            else:
                raise InputError(f"{self.ckpt.path}: no tokenizer.json beside the model, so text input is "
                                 f"not possible; pass token ids instead")
        return self._tokenizer

    @property
    def num_parameters(self) -> int:
        return count_params(self.config)

    def executor(self, key: tuple, build):
        ex = self._executors.get(key)
        if ex is None:
            g = build()
            states = {n: self.dev.empty(t.shape, np.float32) for n, t in g.tensors.items() if t.kind == "state"}
            ex = Executor(g, {**self.bound, **states} if states else self.bound, self.device)
            self._executors[key] = ex
            while len(self._executors) > 1 and (
                    len(self._executors) > _MAX_CACHED_EXECUTORS
                    or sum(4 * e.plan.arena_floats for e in self._executors.values()) > _MAX_CACHED_ARENA_BYTES):
                self._executors.popitem(last=False)
        else:
            self._executors.move_to_end(key)
        return ex

    def plan(self, batch: int, seq: int, src_len: int | None = None):
        """The memory plan of the forward graph at (batch, seq), without allocating the arena
        (encoder-decoders: seq is the decoder length, src_len the source length, default seq)."""
        if self.config.arch == "encoder_decoder":
            return plan_memory(build_seq2seq(self.config, batch, src_len or seq, seq))
        return plan_memory(build_forward(self.config, batch, seq))

    def decode_graph(self, key: tuple):
        """(graph, plan) for ('encode_source', N, S) or ('decode', N, Tq, Tmax, S), cached."""
        hit = self._graphs.get(key)
        if hit is None:
            if key[0] == "encode_source":
                g = build_encode_source(self.config, key[1], key[2])
            else:
                g = build_decode(self.config, *key[1:])
            hit = (g, plan_memory(g))
            self._graphs[key] = hit
            while len(self._graphs) > 8:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return hit

    def session(self, n_rows: int, max_len: int, source_ids=None, source_mask=None, cache: bool = True):
        """A decoding session over n_rows sequences of at most max_len decoder positions (see
        nbformer.kv_cache): start(ids, mask) -> logits (N, V); step(ids) -> logits; reorder(rows)."""
        from .kv_cache import CachedSession, UncachedSession

        cls = CachedSession if cache else UncachedSession
        return cls(self, n_rows, max_len, source_ids, source_mask)

    # ------------------------------------------------------------ inputs
    def prepare_inputs(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                       prefix: str = "") -> dict:
        """Validated executor inputs. prefix names the arguments in errors ('decoder_' for a decoder input)."""
        cfg = self.config
        ids = _as_id_matrix(input_ids, prefix + "input_ids")
        B, T = ids.shape
        if T == 0:
            raise InputError(f"{prefix}input_ids: empty sequence (T = 0); pass at least one token")
        if B == 0:
            raise InputError(f"{prefix}input_ids: empty batch (B = 0)")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"{prefix}input_ids: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        if T > cfg.max_positions and cfg.positions != "none":
            raise InputError(f"{prefix}input_ids: sequence length {T} exceeds the model's {cfg.max_positions} positions")
        if attention_mask is None:
            mask = np.ones((B, T), dtype=np.uint8)
        else:
            m = np.asarray(attention_mask)
            if m.ndim == 1:
                m = m[None, :]
            if m.shape != (B, T):
                raise InputError(f"{prefix}attention_mask: shape {m.shape} does not match input_ids {(B, T)}")
            if m.size and not np.isin(m, (0, 1)).all():
                raise InputError(f"{prefix}attention_mask: expected only 0 (padding) and 1 (token)")
            mask = np.ascontiguousarray(m, dtype=np.uint8)
        inputs = {"input_ids": ids, "key_mask": mask}
        if cfg.positions != "none":
            if position_ids is None:
                pos = np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)))
            else:
                pos = _as_id_matrix(position_ids, prefix + "position_ids")
                if pos.shape != (B, T):
                    raise InputError(f"{prefix}position_ids: shape {pos.shape} does not match input_ids {(B, T)}")
                if pos.min() < 0 or pos.max() >= cfg.max_positions:
                    raise InputError(f"{prefix}position_ids: values must lie in [0, {cfg.max_positions})")
            inputs["position_ids"] = pos
        if cfg.type_vocab_size:
            if token_type_ids is None:
                tt = np.zeros((B, T), dtype=np.int64)
            else:
                tt = _as_id_matrix(token_type_ids, "token_type_ids")
                if tt.shape != (B, T):
                    raise InputError(f"token_type_ids: shape {tt.shape} does not match input_ids {(B, T)}")
                if tt.min() < 0 or tt.max() >= cfg.type_vocab_size:
                    raise InputError(f"token_type_ids: values must lie in [0, {cfg.type_vocab_size})")
            inputs["token_type_ids"] = tt
        elif token_type_ids is not None:
            raise InputError("token_type_ids: this model has no token-type embeddings")
        return inputs

    # ------------------------------------------------------------ public API
    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, token_type_ids=None,
                position_ids=None, decoder_attention_mask=None) -> np.ndarray:
        """Encoder: last hidden state (B, T, C); decoder / encoder-decoder: logits (B, T, V). float32.
        Encoder-decoders take the source as input_ids/attention_mask and the (already shifted)
        target as decoder_input_ids (B, T) (decoder_attention_mask: key padding of the target)."""
        cfg = self.config
        if cfg.arch == "encoder_decoder":
            if decoder_input_ids is None:
                raise InputError("decoder_input_ids: an encoder_decoder model needs the decoder input "
                                 "(the target shifted right, starting with decoder_start_token_id)")
            src = self.prepare_source(input_ids, attention_mask)
            dec = self.prepare_inputs(decoder_input_ids, decoder_attention_mask, position_ids=position_ids,
                                      prefix="decoder_")
            B, S = src["src_ids"].shape
            T = dec["input_ids"].shape[1]
            if dec["input_ids"].shape[0] != B:
                raise InputError(f"decoder_input_ids: batch {dec['input_ids'].shape[0]} != input_ids batch {B}")
            ex = self.executor(("seq2seq", B, S, T), lambda: build_seq2seq(cfg, B, S, T, "all"))
            return ex.run({**src, **dec})[ex.graph.outputs[0]]
        if decoder_input_ids is not None:
            raise InputError(f"decoder_input_ids: only encoder_decoder models take them (this one is {cfg.arch})")
        inputs = self.prepare_inputs(input_ids, attention_mask, token_type_ids, position_ids)
        B, T = inputs["input_ids"].shape
        ex = self.executor(("forward", B, T), lambda: build_forward(cfg, B, T, "all"))
        return ex.run(inputs)[ex.graph.outputs[0]]

    __call__ = forward

    def prepare_source(self, input_ids, attention_mask=None) -> dict:
        """Encoder-decoder source -> {src_ids, src_pos, src_mask} (validated like input_ids)."""
        if self.config.arch != "encoder_decoder":
            raise InputError(f"source: this model is a {self.config.arch}; only encoder-decoders take a source")
        x = self.prepare_inputs(input_ids, attention_mask)
        out = {"src_ids": x["input_ids"], "src_mask": x["key_mask"]}
        if "position_ids" in x:
            out["src_pos"] = x["position_ids"]
        return out

    def encode(self, input_ids, attention_mask=None) -> np.ndarray:
        """Encoder-decoder: the encoder's last hidden state (B, S, C) float32."""
        src = self.prepare_source(input_ids, attention_mask)
        B, S = src["src_ids"].shape
        ex = self.executor(("encode", B, S), lambda: build_encode_source(self.config, B, S))
        # the cross-attention keys/values it also writes land in scratch states of this executor
        return ex.run(src)[ex.graph.outputs[0]]

    def seq2seq_logits(self, src: dict, dec_ids: np.ndarray, last_idx: np.ndarray) -> np.ndarray:
        """Uncached encoder-decoder logits (B, V) at last_idx of the decoder input (B, T)."""
        cfg = self.config
        B, S = src["src_ids"].shape
        T = dec_ids.shape[1]
        dec = self.prepare_inputs(dec_ids, prefix="decoder_")
        ex = self.executor(("seq2seq_last", B, S, T), lambda: build_seq2seq(cfg, B, S, T, "last"))
        return ex.run({**src, **dec, "last_idx": np.ascontiguousarray(last_idx, dtype=np.int64)})["logits"]

    def last_logits(self, inputs: dict, last_idx: np.ndarray) -> np.ndarray:
        """Logits (B, V) of one position per row (last_idx), skipping the vocab GEMM elsewhere."""
        cfg = self.config
        B, T = inputs["input_ids"].shape
        ex = self.executor(("last", B, T), lambda: build_forward(cfg, B, T, "last"))
        return ex.run({**inputs, "last_idx": np.ascontiguousarray(last_idx, dtype=np.int64)})["logits"]

    def generate(self, prompt, max_new_tokens: int | None = None, **options):
        """Decoder: text in -> text out (prompt + continuation); ids (B, T) in -> ids (B, T + new) out.
        Encoder-decoder: source text / ids in -> target text / ids out. max_new_tokens None: the
        model's generation config, else 32. Options: see nbformer.generate."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, **options)

    # ------------------------------------------------------------ gradients
    def flat_buffers(self):
        """The model's parameters moved into one flat buffer (done once; inference then reads it too)."""
        if getattr(self, "_flat", None) is None:
            from .training.state import FlatBuffers

            refuse_training(self.ckpt)  # quantized weights: inference only

            self.dev.ensure_fits(2 * FlatBuffers.plan_bytes(self.config), "the flat parameter and gradient buffers")
            self._flat = FlatBuffers(self.config, self.ckpt.params, self.dev)
            self.bound.update(self._flat.views)
            if self.param_buffer is not None:  # inference now reads the flat buffer too: one copy on the device
                self.param_buffer = self._flat.params
            self._executors.clear()
            self._runners = OrderedDict()
        return self._flat

    def _runner(self, key, B, T, **kw):
        from .training.state import StepRunner

        flat = self.flat_buffers()
        full = key + (B, T, kw.get("S"))
        r = self._runners.get(full)
        if r is None:
            r = StepRunner(flat, B, T, **kw)
            self._runners[full] = r
            while len(self._runners) > 2:
                self._runners.popitem(last=False)
        return r

    def _grads_by_checkpoint_name(self) -> dict:
        flat = self._flat
        return self.ckpt.to_checkpoint_names(flat.grad_dict())

    def _seq2seq_loss_and_grads(self, input_ids, labels, attention_mask, decoder_input_ids, label_smoothing):
        cfg = self.config
        src = self.prepare_source(input_ids, attention_mask)
        B, S = src["src_ids"].shape
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = lab[None, :]
        if lab.ndim != 2 or lab.shape[0] != B or lab.shape[1] == 0 or (lab.size and lab.dtype.kind not in "iu"):
            raise InputError(f"labels: expected integer ids of shape ({B}, T), got {lab.dtype}{lab.shape}")
        if not (0.0 <= label_smoothing < 1.0):
            raise InputError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
        lab = lab.astype(np.int64)
        if decoder_input_ids is None:  # transformers' shift_tokens_right
            if cfg.decoder_start_token_id is None or cfg.pad_token_id is None:
                raise InputError("decoder_input_ids: the model has no decoder_start_token_id / pad_token_id "
                                 "to build them from labels; pass decoder_input_ids")
            dec = np.empty_like(lab)
            dec[:, 0] = cfg.decoder_start_token_id
            dec[:, 1:] = lab[:, :-1]
            dec[dec == -100] = cfg.pad_token_id
        else:
            dec = decoder_input_ids
        d = self.prepare_inputs(dec, prefix="decoder_")
        if d["input_ids"].shape != lab.shape:
            raise InputError(f"decoder_input_ids: shape {d['input_ids'].shape} differs from labels {lab.shape}")
        T = lab.shape[1]
        r = self._runner(("s2s", label_smoothing), B, T, loss="lm", label_smoothing=label_smoothing, S=S)
        loss, _ = r.run_lm(d["input_ids"], lab, d["key_mask"], src_ids=src["src_ids"], src_mask=src["src_mask"])
        return loss, self._grads_by_checkpoint_name()

    def loss_and_grads(self, input_ids, labels, attention_mask=None, label_smoothing: float = 0.0,
                       decoder_input_ids=None):
        """Decoder: mean next-token cross-entropy, transformers semantics (labels are shifted inside;
        -100 is ignored). Encoder-decoder: input_ids is the source, labels the target (the decoder
        input is labels shifted right from decoder_start_token_id, as transformers does, unless
        decoder_input_ids is given); mean cross-entropy over labels != -100.
        Encoder: labels (B, T, C) float, mean squared error of the last hidden state.
        Returns (loss, grads) with grads keyed by the checkpoint's own tensor names (float32)."""
        cfg = self.config
        if cfg.arch == "encoder_decoder":
            return self._seq2seq_loss_and_grads(input_ids, labels, attention_mask, decoder_input_ids,
                                                label_smoothing)
        if decoder_input_ids is not None:
            raise InputError(f"decoder_input_ids: only encoder_decoder models take them (this one is {cfg.arch})")
        inputs = self.prepare_inputs(input_ids, attention_mask)
        ids, mask = inputs["input_ids"], inputs["key_mask"]
        B, T = ids.shape
        if cfg.lm_head:
            lab = np.asarray(labels)
            if lab.ndim == 1:
                lab = lab[None, :]
            if lab.shape != (B, T) or (lab.size and lab.dtype.kind not in "iu"):
                raise InputError(f"labels: expected integer ids of shape {(B, T)}, got {lab.dtype}{lab.shape}")
            if not (0.0 <= label_smoothing < 1.0):
                raise InputError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
            targets = np.full((B, T), -100, dtype=np.int64)
            targets[:, :-1] = lab[:, 1:]
            r = self._runner(("lm", label_smoothing), B, T, loss="lm", label_smoothing=label_smoothing)
            loss, _ = r.run_lm(ids, targets, mask)
            return loss, self._grads_by_checkpoint_name()
        target = np.asarray(labels, dtype=np.float32)
        if target.shape != (B, T, cfg.d_model):
            raise InputError(f"labels: an encoder's loss is the mean squared error of its hidden state, so "
                             f"labels must be float (B, T, C) = {(B, T, cfg.d_model)}, got {target.shape}")
        h = self.forward(ids, mask, token_type_ids=inputs.get("token_type_ids"))
        diff = h.astype(np.float64) - target
        loss = float(np.mean(diff * diff))
        _, grads = self.vjp(ids, (2.0 / diff.size) * diff, mask, inputs.get("token_type_ids"))
        return loss, grads

    def vjp(self, input_ids, grad_output, attention_mask=None, token_type_ids=None):
        """(output, grads of sum(output * grad_output)) for any model: the backward pass on its own."""
        inputs = self.prepare_inputs(input_ids, attention_mask, token_type_ids)
        ids = inputs["input_ids"]
        B, T = ids.shape
        r = self._runner(("vjp",), B, T, loss="vjp")
        want = r.graph.tensors["grad_output"].shape
        go = np.asarray(grad_output, dtype=np.float32)
        if go.shape != want:
            raise InputError(f"grad_output: expected shape {want}, got {go.shape}")
        out = r.run_vjp(ids, go, inputs["key_mask"], inputs.get("token_type_ids"))
        return out, self._grads_by_checkpoint_name()

    def sample(self, logits_row, temperature, top_k, top_p, u) -> int:
        """One host row of logits (V,) -> token id (after host-side logits processors)."""
        return ops.get("sample", "cpu")(logits=logits_row, temperature=temperature, top_k=top_k, top_p=top_p, u=u)

    def sample_rows(self, logits, temperature, top_k, top_p, u) -> np.ndarray:
        """logits (N, V) where the last run left them (device memory on CUDA), u (N,) host
        uniforms -> (N,) int64 host ids; on CUDA only the N ids cross the bus."""
        return ops.get("sample_rows", self.dev.kind)(logits=logits, temperature=temperature, top_k=top_k,
                                                     top_p=top_p, u=u)

    def __repr__(self):
        c: ModelConfig = self.config
        return (f"Model({c.family} {c.arch}, layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}, "
                f"params={self.num_parameters:,}, device={self.device!r})")
