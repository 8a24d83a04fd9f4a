"""Run every benchmark (each in its own process, so thread / env / import-order settings are fresh)
and combine their markdown tables into benchmarks/results/SUMMARY.md.

    python benchmarks/run_all.py [--only embed,gpt2_prefill,startup,attention] [--threads 2]

Scripts: bench_embed.py, bench_gpt2_prefill.py, bench_startup.py, bench_attention.py when present, then
any other bench_<name>.py. A script's section is results/<name>.md if the script (re)wrote it during this
run, else any other results/*.md it wrote, else its stdout (saved as results/<name>.stdout.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import time

from common import BENCH_DIR, RESULTS_DIR, machine_info, md_table

SCRIPTS = [("embed", "bench_embed.py"), ("gpt2_prefill", "bench_gpt2_prefill.py"),
           ("startup", "bench_startup.py"), ("attention", "bench_attention.py")]


def all_scripts() -> list:
    """The four above, then any other benchmarks/bench_<name>.py (convention: it writes results/<name>.md)."""
    known = {s for _, s in SCRIPTS}
    extra = sorted(f.name for f in BENCH_DIR.glob("bench_*.py") if f.name not in known)
    return SCRIPTS + [(n[len("bench_"):-len(".py")], n) for n in extra]


def _headline_ratios(d: dict) -> list:
    """[(what, ratio text)] of one result file: its own 'headline' list when it writes one (bench_gemm),
    embed's per-case ratios, the prefill's, and the rows of a table named 'ratio ...' (training step,
    attention backward)."""
    out = [(f"{d['title']}: {what}", text) for what, text in d.get("headline") or []]
    if out:
        return out
    for case, r in (d.get("raw") or {}).items():
        if isinstance(r, dict) and "ratio" in r:
            per = r.get("ratio_per_round") or []
            spread = (f" per round {statistics.median(per):.2f} [{min(per):.2f}..{max(per):.2f}]" if per else "")
            out.append((f"{d['title']}, {case}", f"{r['ratio']:.2f}x{spread}"))
    if d.get("ratio") is not None:
        best = f" (best runs {d['ratio_best']:.2f}x)" if d.get("ratio_best") else ""
        per = next((r["ratio per round"] for r in d.get("rows", []) if r.get("ratio per round")), None)
        out.append((d["title"], f"{d['ratio']:.2f}x" + (f", per round {per}" if per else "") + best))
    elif not out:
        first = None  # the group's first row (nbformer's) names it
        for row in d.get("rows", []):
            impl = str(row.get("impl", ""))
            if impl.strip().startswith("ratio"):
                vals = [v for k, v in row.items() if k not in ("impl", "ratio per round") and isinstance(v, (int, float))]
                if vals:
                    per = row.get("ratio per round")
                    out.append((f"{d['title']}: {first or impl.strip()}",
                                f"{vals[0]:.2f}x" + (f", per round {per}" if per else "")))
                first = None
            elif first is None:
                first = impl.split(":")[0] if ":" in impl else impl
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(k for k, _ in all_scripts()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild SUMMARY.md from the existing results (and run_all.json) without running anything")
    args = p.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NBFORMER_BENCH_THREADS=str(args.threads))
    sections, timing = [], []
    log = RESULTS_DIR / "run_all.json"
    if args.summary_only:
        timing = json.loads(log.read_text())["scripts"] if log.exists() else []
        listed = {name for t in timing for name in t.get("files", [])}
        for key, script in all_scripts():  # results of scripts run on their own since the last full run
            if f"{key}.md" not in listed and (RESULTS_DIR / f"{key}.md").exists():
                timing.append({"script": script, "status": "ok (run on its own)", "wall s": "", "files": [f"{key}.md"]})
    for key, script in ([] if args.summary_only else all_scripts()):
        if only and key not in only:
            continue
        path = BENCH_DIR / script
        if not path.exists():
            timing.append({"script": script, "status": "absent", "wall s": ""})
            continue
        before = {f.name: f.stat().st_mtime_ns for f in RESULTS_DIR.glob("*.md")}
        print(f"=== {script}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], cwd=BENCH_DIR.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        print(proc.stdout, flush=True)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        timing.append({"script": script, "status": status, "wall s": wall})
        changed = sorted(f.name for f in RESULTS_DIR.glob("*.md")
                         if f.name != "SUMMARY.md" and before.get(f.name) != f.stat().st_mtime_ns)
        # by name first: another process may write results/ meanwhile
        written = [f"{key}.md"] if f"{key}.md" in changed else changed
        timing[-1]["files"] = written
        if not written:
            (RESULTS_DIR / f"{key}.stdout.md").write_text(f"## {script}\n\n```\n{proc.stdout.strip()[-6000:]}\n```\n")
            timing[-1]["files"] = [f"{key}.stdout.md"]
        if proc.returncode != 0:
            timing[-1]["stderr_tail"] = proc.stderr.strip()[-1500:]

    if not args.summary_only:
        log.write_text(json.dumps({"threads": args.threads, "scripts": timing}, indent=2) + "\n")
    for t in timing:
        for name in t.get("files", []):
            f = RESULTS_DIR / name
            if f.exists():
                sections.append(f.read_text())
        if t.get("stderr_tail"):
            sections.append(f"**{t['script']} exited with {t['status']}**; stderr tail:\n\n```\n{t['stderr_tail']}\n```\n")
    ratios = []  # (what, "median ratio" text) from each result's own file
    for key in ("embed", "gpt2_prefill", "train", "gemm"):
        f = RESULTS_DIR / f"{key}.json"
        if f.exists() and (not only or key in only):
            ratios += _headline_ratios(json.loads(f.read_text()))
    info = machine_info()
    head = ["# nbformer benchmarks", "",
            f"{info['cpu']}, {info['usable_cores']} cores, {args.threads} threads per framework; "
            f"git {info['git']}; {info['date']}", ""]
    if ratios:
        head += ["Ratios nbformer / torch (> 1: nbformer faster; per-round median [min..max] where the benchmark "
                 "records it):", "", "\n".join(f"- {what}: **{text}**" for what, text in ratios), ""]
    head += ["Script wall times:", "", md_table(["script", "status", "wall s"], timing), ""]
    text = "\n".join(head) + "\n" + "\n".join(sections)
    (RESULTS_DIR / "SUMMARY.md").write_text(text)
    print(text)
    return 0 if all(t["status"] in ("ok", "absent", "ok (run on its own)") for t in timing) else 1


if __name__ == "__main__":
    sys.exit(main())
