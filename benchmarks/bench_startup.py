"""Start-up latency of the CLI, as a user sees it: wall time of fresh subprocesses.

  python -c pass                      (interpreter floor)
  python -c "import nbformer"
  nbformer --help
  nbformer embed "hello"  warm Numba cache   (NUMBA_CACHE_DIR=benchmarks/.cache/numba-warm, filled by one run first)
  nbformer embed "hello"  cold Numba cache   (NUMBA_CACHE_DIR=<fresh temp dir> per run: every kernel compiles)

NUMBA_CACHE_DIR is used for both so that the measurement does not depend on (or disturb) the
in-tree __pycache__ that library edits keep invalidating. The script checks that Numba honours it:
the cold run must leave index files (*.nbi) in the temp dir. No torch is imported anywhere here.

    python benchmarks/bench_startup.py [--threads 2] [--repeat 3] [--cold 2]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE_DIR, MAX_ROUNDS_FACTOR, REPO, bench_args, set_threads, timeit, write_results


def _cli() -> list:
    """The console script beside this interpreter (not a pyenv shim, which adds its own ~100 ms)."""
    here = Path(sys.executable).parent / "nbformer"
    if here.exists():
        return [str(here)]
    found = shutil.which("nbformer")
    return [found] if found else [sys.executable, "-m", "cli.main"]


def run_once(cmd, env_extra=None) -> float:
    env = dict(os.environ)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt


def count_cache_files(d: Path) -> tuple:
    nbi = list(d.rglob("*.nbi"))
    nbc = list(d.rglob("*.nbc"))
    return len(nbi), len(nbc)


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=3)
    p.add_argument("--cold", type=int, default=2, help="cold-cache runs (each compiles everything)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads, torch=False)  # env vars are inherited by the subprocesses
    cli = _cli()
    py = sys.executable
    warm_dir = CACHE_DIR / "numba-warm"
    shutil.rmtree(warm_dir, ignore_errors=True)  # refill: kernels may have changed since last time
    warm_dir.mkdir(parents=True, exist_ok=True)
    warm_env = {"NUMBA_CACHE_DIR": str(warm_dir)}

    cases = [("python -c pass", [py, "-c", "pass"], None),
             ('python -c "import nbformer"', [py, "-c", "import nbformer"], None),
             ("nbformer --help", cli + ["--help"], None),
             ('nbformer embed "hello" (warm Numba cache)', cli + ["embed", "hello"], warm_env)]
    rows, raw = [], {}
    fill = run_once(cli + ["embed", "hello"], warm_env)  # fills the warm cache
    n_nbi, n_nbc = count_cache_files(warm_dir)
    for label, cmd, env in cases:
        r = timeit(lambda: run_once(cmd, env), warmup=args.warmup, repeat=args.repeat)
        raw[label] = r
        rows.append({"command": label, "median s": r["median_s"], "min s": r["min_s"], "runs": r["n"]})

    # cold: every call gets its own empty cache dir, made in advance so only the subprocess is timed
    tmp_root = Path(tempfile.mkdtemp(prefix="nbformer-numba-cold-"))
    fresh = [tmp_root / str(i) for i in range(args.cold * MAX_ROUNDS_FACTOR)]
    used = []

    def cold_run():
        d = fresh[len(used)]
        d.mkdir()
        used.append(d)
        run_once(cli + ["embed", "hello"], {"NUMBA_CACHE_DIR": str(d)})

    try:
        r = timeit(cold_run, warmup=0, repeat=args.cold)
        honoured = all(count_cache_files(d)[0] > 0 for d in used)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    raw["cold"] = r
    rows.append({"command": 'nbformer embed "hello" (cold Numba cache)', "median s": r["median_s"],
                 "min s": r["min_s"], "runs": r["n"]})
    notes = [f"wall time of a fresh subprocess, median of {args.repeat} after {args.warmup} untimed run(s) "
             f"(runs disturbed by other processes are re-run, see below); "
             f"cold: {args.cold} run(s), each with an empty NUMBA_CACHE_DIR",
             f"NUMBA_CACHE_DIR honoured for cache=True kernels: {'yes' if honoured else 'NO'} "
             f"(the warm dir holds {n_nbi} index / {n_nbc} data files after one `embed` run, "
             f"which took {fill:.2f} s)",
             f"CLI: {' '.join(cli)}; thread env {threads['threads']} (OMP/OPENBLAS/NUMBA_NUM_THREADS)"]
    md = write_results("startup", "Start-up: CLI and import latency", ["command", "median s", "min s", "runs"],
                       rows, notes, extra={"raw": raw, "cache_dir_honoured": honoured, "warm_fill_s": fill,
                                           "threads": threads})
    print(md)
    return 0 if honoured else 1


if __name__ == "__main__":
    sys.exit(main())
