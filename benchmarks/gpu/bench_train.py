"""Training on the GPU: nbformer (device="cuda") side by side with torch CUDA, one run.

fp32 on both sides (TF32 off in torch: matmul and cuDNN; float32 matmul precision "highest"), no
dropout. A training step is what nbformer's Trainer.train_step does: forward + cross-entropy +
backward (StepRunner.run_lm_into: the mean loss stays on the device), the global gradient norm and
the clip decision on the device (clip_grad), then one fused Adam step over the flat parameter buffer;
the (loss, grad norm) pairs are read back once per timed round (Trainer.fit's sync_every; the small
case also measures reading them after every step);
torch: model(ids).logits, F.cross_entropy on the same targets, zero_grad + backward,
clip_grad_norm_ (max_norm = the clip, or inf: the norm is computed either way), optimizer.step()
and loss.item(). Both sides start from the same weights and see the same batches (TokenData.batch
of a fixed random token stream: host int64 arrays, uploaded by each side every step). Each case
times the two sides interleaved (nb, torch, then torch, nb, ...) over --rounds rounds after warm-up
(the first step of each side, where Numba compiles the CUDA kernels and torch sets up cuBLAS, is
timed and reported on its own), and reports tokens/s as the median with its IQR and range, and the
per-round ratio nbformer / torch (> 1: nbformer faster).

  gpt2      GPT-2 124M (transformers.GPT2Config() defaults, dropout 0, random init, save_pretrained;
            nbformer gets its config and parameters from nbformer.load(dir, device="cpu")),
            B=8, T=1024, AdamW (betas 0.9/0.98, eps 1e-9, weight decay 0), clip 1.0.
            Target >= 0.7x torch.
  small     the step of benchmarks/bench_train.py (its config, replicated: d_model 256, 4 layers,
            4 heads, d_ff 1024, vocab 8192, T=128, B=8, GPT-2 style init from init_params, mapped to
            GPT2LMHeadModel), Adam (betas 0.9/0.98, eps 1e-9), no clipping, lr 1e-4; 10 steps per
            timed round. Target >= 1.5x torch (launch overhead and fusion decide).
  gpt2_256  the GPT-2 124M step again at B=8, T=256 (the same weights, a fresh optimizer state).
  train     `python3 -m cli.main train tests/data/kjv_genesis_excerpt.txt ... --device cuda` vs the
            same command with --device cpu (subprocesses, fixed seed, a small model: see TRAIN_ARGS):
            the final held-out loss of both (OUT_DIR/train_log.jsonl) and their relative
            difference; target within 1%. With --device cuda the CPU run starts in the background
            at the beginning (niced, 2 threads: it is mostly Numba compiling the CPU kernels), the
            CUDA run after the timed cases. The part skipped first when the budget is short.

    PYTHONPATH=. python3 benchmarks/gpu/bench_train.py --json bench_train.json --md results.md   # on a GPU
    PYTHONPATH=. python benchmarks/gpu/bench_train.py --smoke --device cpu   # tiny shapes, logic only

--smoke: tiny shapes and counts (torch on the CPU when nbformer's device is the CPU; then the train
case compares two CPU runs: logic only). --only gpt2,small,gpt2_256,train picks cases. --budget S:
skip the cases that no longer fit in S seconds from start (benchmarks/gpu/check.sh passes its cap).
The JSON (--json) and the markdown (--md, appended) are written after every case.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
T_START = time.perf_counter()
CASES = ("gpt2", "small", "gpt2_256", "train")
# rough wall time a case needs on an H200 (kernels compiled by earlier steps of check.sh, or not):
# a case is skipped when less than this is left of --budget
NEEDS_S = {"gpt2": 35, "small": 10, "gpt2_256": 10, "train": 25}
TEXT = REPO / "tests" / "data" / "kjv_genesis_excerpt.txt"
# head size 64 as GPT-2's, so the CUDA attention kernels compiled for the 124M case serve this one too
TRAIN_ARGS = ["--steps", "60", "--batch", "8", "--seq-len", "64", "--d-model", "128", "--layers", "2",
              "--heads", "2", "--vocab-size", "500", "--eval-every", "60", "--save-every", "1000",
              "--warmup", "10", "--lr", "3e-3", "--seed", "0"]
TRAIN_ARGS_SMOKE = ["--steps", "20", "--batch", "4", "--seq-len", "32", "--d-model", "32", "--layers", "1",
                    "--heads", "2", "--vocab-size", "300", "--eval-every", "20", "--save-every", "1000",
                    "--warmup", "5", "--lr", "3e-3", "--seed", "0"]
TRAIN_TOLERANCE = 0.01


class Terminated(Exception):
    """SIGTERM (check.sh's timeout): report the case in progress, stop the children, write out."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts (try the logic on a CPU)")
    p.add_argument("--device", default="cuda", help="nbformer device: cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--only", default=None, help=f"comma-separated cases out of {','.join(CASES)}")
    p.add_argument("--json", dest="json_path", default=None, help="write all results as JSON here")
    p.add_argument("--md", dest="md_path", default=None, help="append the markdown tables to this file")
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds per case (>= 5 for results)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per side after the first step")
    p.add_argument("--budget", type=float, default=0.0, help="seconds; skip cases that no longer fit (0: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch / Numba (default: 2 with --device cpu, else untouched)")
    p.add_argument("--train-early", choices=("auto", "yes", "no"), default="auto",
                   help="start the train case's CPU run in the background at the beginning (auto: with cuda)")
    a = p.parse_args(argv)
    only = CASES if a.only is None else tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = [x for x in only if x not in CASES]
    if bad:
        p.error(f"--only: unknown case(s) {bad}; expected some of {list(CASES)}")
    a.cases = tuple(c for c in CASES if c in only)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    return a


# ---------------------------------------------------------------- statistics (as bench_models.py)
def _q(xs, f):
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * f
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs) -> dict:
    return {"median": statistics.median(xs), "q1": _q(xs, 0.25), "q3": _q(xs, 0.75),
            "min": min(xs), "max": max(xs), "n": len(xs), "values": [round(x, 6) for x in xs]}


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 0.01:
            return f"{v:.{digits}g}"
        return f"{v:.2e}"
    return str(v)


