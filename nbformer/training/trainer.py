"""The training loop: Adam/AdamW, warmup schedules, global-norm clipping, held-out eval,
atomic checkpoints, bit-identical resume, and a clean stop on Ctrl-C.

Determinism: every kernel is deterministic, batches and dropout masks are pure functions of
(seed, step), so a run resumed from step s continues exactly as if it had never stopped.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import ops
from ..config import ModelConfig
from ..devices import get_device
from ..errors import InputError, NbformerError
from .checkpoint import CheckpointError, load_training, save_training
from .data import TokenData
from .state import FlatBuffers, StepRunner

SCHEDULES = ("cosine", "noam", "constant")
OPTIMIZERS = ("adam", "adamw")


class TrainingDiverged(NbformerError):
    pass


@dataclass
class TrainOptions:
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 1000
    lr: float = 1e-3  # peak learning rate (cosine/constant) or the scale factor of the noam schedule
    schedule: str = "cosine"
    warmup: int = 100
    min_lr: float = 0.0
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dropout: float = 0.0
    attn_dropout: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 16
    eval_pairs: int = 256  # encoder-decoders: held-out pairs for eval loss and exact match
    save_every: int = 200
    log_every: int = 10
    sync_every: int = 0  # read loss / grad norm back every N steps; 0: every step on the CPU, log_every on CUDA
    extra: dict = field(default_factory=dict)

    def validate(self, cfg: ModelConfig):
        def bad(name, expected):
            raise InputError(f"--{name.replace('_', '-')}: got {getattr(self, name)!r}, expected {expected}")

        for name in ("batch_size", "seq_len", "steps", "eval_every", "save_every", "log_every", "eval_windows",
                     "eval_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, "a positive integer")
        if self.seq_len > cfg.max_positions:
            raise InputError(f"--seq-len {self.seq_len} is larger than the model's {cfg.max_positions} positions")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "a positive number")
        if self.schedule not in SCHEDULES:
            bad("schedule", " | ".join(SCHEDULES))
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", " | ".join(OPTIMIZERS))
        if self.warmup < 0 or (self.schedule == "noam" and self.warmup < 1):
            bad("warmup", "a non-negative integer (>= 1 for noam)")
        for name in ("dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            bad("attn_dropout", "a number in [0, 1)")
        if not isinstance(self.sync_every, int) or self.sync_every < 0:
            bad("sync_every", "a non-negative integer (0: every step on the CPU, every --log-every steps on CUDA)")
        if self.clip < 0 or self.weight_decay < 0:
            bad("clip" if self.clip < 0 else "weight_decay", "a number >= 0")

    def lr_at(self, step: int, d_model: int) -> float:
        from ..kernels.cpu.optim import cosine_lr, noam_lr

        if self.schedule == "noam":
            return noam_lr(step, d_model, self.warmup, self.lr)
        if self.schedule == "cosine":
            return cosine_lr(step, self.lr, self.warmup, self.steps, self.min_lr)
        return self.lr * min(1.0, step / self.warmup) if self.warmup else self.lr


class Progress:
    """One-line progress bar on stderr: step, loss, eval loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.last_len = 0

    def update(self, step, loss, eval_loss, tok_s, eta_s, exact=None):
        if not self.enabled:
            return
        width = 24
        done = int(width * step / self.total)
        ev = f" | eval {eval_loss:.3f}" if eval_loss is not None else ""
        ev += f" | exact {100 * exact:.1f}%" if exact is not None else ""
        eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
        line = (f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} | loss {loss:.3f}{ev} | "
                f"{tok_s:,.0f} tok/s | ETA {eta}")
        sys.stderr.write(line + " " * max(0, self.last_len - len(line)))
        sys.stderr.flush()
        self.last_len = len(line)

    def close(self):
        if self.enabled and self.last_len:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Trainer:
    """Trains a decoder language model on a TokenData stream, or an encoder-decoder on PairData
    (sentence pairs; eval adds greedy-decoding exact match on held-out pairs).

    params: canonical name -> array to start from (a fresh init or a loaded checkpoint).
    """

    def __init__(self, cfg: ModelConfig, params: dict, data, opts: TrainOptions, out_dir,
                 tokenizer_json: str, device: str = "cpu", progress: bool = True, log=print):
        self.seq2seq = bool(getattr(data, "seq2seq", False))
        if self.seq2seq:
            if cfg.arch != "encoder_decoder":
                raise InputError(f"train: sentence pairs train an encoder-decoder model, this one is a {cfg.arch}")
            opts.seq_len = data.T  # the padded decoder length; the source has data.S columns
        elif cfg.arch != "decoder" or not cfg.lm_head:
            raise InputError(f"train: an {cfg.arch.replace('_', '-')} model is not trained on plain text here "
                             f"(only decoder language models are; encoder-decoders train on source<TAB>target pairs)")
        opts.validate(cfg)
        if self.seq2seq and data.S > cfg.max_positions:
            raise InputError(f"{data.where}: sources of {data.S} tokens exceed the model's {cfg.max_positions} "
                             f"positions")
        data.check(opts.batch_size, opts.seq_len)
        self.dev = get_device(device)
        self.cfg, self.data, self.opts, self.device = cfg, data, opts, self.dev.name
        self.out_dir = Path(out_dir)
        self.tokenizer_json = tokenizer_json
        B, T = opts.batch_size, opts.seq_len
        S = data.S if self.seq2seq else None
        if self.dev.kind != "cpu":  # the whole plan must fit before anything is allocated
            self.dev.ensure_fits(training_plan_bytes(cfg, B, T, S, opts), f"the training plan at batch {B} x {T}")
        self.flat = FlatBuffers(cfg, params, self.dev)
        self.m = self.dev.zeros(self.flat.n, np.float32)  # Adam moments: flat buffers like the parameters
        self.v = self.dev.zeros(self.flat.n, np.float32)
        self.step = 0
        self.progress = progress
        self.log = log
        self.runner = StepRunner(self.flat, B, T, loss="lm", dropout=opts.dropout, attn_dropout=opts.attn_dropout,
                                 label_smoothing=opts.label_smoothing, S=S)
        if self.seq2seq:
            self.eval_set = data.eval_batch(opts.eval_pairs)
        else:
            self.eval_set = data.eval_windows(T, opts.eval_windows)
        self.eval_runner = None
        if self.eval_set is not None:
            self.eval_runner = StepRunner(self.flat, self.eval_set[0].shape[0], T, loss="lm", backward=False, S=S)
        self._eval_model = None
        self._adam = ops.get("adam", self.dev.kind)
        self._clip_grad = ops.get("clip_grad", self.dev.kind)
        # per-step (mean loss, grad norm) stay on the device in these slots until a sync reads them all
        # at once: a CUDA step then makes no host round trip (the CPU reads every step: it costs nothing)
        self.sync_every = opts.sync_every or (1 if self.dev.kind == "cpu" else opts.log_every)
        self._stats = self.dev.zeros((self.sync_every, 2), np.float64)
        self._pending = []  # records of launched steps whose loss / grad norm are still in _stats
        self.syncs = 0  # how many times the scalars were read back (observed by the tests)
        self._stop = False
        self.history = []

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        return {"step": self.step, "seed": self.opts.seed, "data_fingerprint": self.data.fingerprint,
                "options": {k: v for k, v in asdict(self.opts).items() if k != "extra"}}

    def save(self):
        save_training(self.out_dir, self.cfg, self.flat.state_dict(), self.dev.to_host(self.m),
                      self.dev.to_host(self.v), self.tokenizer_json, self.state())
        (self.out_dir / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")

    def _params_changed(self):
        """The parameters were written in place: the evaluation model's read-only views of them
        (model()) may have kept AMX packs of the old values (gemm_amx.packed_weight), dropped here."""
        if self._eval_model is not None and self.dev.kind == "cpu":
            from ..kernels.cpu import gemm_amx

            gemm_amx.forget(self.flat.params)

    def resume(self, path):
        cfg, params, m, v, _, state = load_training(path)
        if cfg != self.cfg:
            raise InputError(f"{path}: the checkpoint's model config does not match this run's model")
        if state.get("data_fingerprint") != self.data.fingerprint:
            raise InputError(f"{path}: the checkpoint was trained on different data (fingerprint "
                             f"{state.get('data_fingerprint')} != {self.data.fingerprint})")
        if m.shape != self.m.shape or v.shape != self.v.shape:
            raise InputError(f"{path}: optimizer state has {m.shape[0]} entries, expected {self.m.shape[0]}")
        saved = state.get("options", {})
        for key in ("batch_size", "seq_len", "seed", "dropout", "label_smoothing"):
            if key in saved and saved[key] != getattr(self.opts, key):
                raise InputError(f"{path}: --{key.replace('_', '-')} was {saved[key]!r} in the checkpoint, "
                                 f"{getattr(self.opts, key)!r} now; resume needs the same value")
        self.flat.load(params)
        self._params_changed()
        self.dev.copy_in(self.m, np.ascontiguousarray(m, dtype=np.float32))
        self.dev.copy_in(self.v, np.ascontiguousarray(v, dtype=np.float32))
        self.step = int(state["step"])
        self._trim_log()

    def _trim_log(self):
        """Drop log lines past the resumed step so the log reads like an uninterrupted run's."""
        p = self.out_dir / "train_log.jsonl"
        if not p.exists():
            return
        keep = [ln for ln in p.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        p.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    # ------------------------------------------------------------ steps
    def evaluate(self) -> float | None:
        if self.eval_runner is None:
            return None
        if self.seq2seq:
            s_ids, s_mask, d_in, labels = self.eval_set
            loss, _ = self.eval_runner.run_lm(d_in, labels, src_ids=s_ids, src_mask=s_mask)
            return loss
        x, y = self.eval_set
        loss, _ = self.eval_runner.run_lm(x, y)
        return loss

    def model(self):
        """The model being trained, as an nbformer.Model over the live parameters (no copy)."""
        if self._eval_model is None:
            from ..model import Model
            from ..tokenizer import Tokenizer
            from ..weights import Checkpoint

            ckpt = Checkpoint(config=self.cfg, params=dict(self.flat.views), rules=[],
                              path=self.out_dir / "model.safetensors")
            self._eval_model = Model(ckpt, device=self.dev)
            self._eval_model._tokenizer = Tokenizer(json_text=self.tokenizer_json, where="training tokenizer")
        return self._eval_model

    def exact_match(self) -> float | None:
        """Encoder-decoders: the fraction of held-out pairs whose greedy decoding equals the target
        token for token (EOS included)."""
        if not self.seq2seq or self.eval_set is None:
            return None
        from ..generate import generate

        s_ids, s_mask, _, labels = self.eval_set
        out = generate(self.model(), s_ids, max_new_tokens=labels.shape[1], attention_mask=s_mask,
                       num_beams=1, eos_token_id=self.data.eos, pad_token_id=self.data.pad)
        hits = 0
        for got, want in zip(out, labels):
            want = want[want != -100]
            hits += len(got) >= len(want) and np.array_equal(got[:len(want)], want)
        return hits / len(labels)

    def train_step(self) -> dict:
        """One step, its loss and gradient norm read back now: {'step', 'loss', 'lr', 'grad_norm', 'tokens'}."""
        self._launch_step()
        return self.sync()[-1]

    def _launch_step(self) -> dict:
        """Queue one step (forward, loss, backward, clip, Adam) on the device; its loss and gradient norm
        land in the next free slot of _stats and are read by sync(). The caller syncs when the slots are
        full (fit does; train_step syncs every step)."""
        o = self.opts
        if len(self._pending) == self.sync_every:
            raise RuntimeError("Trainer: sync() the pending steps before launching more")  # a bug, not input
        step = self.step + 1
        slot = len(self._pending)
        if self.seq2seq:
            s_ids, s_mask, x, y = self.data.batch(o.seed, step, o.batch_size)
            n = self.runner.run_lm_into(self._stats, slot, x, y, seed=o.seed * 1_000_003 + step, src_ids=s_ids,
                                        src_mask=s_mask)
        else:
            x, y = self.data.batch(o.seed, step, o.batch_size, o.seq_len)
            n = self.runner.run_lm_into(self._stats, slot, x, y, seed=o.seed * 1_000_003 + step)
        self._clip_grad(grads=self.flat.grads, max_norm=float(o.clip), stats=self._stats, slot=slot)
        lr = o.lr_at(step, self.cfg.d_model)
        self._adam(params=self.flat.params, grads=self.flat.grads, m=self.m, v=self.v, lr=lr, beta1=o.beta1,
                   beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay, step=step,
                   decoupled=o.optimizer == "adamw")
        self._params_changed()
        self.step = step
        rec = {"step": step, "loss": None, "lr": lr, "grad_norm": None, "tokens": n}
        self._pending.append(rec)
        return rec

    def sync(self) -> list:
        """Read the pending steps' (loss, grad norm) back in one copy and return their records.
        A non-finite value stops training naming the first step it appeared at; the parameters are
        then past saving, so no checkpoint is written after it (the last one is kept)."""
        recs, self._pending = self._pending, []
        if not recs:
            return []
        vals = np.asarray(self.dev.to_host(self._stats))[:len(recs)]
        self.syncs += 1
        for rec, (loss, gnorm) in zip(recs, vals):
            rec["loss"], rec["grad_norm"] = float(loss), float(gnorm)
            for what, v in (("loss", rec["loss"]), ("gradient norm", rec["grad_norm"])):
                if not math.isfinite(v):
                    raise TrainingDiverged(f"step {rec['step']}: {what} is {v}; stopping (the last checkpoint in "
                                           f"{self.out_dir} is kept)")
        return recs

    def _on_sigint(self, signum, frame):
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True

    def fit(self) -> dict:
        """Run until opts.steps. Returns a summary (final losses, tokens/s, whether it was interrupted)."""
        o = self.opts
        log_path = self.out_dir / "train_log.jsonl"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            open(log_path, "a", encoding="utf-8").close()
        except OSError as e:
            raise CheckpointError(f"{self.out_dir}: cannot write checkpoints or logs there ({e.strerror})") from None
        bar = Progress(o.steps, self.progress)
        old = None
        try:
            old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            pass
        t0, tokens0, step0 = time.perf_counter(), 0, self.step
        last_eval, last_exact, rec = None, None, None
        try:
            with open(log_path, "a", encoding="utf-8") as logf:
                while self.step < o.steps and not self._stop:
                    launched = self._launch_step()
                    step = launched["step"]
                    evals = step % o.eval_every == 0 or step == o.steps
                    saves = step % o.save_every == 0 or step == o.steps
                    if not (len(self._pending) == self.sync_every or evals or saves or self._stop):
                        continue
                    recs = self.sync()
                    tokens0 += sum(r["tokens"] for r in recs)
                    dt = time.perf_counter() - t0
                    tok_s = tokens0 / dt if dt > 0 else 0.0
                    rec = recs[-1]
                    if evals:
                        last_eval = self.evaluate()
                        rec["eval_loss"] = last_eval
                        if self.seq2seq:
                            last_exact = self.exact_match()
                            rec["exact_match"] = last_exact
                    for r in recs:
                        r["tokens_per_s"] = round(tok_s, 1)
                        if r["step"] % o.log_every == 0 or "eval_loss" in r or r["step"] == o.steps:
                            logf.write(json.dumps(r) + "\n")
                        self.history.append(r)
                    logf.flush()
                    eta = (o.steps - self.step) * dt / max(self.step - step0, 1)
                    bar.update(self.step, rec["loss"], last_eval, tok_s, eta, last_exact)
                    if saves:
                        self.save()
                if self._pending:  # Ctrl-C landed between two syncs: read those steps before saving them
                    recs = self.sync()
                    rec = recs[-1]
                    for r in recs:
                        logf.write(json.dumps(r) + "\n")
                        self.history.append(r)
                if self._stop and self.step < o.steps:
                    self.save()
        finally:
            bar.close()
            if old is not None:
                signal.signal(signal.SIGINT, old)
        elapsed = time.perf_counter() - t0
        return {"step": self.step, "interrupted": self._stop and self.step < o.steps,
                "final_loss": rec["loss"] if rec else None, "eval_loss": last_eval, "exact_match": last_exact,
                "tokens_per_s": tokens0 / elapsed if elapsed > 0 else 0.0, "seconds": elapsed}


def training_plan_bytes(cfg: ModelConfig, B: int, T: int, S: int | None, opts: TrainOptions) -> int:
    """Bytes a training run holds on its device: parameters, gradients, Adam m and v (flat buffers)
    and the planned arena of the training step (saved activations + transient gradients)."""
    from ..graph.build import build_train
    from ..graph.plan import plan_memory

    g, _ = build_train(cfg, B, T, loss="lm", dropout=opts.dropout, attn_dropout=opts.attn_dropout,
                       label_smoothing=opts.label_smoothing, S=S)
    return 4 * FlatBuffers.plan_bytes(cfg) + plan_memory(g).arena_bytes


def _is_layernorm(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and (parts[-2].startswith("ln") or parts[-2].endswith("_ln"))


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> dict:
    """Decoders: GPT-2 style init, N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2 * layers). Encoder-decoders: the original Transformer's (as torch.nn.Transformer and
    fairseq): Xavier-uniform projections (q, k, v counted as separate d x d matrices) and, with
    sqrt(d) embedding scaling, N(0, 1/d) embeddings so that scaled embeddings have unit variance.
    Both: zero biases, unit LayerNorm gains."""
    from ..weights.params import param_shapes

    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    xavier = cfg.arch == "encoder_decoder"
    for name, shape in param_shapes(cfg).items():
        if _is_layernorm(name):
            a = np.ones(shape) if name.endswith(".w") else np.zeros(shape)
        elif name.endswith(".b"):
            a = np.zeros(shape)
        elif xavier and name == "tok_emb":
            s = cfg.d_model ** -0.5 if cfg.embedding_scale != 1.0 else std
            a = rng.normal(0.0, s, size=shape)
        elif xavier and len(shape) == 2:
            rows = shape[0] // (3 if name.endswith("qkv.w") else 2 if name.endswith("kv.w") else 1)
            bound = math.sqrt(6.0 / (rows + shape[1]))
            a = rng.uniform(-bound, bound, size=shape)
        else:
            s = std / math.sqrt(2 * max(cfg.n_layers, 1)) if name.endswith(("attn.out.w", "ffn.down.w")) else std
            a = rng.normal(0.0, s, size=shape)
        out[name] = a.astype(np.float32)
    return out
