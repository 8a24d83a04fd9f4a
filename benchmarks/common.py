"""Shared helpers for the nbformer benchmarks: thread pinning, timing, machine info, result files.

Thread control (`set_threads(n)`), and why it is done the way it is:
  * OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS / NUMEXPR_NUM_THREADS /
    NUMBA_NUM_THREADS are written to os.environ. The BLAS and OpenMP runtimes read them only
    when their shared library is initialised, i.e. at the first `import numpy` / `import torch`
    (numpy's OpenBLAS) or at first use (scipy's OpenBLAS, which Numba calls for np.dot inside
    @njit code). So every bench script calls `set_threads()` BEFORE importing numpy; this module
    imports nothing heavy at module level for that reason. The env vars are also inherited by
    subprocesses (bench_startup), so those run with the same thread counts.
  * torch (when wanted) is imported before Numba starts its OpenMP threading layer; see the
    comment in set_threads: the other order made torch ~40x slower here.
  * Runtime setters then cover what the env vars may have missed (a library already loaded):
    numba.set_num_threads(n) (the prange pool; must be <= NUMBA_NUM_THREADS),
    torch.set_num_threads(n) (intra-op pool), and threadpoolctl.threadpool_limits(n) on every
    BLAS/OpenMP library loaded so far. scipy.linalg.cython_blas is imported first so that the
    OpenBLAS copy Numba's np.dot uses is loaded, and limited, before any kernel runs.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_THREADS = 2

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS")
_limiters = []  # keep threadpoolctl limiters alive for the life of the process
_thread_report: dict = {}


def set_threads(n: int = DEFAULT_THREADS, torch: bool = True) -> dict:
    """Pin every thread pool we know of to n threads. Call before importing numpy (see module doc).

    Returns what was done, for the results file.
    """
    early = "numpy" not in sys.modules
    for k in _THREAD_ENV:
        os.environ[k] = str(n)
    report = {"threads": n, "env_set_before_numpy_import": early}
    if torch:
        # torch must be imported BEFORE Numba starts its OpenMP threading layer: torch's bundled
        # libgomp and the system libgomp that Numba's omppool links share the soname libgomp.so.1;
        # whichever loads first serves both, and torch on the system libgomp measured ~40x slower
        # here (sentence-transformers encode: 1.2 s -> 50 s).
        import torch as _torch

        _torch.set_num_threads(n)
        report["torch_threads"] = _torch.get_num_threads()
    import numba  # noqa: E402  (imports numpy, after the env vars are set)

    if numba.config.NUMBA_NUM_THREADS < n:
        raise RuntimeError(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} < {n}: set the env var earlier")
    numba.set_num_threads(n)
    report["numba_threads"] = numba.get_num_threads()
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        _limiters.append(threadpool_limits(limits=n))
        report["threadpools"] = [f"{Path(d['filepath']).name}: {d['num_threads']}" for d in threadpool_info()]
    except ImportError:
        report["threadpools"] = "threadpoolctl not installed"
    _thread_report.clear()
    _thread_report.update(report)
    return report


# ------------------------------------------------------------------ machine quietness
# The benchmark machine has 2 cores and is shared: other processes often keep one core busy,
# which stalls every parallel region (a 2-thread barrier waits for a descheduled thread) and
# can inflate timings several-fold. Before each timed round we wait (bounded) until the other
# processes leave the CPUs nearly idle, and record how busy they were.
def _cpu_times():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return idle, sum(v[:8])


def busy_fraction(window: float = 0.25) -> float:
    """Fraction of all CPUs busy over `window` seconds (while this process sleeps)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return 0.0
    return 1.0 - (b[0] - a[0]) / (b[1] - a[1])


QUIET_BUSY = float(os.environ.get("NBFORMER_BENCH_QUIET_BUSY", "0.15"))
QUIET_TIMEOUT = float(os.environ.get("NBFORMER_BENCH_QUIET_TIMEOUT", "20"))
_busy_log: list = []   # busy fraction seen just before each timed round
_round_log: list = []  # fraction of the CPUs other processes used DURING each timed round