def spread(st, scale=1.0) -> str:
    return (f"{fmt(st['median'] * scale)} (IQR {fmt(st['q1'] * scale)}-{fmt(st['q3'] * scale)}, "
            f"range {fmt(st['min'] * scale)}-{fmt(st['max'] * scale)})")


def size(nbytes) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


def md_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


class Bench:
    """Shared state: devices, sync, the budget, results (JSON) and markdown sections."""

    def __init__(self, args, torch, np):
        self.args, self.torch, self.np = args, torch, np
        self.nb_device = args.device
        self.simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        cuda_nb = args.device.startswith("cuda")
        self.torch_device = "cuda" if (cuda_nb and torch.cuda.is_available()) else "cpu"
        self.results = {"args": {k: v for k, v in vars(args).items()}, "cases": {}, "skipped": {},
                        "errors": {}}
        self.tmp = Path(tempfile.mkdtemp(prefix="nbformer-gpu-bench-train-"))
        self.gpt2 = None  # (nbformer config, canonical params, HF model, make s): shared by gpt2 and gpt2_256
        self.children = []
        self.phase = "start"
        self.case = None

    def mark(self, phase):
        """Where the run is (printed with the time, and kept in the JSON): a run cut short says where."""
        self.phase = phase
        self.results["phase"] = phase
        print(f"[bench_train {time.perf_counter() - T_START:6.1f} s] {phase}", flush=True)
        self.flush()

    def remaining(self):
        return self.args.budget - (time.perf_counter() - T_START) if self.args.budget else float("inf")

    def sync(self):
        if self.torch_device == "cuda":
            self.torch.cuda.synchronize()
        if self.nb_device.startswith("cuda"):
            from nbformer.devices import get_device

            get_device(self.nb_device).synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        r = fn()
        self.sync()
        return time.perf_counter() - t0, r

    def section(self, name, md: str, data: dict):
        self.results["cases"][name] = data
        print(md + "\n", flush=True)
        self.flush(md)

    def flush(self, md=None):
        if self.args.json_path:
            p = Path(self.args.json_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.results["elapsed_s"] = round(time.perf_counter() - T_START, 2)
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
            tmp.replace(p)
        if self.args.md_path and md:
            with open(self.args.md_path, "a", encoding="utf-8") as f:
                f.write(md + "\n\n")

    def free(self):
        gc.collect()
        if self.torch_device == "cuda":
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------- the two training steps
class NbStep:
    """Trainer's step on FlatBuffers + StepRunner: run_lm_into (the mean loss stays on the device),
    clip_grad (the norm and the clip decision on the device), Adam; the (loss, grad norm) slots are
    read back every sync_every steps in one copy, as Trainer.fit does (a read waits for the GPU)."""

    def __init__(self, b, cfg, params, B, T, data, lr, clip, decoupled, sync_every=1):
        import nbformer.ops as ops
        from nbformer.devices import get_device
        from nbformer.training.state import FlatBuffers, StepRunner

        np = b.np
        t0 = time.perf_counter()
        self.dev = get_device(b.nb_device)
        self.flat = FlatBuffers(cfg, params, b.nb_device)
        self.runner = StepRunner(self.flat, B, T, loss="lm")
        self.m = self.dev.zeros(self.flat.n, np.float32)
        self.v = self.dev.zeros(self.flat.n, np.float32)
        kind = self.dev.kind
        self.adam, self.clip_grad = ops.get("adam", kind), ops.get("clip_grad", kind)
        self.sync_every = 1
        self.stats = self.dev.zeros((64, 2), np.float64)
        self.pending = 0
        b.sync()
        self.setup_s = time.perf_counter() - t0
        self.mask = np.ones((B, T), np.uint8)
        self.data, self.B, self.T, self.lr, self.clip, self.decoupled = data, B, T, lr, clip, decoupled
        self.set_sync(sync_every)
        self.k = 0
        self.losses, self.gnorms = [], []

    def set_sync(self, every):
        self.flush()
        self.sync_every = max(1, min(int(every), self.stats.shape[0]))

    def flush(self):
        if not getattr(self, "pending", 0):
            return None
        vals = self.dev.to_host(self.stats)[:self.pending]
        self.pending = 0
        self.losses += [float(x) for x in vals[:, 0]]
        self.gnorms += [float(x) for x in vals[:, 1]]
        return self.losses[-1]

    def step(self):
        self.k += 1
        x, y = self.data.batch(0, self.k, self.B, self.T)
        self.runner.run_lm_into(self.stats, self.pending, x, y, self.mask)
        self.clip_grad(grads=self.flat.grads, max_norm=float(self.clip), stats=self.stats, slot=self.pending)
        self.adam(params=self.flat.params, grads=self.flat.grads, m=self.m, v=self.v, lr=self.lr, beta1=0.9,
                  beta2=0.98, eps=1e-9, weight_decay=0.0, step=self.k, decoupled=self.decoupled)
        self.pending += 1
        return self.flush() if self.pending >= self.sync_every else None


def sync_cost(b, nb, steps, rounds=6):
    """nbformer alone: rounds of `steps` steps reading (loss, grad norm) back after every step vs once
    per round, interleaved -> median ms per step of each and the difference (the cost of a read)."""
    times = {1: [], steps: []}
    for r in range(rounds):
        for every in ((1, steps) if r % 2 == 0 else (steps, 1)):
            nb.set_sync(every)
            times[every].append(b.timed(lambda: [nb.step() for _ in range(steps)])[0] * 1e3 / steps)
    nb.set_sync(steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms_per_step_sync_every_step": med[1], f"ms_per_step_sync_every_{steps}": med[steps],
            "sync_cost_ms_per_step": med[1] - med[steps], "rounds": rounds}


class TorchStep:
    def flush(self):  # loss.item() in every step already waits for the GPU
        return None

    def __init__(self, b, hf, B, T, data, lr, clip, adamw):
        torch = b.torch
        self.torch, self.dev = torch, b.torch_device
        self.model = hf.to(self.dev).train()
        cls = torch.optim.AdamW if adamw else torch.optim.Adam
        self.opt = cls(self.model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
        self.optimizer = f"torch.optim.{cls.__name__} (default implementation)"
        self.data, self.B, self.T, self.clip = data, B, T, clip
        self.V = hf.config.vocab_size
        self.k = 0
        self.losses, self.gnorms = [], []

    def step(self):
        torch = self.torch
        self.k += 1
        x, y = self.data.batch(0, self.k, self.B, self.T)
        x = torch.from_numpy(x).to(self.dev)
        y = torch.from_numpy(y).to(self.dev)
        logits = self.model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.V), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.opt.step()
        v = loss.item()
        self.losses.append(v)
        self.gnorms.append(gn)
        return v


def measure(b: Bench, nb: NbStep, ref: TorchStep, steps_per_round: int, tokens_per_step: int) -> dict:
    """First step of each side (timed alone), warm-up rounds, then interleaved rounds (cut when the
    budget would not hold them: the cut is reported). -> times and stats."""
    b.mark(f"{b.case}: first nbformer step (Numba compiles or loads the kernels)")
    first_nb, _ = b.timed(lambda: (nb.step(), nb.flush()))
    b.mark(f"{b.case}: first torch step (nbformer's took {first_nb:.1f} s)")
    first_torch, _ = b.timed(ref.step)
    b.mark(f"{b.case}: warm-up and timed rounds")

    def rnd(st):
        return lambda: ([st.step() for _ in range(steps_per_round)], st.flush())

    fns = {"nbformer": rnd(nb), "torch": rnd(ref)}
    warm = {k: [] for k in fns}
    for _ in range(b.args.warmup):
        for k, fn in fns.items():
            warm[k].append(b.timed(fn)[0])
    rounds, note = b.args.rounds, ""
    if warm["nbformer"] and b.args.budget:
        per_round = warm["nbformer"][-1] + warm["torch"][-1]
        fit = int((b.remaining() - 5) / max(per_round, 1e-9))
        if fit < rounds:
            rounds = max(2, fit)
            note = f"rounds cut to {rounds} (of {b.args.rounds}) by the budget"
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(b.timed(fns[k])[0])
    n_tok = steps_per_round * tokens_per_step
    tps = {k: stats([n_tok / t for t in v]) for k, v in times.items()}
    ms = {k: stats([1e3 * t / steps_per_round for t in v]) for k, v in times.items()}
    ratio = stats([t_ref / t_nb for t_nb, t_ref in zip(times["nbformer"], times["torch"])])
    gn_t = [float(g) for g in ref.gnorms]  # torch tensors: read once, after the timing
    ref.gnorms = gn_t
    return {"first_step_s": {"nbformer": first_nb, "torch": first_torch}, "warmup_s": warm, "times_s": times,
            "tokens_per_s": tps, "step_ms": ms, "ratio": ratio, "rounds": rounds, "steps_per_round": steps_per_round,
            "note": note}


def loss_lines(nb: NbStep, ref: TorchStep) -> tuple:
    n = min(len(nb.losses), len(ref.losses))
    d = [abs(a - c) for a, c in zip(nb.losses[:n], ref.losses[:n])]
    g = abs(nb.gnorms[0] - ref.gnorms[0]) / max(abs(ref.gnorms[0]), 1e-30)
    data = {"steps_each": n, "loss_first": [nb.losses[0], ref.losses[0]], "loss_last": [nb.losses[n - 1], ref.losses[n - 1]],
            "max_abs_loss_diff": max(d), "grad_norm_first": [nb.gnorms[0], ref.gnorms[0]], "grad_norm_first_rel_diff": g}
    txt = (f"- same weights and batches: loss at step 1 nbformer {nb.losses[0]:.5f} / torch {ref.losses[0]:.5f}, "
           f"at step {n} {nb.losses[n - 1]:.5f} / {ref.losses[n - 1]:.5f} (max |difference| over the {n} steps "
           f"{max(d):.2e}); grad norm at step 1 {nb.gnorms[0]:.4f} / {ref.gnorms[0]:.4f} (relative difference {g:.1e})")
    return txt, data


def result_md(b, title, res, nb, ref, extra_notes, target):
    r = res["ratio"]
    rows = [{"impl": f"nbformer StepRunner + grad norm + Adam ({b.nb_device})",
             "tokens/s": spread(res["tokens_per_s"]["nbformer"]), "ms / step": spread(res["step_ms"]["nbformer"]),
             "first step s": fmt(res["first_step_s"]["nbformer"]), "setup s": fmt(nb.setup_s)},
            {"impl": f"torch GPT2LMHeadModel + {ref.optimizer.split()[0].split('.')[-1]} (torch {b.torch_device})",
             "tokens/s": spread(res["tokens_per_s"]["torch"]), "ms / step": spread(res["step_ms"]["torch"]),
             "first step s": fmt(res["first_step_s"]["torch"])},
            {"impl": "**ratio nbformer / torch**", "tokens/s": spread(r)}]
    met = "met" if r["median"] >= target else "NOT met"
    lines, data = loss_lines(nb, ref)
    smoke = " (smoke shapes: not a result)" if b.args.smoke else ""
    md = "\n".join([title, "", md_table(["impl", "tokens/s", "ms / step", "first step s", "setup s"], rows), "",
                    f"- target >= {target}x torch: **{met}**{smoke} (median ratio {r['median']:.3f}, over {res['rounds']} "
                    f"interleaved rounds of {res['steps_per_round']} step(s) each, after {b.args.warmup} warm-up "
                    f"round(s)){'; ' + res['note'] if res['note'] else ''}",
                    f"- first step: the first call of each side (nbformer: Numba compiles the kernels or loads them "
                    f"from its cache; torch: cuBLAS / allocator set-up); setup: FlatBuffers + StepRunner (graph, "
                    f"arena) + Adam moments; warm-up rounds: nbformer {', '.join(fmt(x) for x in res['warmup_s']['nbformer'])} s, "
                    f"torch {', '.join(fmt(x) for x in res['warmup_s']['torch'])} s",
                    lines] + extra_notes)
    return md, data, met


# ---------------------------------------------------------------- cases
def gpt2_model(b: Bench):
    """GPT-2 124M (GPT2Config() defaults, dropout 0), random init, saved with save_pretrained and
    loaded back through nbformer.load -> (config, canonical params, HF model on torch's device, make s)."""
    if b.gpt2 is not None:
        return b.gpt2
    torch = b.torch
    import nbformer
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.perf_counter()
    if b.args.smoke:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=1000, bos_token_id=999,
                         eos_token_id=999)
    else:
        cfg = GPT2Config()  # 124M: 12 layers, 768 wide, 12 heads, 1024 positions, vocab 50257
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    with torch.device(b.torch_device):  # random init on the GPU: seconds faster than on the CPU for 124M
        hf = GPT2LMHeadModel(cfg)
    d = b.tmp / "gpt2"
    hf.save_pretrained(d, safe_serialization=True)
    m = nbformer.load(str(d), device="cpu")
    b.gpt2 = (m.config, dict(m.ckpt.params), hf, time.perf_counter() - t0)
    return b.gpt2


