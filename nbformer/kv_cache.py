"""KV caches and decoding sessions: the model side of generation.

A session decodes n_rows sequences together (batch x beams). It owns one KVCache, a single
flat float32 buffer whose layout is planned from the config before anything runs:

    cache.{i}   (N, Tmax, 2C)  self-attention keys | values of decoder layer i, row t = position t
    xcache.{i}  (N, S, 2C)     cross-attention keys | values of the source (encoder-decoders)

so its size is known up front (KVCache.plan_bytes) and no allocation happens while decoding.
start() runs the prompt through one prefill graph (Tq = T0); step() runs the Tq = 1 graph, whose
attention reads only the first L cached rows: a new token costs O(L), not O(L^2).

Uncached sessions (cache=False) recompute the whole prefix every call through the plain forward
graphs; they exist as the reference the cached path is tested against.

Positions follow transformers: decoders with left padding count only real tokens
(pos = cumsum(mask) - 1, pads get 1); encoder-decoder decoders count from 0.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .devices import get_device
from .errors import InputError
from .executor import Executor


class KVCache:
    def __init__(self, cfg, n_rows: int, max_len: int, src_len: int | None = None, device="cpu"):
        self.dev = get_device(device)
        self.layout = self.plan(cfg, n_rows, max_len, src_len)
        total = sum(int(np.prod(shape)) for _, shape in self.layout.values())
        self.dev.ensure_fits(4 * total, f"the KV cache ({n_rows} rows x {max_len} positions)")
        self.buffer = self.dev.zeros(total, np.float32)
        self.views = {name: self.dev.view(self.buffer, off, shape) for name, (off, shape) in self.layout.items()}
        self._scratch = None
        self._reorder = ops.get("kv_reorder", self.dev.kind)

    @staticmethod
    def plan(cfg, n_rows, max_len, src_len=None) -> dict:
        """name -> (offset in floats, shape) of every cache tensor. Self-attention caches hold the
        key/value heads only: 2 * NKV * HS columns (2C unless grouped-query attention / head_dim)."""
        C2 = 2 * cfg.kv_heads * cfg.head_size
        n_layers = cfg.n_decoder_layers if cfg.arch == "encoder_decoder" else cfg.n_layers
        layout, off = {}, 0
        for i in range(n_layers):
            layout[f"cache.{i}"] = (off, (n_rows, max_len, C2))
            off += n_rows * max_len * C2
        if cfg.arch == "encoder_decoder":
            for i in range(n_layers):
                layout[f"xcache.{i}"] = (off, (n_rows, src_len, C2))
                off += n_rows * src_len * C2
        return layout

    @classmethod
    def plan_bytes(cls, cfg, n_rows, max_len, src_len=None) -> int:
        return 4 * sum(int(np.prod(shape)) for _, shape in cls.plan(cfg, n_rows, max_len, src_len).values())

    @property
    def nbytes(self) -> int:
        return 4 * int(self.buffer.size)

    def reorder(self, rows, length):
        """Row b of every cache becomes old row rows[b]: the first `length` positions of the
        self-attention caches, all of the cross-attention ones (a no-op copy is skipped)."""
        if np.array_equal(rows, np.arange(len(rows))):
            return
        for name, v in self.views.items():
            if self._scratch is None or self._scratch.size < v.size:  # one scratch, as large as the largest cache
                self._scratch = self.dev.empty(max(int(w.size) for w in self.views.values()), np.float32)
            n = length if name.startswith("cache.") else v.shape[1]
            self._reorder(cache=v, scratch=self.dev.view(self._scratch, 0, v.shape), rows=rows, length=n)


def _check_rows(n_rows, max_len, cfg):
    if not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
        raise InputError(f"session: n_rows must be a positive integer, got {n_rows!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise InputError(f"session: max_len must be a positive integer, got {max_len!r}")
    if cfg.positions != "none" and max_len > cfg.max_positions:
        raise InputError(f"session: max_len {max_len} exceeds the model's {cfg.max_positions} positions")


class _Session:
    """Shared bookkeeping: ids so far (for uncached), mask over positions, next position ids."""

    def __init__(self, model, n_rows, max_len, source_ids=None, source_mask=None):
        cfg = model.config
        _check_rows(n_rows, max_len, cfg)
        self.model, self.cfg, self.n_rows, self.max_len = model, cfg, int(n_rows), int(max_len)
        self.length = 0
        self.key_mask = np.zeros((self.n_rows, self.max_len), dtype=np.uint8)
        self.next_pos = np.zeros(self.n_rows, dtype=np.int64)
        self.src = None
        if cfg.arch == "encoder_decoder":
            if source_ids is None:
                raise InputError("session: an encoder-decoder model needs source_ids")
            self.src = model.prepare_source(source_ids, source_mask)
            if self.src["src_ids"].shape[0] != self.n_rows:
                raise InputError(f"source_ids: {self.src['src_ids'].shape[0]} rows, expected n_rows = {self.n_rows}")
        elif cfg.arch != "decoder" or not cfg.lm_head:
            raise InputError(f"session: a {cfg.arch} model without a language-model head does not decode")
        elif source_ids is not None:
            raise InputError("source_ids: only encoder-decoder models take a source")

    def _check_start(self, ids, mask):
        if self.length:
            raise InputError("session: start() was already called")
        ids = self.model.prepare_inputs(ids, mask, prefix="decoder_" if self.src is not None else "")
        x, m = ids["input_ids"], ids["key_mask"]
        if x.shape[0] != self.n_rows:
            raise InputError(f"input_ids: {x.shape[0]} rows, expected n_rows = {self.n_rows}")
        if x.shape[1] > self.max_len:
            raise InputError(f"input_ids: {x.shape[1]} positions exceed the session's max_len {self.max_len}")
        if not m[:, -1].all():
            raise InputError("attention_mask: prompts must be left-padded (the last column must be real tokens)")
        return x, m

    def _start_positions(self, m):
        if self.src is not None:
            return np.ascontiguousarray(np.broadcast_to(np.arange(m.shape[1], dtype=np.int64), m.shape))
        pos = np.cumsum(m, axis=1, dtype=np.int64) - 1
        pos[m == 0] = 1
        return pos

    def _check_step(self, ids):
        if not self.length:
            raise InputError("session: call start() before step()")
        if self.length >= self.max_len:
            raise InputError(f"session: all {self.max_len} positions are used (max_len)")
        ids = np.asarray(ids)
        if ids.shape != (self.n_rows,) or ids.dtype.kind not in "iu":
            raise InputError(f"next_ids: expected {self.n_rows} integer ids, got {ids.dtype}{ids.shape}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise InputError(f"next_ids: ids must lie in [0, {self.cfg.vocab_size})")
        if self.cfg.positions != "none" and self.next_pos.max() >= self.cfg.max_positions:
            raise InputError(f"session: position {int(self.next_pos.max())} is past the model's "
                             f"{self.cfg.max_positions} positions")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_rows_arg(self, rows):
        rows = np.asarray(rows)
        if rows.shape != (self.n_rows,) or rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= self.n_rows:
            raise InputError(f"reorder: expected {self.n_rows} row indices in [0, {self.n_rows})")
        return np.ascontiguousarray(rows, dtype=np.int64)


class CachedSession(_Session):
    def __init__(self, model, n_rows, max_len, source_ids=None, source_mask=None):
        super().__init__(model, n_rows, max_len, source_ids, source_mask)
        S = None if self.src is None else self.src["src_ids"].shape[1]
        self.S = S
        self.cache = KVCache(self.cfg, self.n_rows, self.max_len, S, model.dev)
        self._executors = {}
        if self.src is not None:
            ex = self._executor(("encode_source", self.n_rows, S))
            ex.run(self.src, outputs=())  # fills the cross-attention caches; the encoder output stays put

    def _executor(self, key):
        ex = self._executors.get(key)
        if ex is None:
            graph, plan = self.model.decode_graph(key)
            ex = Executor(graph, {**self.model.bound, **self.cache.views}, self.model.dev, plan=plan)
            self._executors[key] = ex
        return ex

    def _run(self, ids, pos, on_device=False):
        N, Tq = ids.shape
        inputs = {"input_ids": ids, "key_mask": self.key_mask,
                  "cache_pos": np.array([self.length], dtype=np.int64),
                  "last_idx": np.full(N, Tq - 1, dtype=np.int64)}
        if self.cfg.positions != "none":
            inputs["position_ids"] = pos
        if self.src is not None:
            inputs["src_mask"] = self.src["src_mask"]
        ex = self._executor(("decode", N, Tq, self.max_len, self.S))
        return ex.run(inputs, on_device=on_device)["logits"]

    def start(self, ids, mask=None, on_device=False):
        """-> logits (N, V) of the last prompt position: a host array, or with on_device=True
        where the run left them (device memory on CUDA, valid until the next call)."""
        x, m = self._check_start(ids, mask)
        T0 = x.shape[1]
        pos = self._start_positions(m)
        self.key_mask[:, :T0] = m
        logits = self._run(x, pos, on_device)
        self.length = T0
        self.next_pos = pos[:, -1] + 1
        return logits

    def step(self, next_ids, on_device=False):
        ids = self._check_step(next_ids)
        self.key_mask[:, self.length] = 1
        logits = self._run(ids[:, None], np.ascontiguousarray(self.next_pos[:, None]), on_device)
        self.length += 1
        self.next_pos += 1
        return logits

    def reorder(self, rows):
        rows = self._check_rows_arg(rows)
        self.cache.reorder(rows, self.length)
        self.key_mask[:] = self.key_mask[rows]
        if self.src is not None:
            self.src = {k: np.ascontiguousarray(v[rows]) for k, v in self.src.items()}
        self.next_pos = self.next_pos[rows]


class UncachedSession(_Session):
    """Recomputes the whole prefix each call (the reference for CachedSession). Its logits always
    come back to the host (on_device is accepted for the sessions' common signature)."""

    def start(self, ids, mask=None, on_device=False):
        x, m = self._check_start(ids, mask)
        self.ids, self.mask, self.pos = x, m, self._start_positions(m)
        self.length = x.shape[1]
        return self._logits()

    def _logits(self):
        N, T = self.ids.shape
        last = np.full(N, T - 1, dtype=np.int64)
        if self.src is not None:
            return self.model.seq2seq_logits(self.src, self.ids, last)
        inputs = self.model.prepare_inputs(self.ids, self.mask, position_ids=self.pos)
        return self.model.last_logits(inputs, last)

    def step(self, next_ids, on_device=False):
        ids = self._check_step(next_ids)
        self.ids = np.concatenate([self.ids, ids[:, None]], axis=1)
        self.mask = np.concatenate([self.mask, np.ones((self.n_rows, 1), np.uint8)], axis=1)
        self.pos = np.concatenate([self.pos, self.pos[:, -1:] + 1], axis=1)
        self.length += 1
        return self._logits()

    def reorder(self, rows):
        rows = self._check_rows_arg(rows)
        self.ids, self.mask, self.pos = self.ids[rows], self.mask[rows], self.pos[rows]
        if self.src is not None:
            self.src = {k: np.ascontiguousarray(v[rows]) for k, v in self.src.items()}