def wait_quiet(max_busy: float = QUIET_BUSY, timeout: float = QUIET_TIMEOUT) -> float:
    """Sleep until other processes use < max_busy of the CPUs (or timeout s pass); returns the
    last busy fraction seen, and logs it (see busy_log())."""
    t_end = time.perf_counter() + timeout
    while True:
        b = busy_fraction()
        if b < max_busy or time.perf_counter() >= t_end or timeout <= 0:
            _busy_log.append(round(b, 3))
            return b
        time.sleep(0.25)


def busy_log() -> dict:
    """How noisy the machine was: other processes' CPU share during each timed round."""
    n = len(_round_log)
    return {"rounds": n, "rounds_busy": sum(b >= QUIET_BUSY for b in _round_log),
            "max_busy": max(_round_log) if n else None, "others_during_round": list(_round_log),
            "busy_before_round": list(_busy_log)}


# ------------------------------------------------------------------ timing
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MAX_ROUNDS_FACTOR = 3  # up to this many x `repeat` rounds are run to collect `repeat` clean ones


class Contention:
    """`with Contention() as c: ...` -> c.others: the fraction of all CPUs that OTHER processes used
    while the block ran (busy jiffies from /proc/stat minus this process's own CPU time, children
    included). A round is 'clean' when c.others < QUIET_BUSY."""

    def __enter__(self):
        self.a, self.ta = _cpu_times(), os.times()
        return self

    def __exit__(self, *exc):
        b, tb = _cpu_times(), os.times()
        self.others = 0.0
        if self.a is not None and b is not None and b[1] > self.a[1]:
            total = (b[1] - self.a[1]) / _HZ
            busy = total - (b[0] - self.a[0]) / _HZ
            own = sum(tb[:4]) - sum(self.ta[:4])  # user, system, children user, children system
            self.others = min(1.0, max(0.0, (busy - own) / total))
        return False


def _timed_rounds(fns: dict, repeat: int, quiet: bool) -> dict:
    """Rounds of (each fn once, timed). With quiet=True: wait for a quiet machine before a round and
    keep going until `repeat` rounds ran clean (others < QUIET_BUSY) or MAX_ROUNDS_FACTOR*repeat
    rounds ran. Statistics use the clean rounds when there are any, else all rounds."""
    times = {k: [] for k in fns}
    clean = []  # indices of clean rounds
    max_rounds = repeat * (MAX_ROUNDS_FACTOR if quiet else 1)
    n = 0
    while len(clean) < repeat and n < max_rounds:
        if quiet:
            wait_quiet()
        with Contention() as c:
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        _round_log.append(round(c.others, 3))
        if c.others < QUIET_BUSY or not quiet:
            clean.append(n)
        n += 1
    out = {}
    for k, ts in times.items():
        use = [ts[i] for i in clean] if clean else ts
        out[k] = summarize(use)
        out[k].update(rounds=len(ts), clean_rounds=len(clean), all_times_s=[round(t, 6) for t in ts],
                      used_rounds=list(clean) if clean else list(range(len(ts))))
    return out


def timeit(fn, warmup: int = 2, repeat: int = 5, quiet: bool = True) -> dict:
    """Call fn() `warmup` times untimed, then time it (time.perf_counter) over `repeat` clean rounds
    (see _timed_rounds)."""
    for _ in range(warmup):
        fn()
    return _timed_rounds({"fn": fn}, repeat, quiet)["fn"]