def token_data(b, V, n=200_000, seed=0):
    from nbformer.training.data import TokenData

    rng = b.np.random.default_rng(seed)
    return TokenData(rng.integers(0, V, n), eval_fraction=0.0)


def case_gpt2(b: Bench, T_full: int, name: str):
    torch = b.torch
    from nbformer.training.trainer import TrainOptions, training_plan_bytes

    b.mark(f"{name}: making GPT-2 (random init, save_pretrained, nbformer.load) or reusing it")
    cfg, params, hf, make_s = gpt2_model(b)
    b.mark(f"{name}: nbformer FlatBuffers + StepRunner, torch model to {b.torch_device}")
    B, T = (2, 64 if T_full == 1024 else 32) if b.args.smoke else (8, T_full)
    data = token_data(b, cfg.vocab_size)
    plan = training_plan_bytes(cfg, B, T, None, TrainOptions(batch_size=B, seq_len=T))
    nb = NbStep(b, cfg, params, B, T, data, lr=1e-4, clip=1.0, decoupled=True)
    # the torch side trains its own copy (gpt2_256 starts again from the initial weights)
    import copy

    hf_copy = copy.deepcopy(hf)
    if b.torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref = TorchStep(b, hf_copy, B, T, data, lr=1e-4, clip=1.0, adamw=True)
    res = measure(b, nb, ref, steps_per_round=1, tokens_per_step=B * T)
    peak = torch.cuda.max_memory_allocated() if b.torch_device == "cuda" else None
    n_torch = sum(p.numel() for p in ref.model.parameters())
    label = "GPT-2 124M" if not b.args.smoke else "GPT-2 tiny (smoke)"
    notes = [f"- {label}: {nb.flat.num_parameters:,} parameters in nbformer's flat buffer, {n_torch:,} in torch "
             f"(tied embeddings); GPT2Config() defaults with dropout 0 on both sides, random init (save_pretrained, "
             f"then nbformer.load); model made and loaded in {make_s:.1f} s",
             f"- AdamW lr 1e-4, betas 0.9/0.98, eps 1e-9, weight decay 0, clip 1.0 ({ref.optimizer}); transformers "
             f"attention: {getattr(hf.config, '_attn_implementation', '?')}",
             f"- device memory: nbformer's training plan {size(plan)} (params + grads + Adam + arena)"
             + (f"; torch peak allocated {size(peak)}" if peak is not None else "")]
    title = f"### Training step: {label}, B={B} T={T}, fp32"
    md, ldata, met = result_md(b, title, res, nb, ref, notes, target=0.7)
    b.section(name, md, {"B": B, "T": T, **res, **ldata, "setup_s": nb.setup_s, "model_make_s": make_s,
                         "params_nbformer": nb.flat.num_parameters, "params_torch": n_torch,
                         "plan_bytes_nbformer": plan, "torch_peak_bytes": peak, "target_ratio": 0.7, "target": met})
    del nb, ref, hf_copy
    b.free()


