"""Start-up latency of the CLI, as a user sees it: wall time of fresh subprocesses.

Rows (each command a fresh process; cold = an empty NUMBA_CACHE_DIR made for that run, so every
kernel compiles; warm = the same directory again right after, so every kernel loads):

  python -c pass / python -c "import nbformer" / nbformer --help      (floors)
  nbformer generate "And God said" --temperature 0.8 --top-k 40 --seed 1   time to the first generated
                                                                           text on stdout (the default model)
  nbformer embed "hello"                                                   total (all-MiniLM-L6-v2)
  nbformer train tests/data/kjv_genesis_excerpt.txt --steps 1 ...          time to the progress bar's
                                                                           "step 1/1" on stderr

`--baseline DIR` measures a second checkout (e.g. `git worktree add /tmp/before HEAD~1`) side by
side, interleaved run by run (before, after, before, after ...) so that the machine's load hits
both alike; the table then has before / after columns. Its CLI runs as `python -m cli.main` from
that directory. CPU seconds (the command and every process it started, e.g. the compile workers)
and the share of the CPUs other processes used during each run are recorded too: on a shared
machine the wall times of a cold run can be inflated several-fold.

`--kernels` adds the per-kernel picture for each command and tree: one cold run in-process with
a listener on Numba's compile events (NBFORMER_PRECOMPILE=0, so that compiles happen in that
process): seconds per top-level kernel (inclusive of the functions it calls) and how many
signatures each dispatcher ended up with (specialisations).

The progress line of nbformer/kernels/cpu/precompile.py is requested (NBFORMER_PROGRESS=1) and
checked: printed once on a cold run, never on a warm one.

    python benchmarks/bench_startup.py [--threads 2] [--repeat 3] [--cold 2] [--baseline DIR] [--kernels]
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, Contention, bench_args, md_table, set_threads, timeit, write_results

TEXT = "tests/data/kjv_genesis_excerpt.txt"
PROMPT = ["generate", "And God said", "--temperature", "0.8", "--top-k", "40", "--seed", "1"]
COMMANDS = {  # name -> (argv after the CLI, what is timed, target for a cold run in s)
    "generate": (PROMPT, "first generated text", 15.0),
    "embed": (["embed", "hello"], "total", 15.0),
    "train": (["train", TEXT, "--out", "{out}", "--steps", "1", "--eval-every", "1000", "--save-every", "1000"],
              "first train step", 25.0),
}
WARM_TARGET = {"generate": 1.0}
PROGRESS_TEXT = "compiling kernels for this CPU"
ANALYSIS_MARKER = "<!-- analysis: kept when the benchmark rewrites the tables above -->"


def _cli() -> list:
    """The console script beside this interpreter (not a pyenv shim, which adds its own ~100 ms)."""
    here = Path(sys.executable).parent / "nbformer"
    if here.exists():
        return [str(here)]
    found = shutil.which("nbformer")
    return [found] if found else [sys.executable, "-m", "cli.main"]


def _tree_cmd(tree: Path | None) -> tuple:
    """(argv prefix, cwd, extra env) that runs the CLI of a checkout."""
    if tree is None or tree.resolve() == REPO.resolve():
        return _cli(), REPO, {}
    return [sys.executable, "-m", "cli.main"], tree, {"PYTHONPATH": str(tree)}


def run_once(cmd, env_extra=None) -> float:
    env = dict(os.environ)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_command(tree, name, cache_dir) -> dict:
    """Run one command in a fresh process; -> {'s': seconds to what COMMANDS times, 'total_s',
    'cpu_s', 'others' (CPU share of other processes), 'progress' (the compile-progress lines)}."""
    prefix, cwd, env_extra = _tree_cmd(tree)
    argv, what, _ = COMMANDS[name]
    out_dir = tempfile.mkdtemp(prefix="nbformer-bench-train-")
    argv = [a.replace("{out}", out_dir) for a in argv]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), NBFORMER_PROGRESS="1", **env_extra)
    marks = {}
    chunks = {"out": [], "err": []}

    def reader(stream, key, t0):
        while True:
            b = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not b:
                break
            now = time.perf_counter() - t0
            chunks[key].append(b)
            if key == "out" and "first_out" not in marks and b.strip():
                marks["first_out"] = now
            if key == "err" and "step1" not in marks and b"step 1/" in b"".join(chunks["err"][-2:]):
                marks["step1"] = now

    cpu0 = _children_cpu()
    try:
        with Contention() as c:
            t0 = time.perf_counter()
            p = subprocess.Popen(prefix + argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            th = [threading.Thread(target=reader, args=(p.stdout, "out", t0)),
                  threading.Thread(target=reader, args=(p.stderr, "err", t0))]
            for t in th:
                t.start()
            for t in th:
                t.join()
            rc = p.wait()
            total = time.perf_counter() - t0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    err = b"".join(chunks["err"]).decode("utf-8", "replace")
    if rc != 0:
        raise RuntimeError(f"{' '.join(prefix + argv)} failed ({rc}):\n{err[-2000:]}")
    s = {"first generated text": marks.get("first_out"), "total": total,
         "first train step": marks.get("step1")}[what]
    progress = [ln for ln in err.replace("\r", "\n").splitlines() if PROGRESS_TEXT in ln]
    lines_with = sum(PROGRESS_TEXT in ln for ln in err.split("\n"))
    return {"s": s if s is not None else total, "total_s": total, "cpu_s": _children_cpu() - cpu0,
            "others": round(c.others, 3), "progress_last": progress[-1] if progress else None,
            "progress_lines": lines_with}


def count_cache_files(d: Path) -> tuple:
    return len(list(d.rglob("*.nbi"))), len(list(d.rglob("*.nbc")))


# ---------------------------------------------------------------- per-kernel compile profile
_PROFILE = r'''
import json, sys, time
from numba.core import event as ev
from numba.core.registry import CPUDispatcher
recs, stack = [], []
class L(ev.Listener):
    def on_start(self, event):
        stack.append((time.perf_counter(), time.process_time()))
    def on_end(self, event):
        w0, c0 = stack.pop()
        d = event.data["dispatcher"]
        recs.append(dict(name=d.py_func.__module__.rsplit(".", 1)[-1] + "." + d.py_func.__name__,
                         module=d.py_func.__module__, depth=len(stack), wall=time.perf_counter() - w0,
                         cpu=time.process_time() - c0))
ev.register("numba:compile", L())
out = sys.argv[1]
from cli.main import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    sigs = {}
    for m, mod in list(sys.modules.items()):
        if m.startswith("nbformer.kernels.cpu.") and mod is not None:
            for k, v in vars(mod).items():
                if isinstance(v, CPUDispatcher) and v.py_func.__module__ == m:
                    key = m.rsplit(".", 1)[-1] + "." + v.py_func.__name__
                    sigs[key] = [str(s) for s in v.signatures]
    json.dump({"recs": recs, "sigs": sigs}, open(out, "w"))
'''


def kernel_profile(tree, name) -> dict:
    """One cold run of a command in-process, compiling in that process: per top-level kernel
    compile seconds (wall and CPU, callees included) and signature counts."""
    prefix, cwd, env_extra = _tree_cmd(tree)
    argv = COMMANDS[name][0]
    cache = Path(tempfile.mkdtemp(prefix="nbformer-numba-prof-"))
    out_dir = tempfile.mkdtemp(prefix="nbformer-bench-train-")
    res = cache / "profile.json"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache / "c"), NBFORMER_PRECOMPILE="0", NBFORMER_PROGRESS="0",
               PYTHONPATH=str(cwd))
    env.update(env_extra)
    try:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _PROFILE, str(res)] + [a.replace("{out}", out_dir) for a in argv],
                           cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        total = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"profile of {name} failed:\n{p.stderr[-2000:]}")
        data = json.loads(res.read_text())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    per = {}
    for r in data["recs"]:
        if r["depth"] == 0:
            a = per.setdefault(r["name"], {"compiles": 0, "wall": 0.0, "cpu": 0.0})
            a["compiles"] += 1
            a["wall"] += r["wall"]
            a["cpu"] += r["cpu"]
    for k, s in data["sigs"].items():
        if k in per or s:
            per.setdefault(k, {"compiles": 0, "wall": 0.0, "cpu": 0.0})["signatures"] = len(s)
    return {"total_s": total, "kernels": per,
            "compile_cpu_s": sum(v["cpu"] for v in per.values()), "compile_wall_s": sum(v["wall"] for v in per.values())}


def kernel_tables(profiles: dict) -> str:
    """profiles: (tree label, command) -> kernel_profile. One table per command."""
    out = []
    labels = sorted({lab for lab, _ in profiles}, key=lambda x: x != "before")
    for name in COMMANDS:
        keys = sorted({k for (lab, n), pr in profiles.items() if n == name for k in pr["kernels"]},
                      key=lambda k: -max(profiles.get((lab, name), {"kernels": {}})["kernels"].get(k, {}).get("cpu", 0)
                                         for lab in labels))
        if not keys:
            continue
        cols = ["kernel"]
        for lab in labels:
            cols += [f"{lab}: compile CPU s", f"{lab}: compile wall s", f"{lab}: signatures"]
        rows = []
        for k in keys:
            row = {"kernel": k}
            for lab in labels:
                v = profiles.get((lab, name), {"kernels": {}})["kernels"].get(k)
                row[f"{lab}: compile CPU s"] = round(v["cpu"], 2) if v and v["compiles"] else "-"
                row[f"{lab}: compile wall s"] = round(v["wall"], 2) if v and v["compiles"] else "-"
                row[f"{lab}: signatures"] = v.get("signatures", 0) if v else "-"
            rows.append(row)
        tot = {"kernel": "**all (one process, one after the other)**"}
        for lab in labels:
            pr = profiles.get((lab, name))
            if pr:
                tot[f"{lab}: compile CPU s"] = round(pr["compile_cpu_s"], 1)
                tot[f"{lab}: compile wall s"] = round(pr["compile_wall_s"], 1)
                tot[f"{lab}: signatures"] = sum(v.get("signatures", 0) for v in pr["kernels"].values())
        rows.append(tot)
        out += [f"### Kernels compiled by `nbformer {' '.join(COMMANDS[name][0][:2])} ...` on a cold cache", "",
                md_table(cols, rows), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- main
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=3)
    p.add_argument("--cold", type=int, default=2, help="cold-cache runs of each command (each compiles everything)")
    p.add_argument("--baseline", type=Path, default=None, help="a checkout to measure side by side ('before')")
    p.add_argument("--kernels", action="store_true", help="also profile per-kernel compile times (slow)")
    p.add_argument("--only", default="generate,embed,train", help="commands to run (comma-separated)")
    p.add_argument("--no-floors", action="store_true", help="skip the python / import / --help rows")
    args = p.parse_args(argv)
    threads = set_threads(args.threads, torch=False)  # env vars are inherited by the subprocesses
    trees = {"after": None}
    if args.baseline is not None:
        trees = {"before": args.baseline.resolve(), "after": None}
    names = [n for n in args.only.split(",") if n]
    py = sys.executable
    rows, raw = [], {"runs": []}

    if not args.no_floors:
        for label, cmd in (("python -c pass", [py, "-c", "pass"]),
                           ('python -c "import nbformer"', [py, "-c", "import nbformer"]),
                           ("nbformer --help", _cli() + ["--help"])):
            r = timeit(lambda: run_once(cmd), warmup=args.warmup, repeat=args.repeat)
            raw[label] = r
            rows.append({"measurement": label, "after s": r["median_s"]})

    # cold then warm, per command, trees interleaved
    tmp_root = Path(tempfile.mkdtemp(prefix="nbformer-numba-cold-"))
    runs = []
    honoured = True
    try:
        for rep in range(args.cold):
            for name in names:
                for lab, tree in trees.items():
                    d = tmp_root / f"{lab}-{name}-{rep}"
                    d.mkdir()
                    cold = timed_command(tree, name, d)
                    honoured &= count_cache_files(d)[0] > 0
                    warm = timed_command(tree, name, d)
                    runs.append({"tree": lab, "command": name, "rep": rep, "cold": cold, "warm": warm})
                    print(f"{lab:6s} {name:8s} cold {cold['s']:7.2f} s (cpu {cold['cpu_s']:6.1f} s, others "
                          f"{cold['others']:.0%})  warm {warm['s']:6.2f} s  progress: {cold['progress_last']!r} / "
                          f"{warm['progress_last']!r}", flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    raw["runs"] = runs

    def pick(lab, name, phase, key="s"):
        return [r[phase][key] for r in runs if r["tree"] == lab and r["command"] == name]

    for name in names:
        what, target = COMMANDS[name][1], COMMANDS[name][2]
        for phase in ("cold", "warm"):
            row = {"measurement": f"`{name}`: {what}, {phase} cache"}
            for lab in trees:
                xs = pick(lab, name, phase)
                row[f"{lab} s"] = f"{_median(xs):.2f} ({min(xs):.2f})" if xs else ""
                row[f"{lab} CPU s"] = _median(pick(lab, name, phase, "cpu_s"))
                row[f"{lab} others"] = f"{max(pick(lab, name, phase, 'others'), default=0):.0%}"
            row["target s"] = target if phase == "cold" else WARM_TARGET.get(name, "")
            rows.append(row)
    cols = ["measurement"]
    for lab in trees:
        cols += [f"{lab} s", f"{lab} CPU s", f"{lab} others"]
    cols.append("target s")

    progress_ok = all((r["cold"]["progress_lines"] == 1) and r["warm"]["progress_lines"] == 0
                      for r in runs if r["tree"] == "after")
    notes = [f"cold: median of {args.cold} run(s), each with a fresh empty NUMBA_CACHE_DIR; warm: the same directory "
             f"again right after; trees run interleaved (before, after, before, after ...)",
             "s: wall seconds from process start to what the row names, median (best); CPU s: CPU seconds of the "
             "command and every "
             "process it started (compile workers included); others: the largest share of the CPUs other processes "
             "used during one of those runs (the machine is shared)",
             f"NUMBA_CACHE_DIR honoured for cache=True kernels: {'yes' if honoured else 'NO'}",
             f"progress line ('{PROGRESS_TEXT} ... k/N', NBFORMER_PROGRESS=1): "
             f"{'printed once on every cold run and never on a warm one' if progress_ok else 'NOT as expected'} "
             f"(after); last state seen: {next((r['cold']['progress_last'] for r in runs if r['tree'] == 'after'), None)!r}",
             f"CLI: {' '.join(_cli())}" + (f"; baseline: python -m cli.main in {trees['before']}" if "before" in trees
                                            else "") + f"; thread env {threads['threads']}"]
    from common import RESULTS_DIR

    old = RESULTS_DIR / "startup.md"
    kept = ""  # the hand-written analysis below the marker survives a re-run
    if old.exists() and ANALYSIS_MARKER in old.read_text():
        kept = old.read_text().split(ANALYSIS_MARKER, 1)[1]
    md = write_results("startup", "Start-up: CLI and import latency, cold and warm Numba cache", cols, rows, notes,
                       extra={"raw": raw, "cache_dir_honoured": honoured, "threads": threads})
    if args.kernels:
        profiles = {}
        for name in names:
            for lab, tree in trees.items():
                profiles[(lab, name)] = kernel_profile(tree, name)
                print(f"profiled {lab} {name}: compile CPU {profiles[(lab, name)]['compile_cpu_s']:.1f} s", flush=True)
        md += "\n" + kernel_tables(profiles)
        data = json.loads((RESULTS_DIR / "startup.json").read_text())
        data["kernel_profiles"] = {f"{lab}/{n}": v for (lab, n), v in profiles.items()}
        (RESULTS_DIR / "startup.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    if kept:
        md = md.rstrip("\n") + "\n\n" + ANALYSIS_MARKER + kept
    (RESULTS_DIR / "startup.md").write_text(md)
    print(md)
    return 0 if honoured else 1


if __name__ == "__main__":
    sys.exit(main())