def timeit_pair(fns: dict, warmup: int = 2, repeat: int = 5, quiet: bool = True) -> dict:
    """Side by side: warm each fn up, then time them interleaved (a, b, a, b, ...) so that
    machine noise / thermal drift hits both alike; a round where other processes used the CPUs is
    discarded and re-run (see _timed_rounds). fns: name -> callable. Returns name -> summary."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return _timed_rounds(fns, repeat, quiet)


def summarize(times) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": [round(t, 6) for t in times], "n": len(times)}


def round_ratios(res: dict, nb: str = "nbformer", ref: str = "torch") -> list:
    """Per interleaved round of a timeit_pair result: ref time / nb time (> 1: nbformer faster)."""
    return [b / a for a, b in zip(res[nb]["times_s"], res[ref]["times_s"])]


def spread(ratios: list) -> str:
    """'median [min..max]' of per-round ratios."""
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}..{max(ratios):.2f}]" if ratios else "-"


def sgemm_rates(repeat: int = 5) -> dict:
    """This machine's fp32 GEMM rate (GFLOP/s) at the current thread counts: torch.mm on 2048^3
    (MKL) and nbformer's own matmul_nn (the best of nbformer.bench.roofline's shapes), best of
    `repeat`. The yardstick for a model's effective rate: ratios to torch depend on how close
    torch's BLAS gets to it on the machine (MKL runs far below it on some AMD CPUs)."""
    import torch

    from nbformer.bench.roofline import measure_cpu

    n = 2048
    a = torch.randn(n, n)
    torch.mm(a, a)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    ours = measure_cpu(repeat=repeat).peak_gflops
    return {"torch_mm_2048": 2 * n ** 3 / best / 1e9, "nbformer_matmul": float(ours)}


def ratio(nb_throughput: float, ref_throughput: float) -> float:
    """nbformer ÷ reference throughput: > 1 means nbformer is faster."""
    return nb_throughput / ref_throughput if ref_throughput else float("nan")


# ------------------------------------------------------------------ machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    return []


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nbformer", "cli"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("nbformer", "numba", "llvmlite", "numpy", "scipy", "torch",
                                               "transformers", "sentence-transformers", "tokenizers")},
        "git": _git(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if "numba" in sys.modules:
        try:
            import numba

            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            info["numba_threading_layer"] = "not initialised"
    if _thread_report:
        info["thread_settings"] = dict(_thread_report)
    if _round_log:
        info["other_load_during_rounds"] = busy_log()
    return info


# ------------------------------------------------------------------ results
def _cell(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:,.1f}"
        if a >= 0.01:
            return f"{v:.3g}" if a < 10 else f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, title: str, columns, rows, notes=(), extra: dict | None = None) -> str:
    """Write results/<name>.json (everything) and results/<name>.md (table + notes + machine).
    Returns the markdown text (callers print it)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    payload = {"name": name, "title": title, "columns": list(columns), "rows": rows, "notes": list(notes),
               "machine": info, **(extra or {})}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    ts = info.get("thread_settings", {})
    md = [f"## {title}", "", md_table(columns, rows), ""]
    md += [f"- {n}" for n in notes]
    v = info["versions"]
    md += ["", f"Machine: {info['cpu']} ({'/'.join(info['cpu_flags'])}), {info['usable_cores']} cores; "
               f"threads: {ts.get('threads', '?')} (numba {ts.get('numba_threads', '?')}, "
               f"torch {ts.get('torch_threads', '-')}); numba {v['numba']}, numpy {v['numpy']}, "
               f"torch {v['torch']}, transformers {v['transformers']}; git {info['git']}; {info['date']}; "
               f"load average at write {info['loadavg_1_5_15']}", ""]
    bl = info.get("other_load_during_rounds")
    if bl:
        md.insert(-1, f"Other processes: in {bl['rounds_busy']} of {bl['rounds']} timed rounds they used "
                      f">= {QUIET_BUSY:.0%} of the CPUs (max {bl['max_busy']:.0%}); such rounds are re-run and left "
                      f"out of the statistics while clean ones remain (each round waits up to "
                      f"{QUIET_TIMEOUT:.0f} s for a quiet machine first).")
    text = "\n".join(md)
    path = RESULTS_DIR / f"{name}.md"
    kept = ""
    if path.exists():  # hand-written analysis below KEEP_MARKER survives a rerun
        old = path.read_text()
        at = old.find(KEEP_MARKER)
        kept = "\n" + old[at:] if at >= 0 else ""
    path.write_text(text + kept)
    return text


KEEP_MARKER = "<!-- analysis: kept when the benchmark rewrites the tables above -->"


def bench_args(description: str, warmup: int = 2, repeat: int = 5):
    """Standard CLI for a bench script: --threads, --warmup, --repeat. Parsed before numpy import."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=int(os.environ.get("NBFORMER_BENCH_THREADS", DEFAULT_THREADS)))
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--repeat", type=int, default=repeat)
    return p