def case_small(b: Bench):
    torch, np = b.torch, b.np
    import transformers

    from nbformer.config import ModelConfig
    from nbformer.training.trainer import init_params
    from nbformer.weights import hf_gpt2

    # benchmarks/bench_train.py's shapes and config (built inside its main(), so replicated here)
    if b.args.smoke:
        B, T, V, C, L, H, F = 4, 32, 512, 64, 2, 2, 256
    else:
        B, T, V, C, L, H, F = 8, 128, 8192, 256, 4, 4, 1024
    cfg = ModelConfig(arch="decoder", vocab_size=V, d_model=C, n_heads=H, n_layers=L, d_ff=F, max_positions=T,
                      norm="pre", activation="gelu_tanh", final_layernorm=True)
    params = init_params(cfg, seed=0)
    data = token_data(b, V)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, n_inner=F, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    state = {}
    for r in hf_gpt2.rules(cfg, "transformer."):
        state.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.inverse(params[r.canonical]).items()})
    hf.load_state_dict(state, strict=False)
    b.mark("small: nbformer FlatBuffers + StepRunner, torch model")
    spr = 2 if b.args.smoke else 10
    nb = NbStep(b, cfg, params, B, T, data, lr=1e-4, clip=0.0, decoupled=False, sync_every=spr)
    ref = TorchStep(b, hf, B, T, data, lr=1e-4, clip=0.0, adamw=False)
    res = measure(b, nb, ref, steps_per_round=spr, tokens_per_step=B * T)
    b.mark("small: the cost of reading the loss back every step")
    res["sync_cost"] = sync_cost(b, nb, spr, rounds=2 if b.args.smoke else 6)
    notes = [f"- benchmarks/bench_train.py's step: d_model {C}, {L} layers, {H} heads, d_ff {F}, vocab {V}, "
             f"{nb.flat.num_parameters:,} parameters; init_params(seed 0) mapped to GPT2LMHeadModel "
             f"(hf_gpt2 rules); Adam lr 1e-4, betas 0.9/0.98, eps 1e-9, no clipping (both sides still compute "
             f"the grad norm, as the Trainer does); {spr} steps per timed round, loss / grad norm read back once "
             f"per round (Trainer.fit's sync_every)",
             f"- reading the loss back after every step instead: "
             f"{res['sync_cost']['ms_per_step_sync_every_step']:.3f} ms/step vs "
             f"{res['sync_cost'][f'ms_per_step_sync_every_{spr}']:.3f} ms/step (a read costs "
             f"{res['sync_cost']['sync_cost_ms_per_step']:+.3f} ms per step; median of "
             f"{res['sync_cost']['rounds']} interleaved rounds)"]
    title = f"### Training step: bench_train.py's small model{' (smoke)' if b.args.smoke else ''}, B={B} T={T}, fp32"
    md, ldata, met = result_md(b, title, res, nb, ref, notes, target=1.5)
    b.section("small", md, {"B": B, "T": T, "V": V, "d_model": C, "layers": L, "heads": H, "d_ff": F, **res, **ldata,
                            "setup_s": nb.setup_s, "params": nb.flat.num_parameters, "target_ratio": 1.5,
                            "target": met})
    del nb, ref, hf
    b.free()


# ---------------------------------------------------------------- nbformer train, cuda vs cpu
def _child_env(extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def train_cmd(b: Bench, device: str, out: Path) -> list:
    return ([sys.executable, "-m", "cli.main", "train", str(TEXT), "--out", str(out)]
            + (TRAIN_ARGS_SMOKE if b.args.smoke else TRAIN_ARGS) + ["--device", device, "--quiet"])


def start_train(b: Bench, role: str, device: str, background: bool = False) -> dict:
    out = b.tmp / f"train-{role}"
    shutil.rmtree(out, ignore_errors=True)
    extra = {"NBFORMER_DEVICE": device}
    if background:  # mostly Numba compiling: keep it off the cores the timed cases use
        extra.update({"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    err = open(b.tmp / f"train-{role}.stderr", "w+", encoding="utf-8")
    p = subprocess.Popen(train_cmd(b, device, out), cwd=REPO, env=_child_env(extra), stdout=subprocess.PIPE,
                         stderr=err, text=True, preexec_fn=(lambda: os.nice(19)) if background else None)
    job = {"role": role, "device": device, "out": out, "proc": p, "err": err, "t0": time.perf_counter(),
           "background": background}
    b.children.append(job)
    return job


def wait_all(jobs, timeout):
    """Wait for every job (each one's exit time recorded as it happens) until timeout seconds from now."""
    deadline = time.perf_counter() + max(1.0, timeout)
    while time.perf_counter() < deadline and any(j["proc"].poll() is None for j in jobs):
        for j in jobs:
            if "exit_t" not in j and j["proc"].poll() is not None:
                j["exit_t"] = time.perf_counter()
        time.sleep(0.05)
    for j in jobs:
        if "exit_t" not in j and j["proc"].poll() is not None:
            j["exit_t"] = time.perf_counter()


def finish_train(job) -> dict:
    p = job["proc"]
    if p.poll() is None:
        p.kill()
        p.communicate()
        return {"error": f"timed out ({time.perf_counter() - job['t0']:.0f} s since its start)"}
    stdout, _ = p.communicate()
    wall = job["exit_t"] - job["t0"]
    job["err"].seek(0)
    err = job["err"].read()
    r = {"wall_s": wall, "rc": p.returncode, "stdout": stdout.strip()[-500:]}
    for line in err.splitlines():
        if "unigram baseline" in line:
            r["about"] = line.strip()
    if p.returncode != 0:
        r["error"] = f"rc {p.returncode}: {err.strip()[-1500:]}"
        return r
    recs = [json.loads(x) for x in (job["out"] / "train_log.jsonl").read_text().splitlines() if x.strip()]
    ev = [x for x in recs if x.get("eval_loss") is not None]
    if not ev:
        r["error"] = "no eval_loss in train_log.jsonl"
        return r
    r.update({"step": ev[-1]["step"], "eval_loss": ev[-1]["eval_loss"], "train_loss": ev[-1]["loss"],
              "tokens_per_s": ev[-1].get("tokens_per_s")})
    return r


def case_train(b: Bench, early):
    ref_job = early or start_train(b, "cpu", "cpu")
    dev_job = start_train(b, "dev", b.nb_device)
    b.mark(f"train: waiting for the --device {b.nb_device} and --device cpu runs")
    wait_all([dev_job, ref_job], (b.remaining() - 3) if b.args.budget else 600.0)
    dev, ref = finish_train(dev_job), finish_train(ref_job)
    cmd = " ".join(["python3"] + train_cmd(b, "DEVICE", Path("OUT_DIR"))[1:-1])
    cmd = cmd.replace(str(TEXT), "tests/data/kjv_genesis_excerpt.txt")
    rows = []
    for who, r in ((b.nb_device, dev), ("cpu (reference)", ref)):
        rows.append({"run": f"--device {who}", "held-out loss": fmt(r.get("eval_loss"), 6),
                     "train loss": fmt(r.get("train_loss"), 6),
                     "tokens/s": fmt(float(r["tokens_per_s"])) if r.get("tokens_per_s") else "-",
                     "wall s (spawn to exit)": fmt(r.get("wall_s")), "error": r.get("error", "")[:300]})
    rel, verdict = None, "not decided (a run failed)"
    if "eval_loss" in dev and "eval_loss" in ref:
        rel = abs(dev["eval_loss"] - ref["eval_loss"]) / abs(ref["eval_loss"])
        verdict = ("**met**" if rel <= TRAIN_TOLERANCE else "**NOT met**") + f" (relative difference {rel:.2e})"
    same = " (--device cpu: both runs on the CPU, logic only)" if b.nb_device == "cpu" else ""
    md = "\n".join([f"### nbformer train --device {b.nb_device} vs --device cpu: held-out loss{same}", "",
                    md_table(["run", "held-out loss", "train loss", "tokens/s", "wall s (spawn to exit)", "error"], rows),
                    "", f"- target: the same held-out loss within {100 * TRAIN_TOLERANCE:.0f}%: {verdict}",
                    f"- `{cmd} --quiet`, final eval loss from OUT_DIR/train_log.jsonl; "
                    + (ref.get("about") or dev.get("about") or ""),
                    f"- the CPU run {'started in the background at the beginning (niced, 2 threads)' if early else 'ran beside the device run'}; "
                    "wall times include Numba compiling or loading the kernels"])
    b.section("train", md, {"command": cmd, "device": dev, "cpu": ref, "rel_diff": rel,
                            "tolerance": TRAIN_TOLERANCE, "met": rel is not None and rel <= TRAIN_TOLERANCE,
                            "cpu_started_early": bool(early)})


# ---------------------------------------------------------------- main
def versions(torch) -> dict:
    from importlib import metadata

    v = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "numba", "numba-cuda", "llvmlite", "torch", "transformers"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    v["torch_cuda"] = getattr(torch.version, "cuda", None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v["gpu"] = p.name
        v["compute_capability"] = f"{p.major}.{p.minor}"
    try:
        v["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["git"] = None
    return v


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (2 if args.device == "cpu" else None)
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[k] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch  # before Numba starts its OpenMP layer (the two share libgomp; see benchmarks/common.py)

    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    import numpy as np

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    sys.path.insert(0, str(REPO))
    b = Bench(args, torch, np)
    v = versions(torch)
    b.results["versions"] = v
    b.results["torch_device"] = b.torch_device
    head = (f"## Training: nbformer ({args.device}{', CUDA simulator' if b.simulated else ''}) vs torch "
            f"({b.torch_device}), fp32, TF32 off{' -- SMOKE (tiny shapes)' if args.smoke else ''}\n\n"
            f"{v.get('gpu', 'no CUDA GPU visible to torch')}"
            f"{' (cc ' + v['compute_capability'] + ')' if v.get('compute_capability') else ''}; python "
            f"{v['python']}, numba {v['numba']}, numba-cuda {v['numba-cuda']}, torch {v['torch']} (CUDA "
            f"{v['torch_cuda']}), transformers {v['transformers']}; git {v['git']}; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Cells: median (IQR, range) over {args.rounds} interleaved "
            f"rounds; ratios are nbformer / torch tokens/s per round (> 1: nbformer faster).")
    print(head + "\n", flush=True)
    b.flush(head)

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    early = None
    want_early = args.train_early == "yes" or (args.train_early == "auto" and args.device.startswith("cuda"))
    if "train" in args.cases and want_early:
        early = start_train(b, "cpu", "cpu", background=True)

    rc = 0
    try:
        for name in args.cases:
            if b.remaining() < NEEDS_S[name]:
                msg = (f"skipped: {b.remaining():.0f} s left of --budget {args.budget:.0f}, the case needs "
                       f"~{NEEDS_S[name]} s")
                b.results["skipped"][name] = msg
                b.section(f"skipped:{name}", f"### {name}: {msg}", {"skipped": msg})
                continue
            t0 = time.perf_counter()
            b.case = name
            try:
                if name == "gpt2":
                    case_gpt2(b, 1024, "gpt2")
                elif name == "gpt2_256":
                    case_gpt2(b, 256, "gpt2_256")
                elif name == "small":
                    case_small(b)
                else:
                    case_train(b, early)
                b.results["cases"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
                b.flush()
            except Terminated:
                rc = 1
                msg = (f"cut off by SIGTERM (the step's timeout) {time.perf_counter() - t0:.1f} s into the case, "
                       f"{time.perf_counter() - T_START:.1f} s into the run, during: {b.phase}")
                b.section(f"terminated:{name}", f"### {name}: {msg}", {"terminated": msg})
                break
            except Exception as e:  # report, and go on with the next case
                rc = 1
                tb = traceback.format_exc()
                print(tb, file=sys.stderr, flush=True)
                b.results["errors"][name] = tb[-4000:]
                b.section(f"error:{name}", f"### {name}: FAILED after {time.perf_counter() - t0:.1f} s\n\n"
                                           f"```\n{type(e).__name__}: {str(e)[:1500]}\n```", {"error": tb[-4000:]})
                b.free()
    except Terminated:  # between cases
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for job in b.children:  # the background CPU run of a skipped train case, or one cut short
            if job["proc"].poll() is None:
                job["proc"].kill()
                job["proc"].wait()
            job["err"].close()
        b.flush()
        shutil.rmtree(b.tmp, ignore_errors=True)
    print(f"bench_train: {time.perf_counter() - T_START:.1f} s in all", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
