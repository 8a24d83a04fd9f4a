"""This machine's roofline: peak GEMM rate and streaming-read bandwidth, measured once, cached.

The two numbers that bound a kernel (Williams et al.'s roofline model) are measured, not taken
from a data sheet, with the code paths nbformer's kernels use:
  * peak compute: a large square sgemm through nbformer's own GEMM (kernels/cpu/gemm.py: BLAS
    sgemm blocks on Numba's thread pool; on CUDA the tiled SGEMM of kernels/cuda/linear.py),
    2*N^3 FLOPs per call, best of a few calls after a warm-up;
  * bandwidth: a parallel sum over a buffer much larger than the caches (each byte read once),
    best of a few calls.
Both depend on the thread count on the CPU, so an entry is kept per (machine, device, threads).
Entries live in `cache_dir()/roofline.json` (NBFORMER_CACHE_DIR overrides the directory), keyed by
the machine key of nbformer.tuning.machine: an entry from another machine or library version
has another key and is never used. `nbformer bench --remeasure` measures again.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError, NbformerError

CACHE_FILE = "roofline.json"
FORMAT_VERSION = 1
PLOT_HINT = 'pip install "nbformer[plot]"'

# default measurement sizes: large enough to leave the caches and amortise call overhead
# M,K,N: a large square one and two that stay in cache (best of several short calls also finds a
# quiet moment on a busy machine)
CPU_GEMM_SHAPES = ((1536, 1536, 1536), (512, 512, 512), (1024, 256, 1024))
CPU_READ_MIB = 256
CUDA_GEMM_N = 8192  # 1.1 TFLOP per call
CUDA_READ_MIB = 2048


@dataclass
class Roofline:
    device: str  # 'cpu' or 'cuda:N'
    threads: int | None  # Numba threads (cpu); None on cuda
    peak_gflops: float
    read_gbs: float
    measured_at: str = ""
    source: str = "measured"  # 'measured' now, or 'cache'
    details: dict = field(default_factory=dict)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
        return self.peak_gflops / self.read_gbs

    def attainable(self, intensity: float) -> float:
        """GFLOP/s the roofline allows at this arithmetic intensity."""
        return min(self.peak_gflops, self.read_gbs * intensity)

    def label(self) -> str:
        if self.threads is None:
            return self.device
        return f"{self.device}, {self.threads} thread{'s' * (self.threads != 1)}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["ridge_flop_per_byte"] = self.ridge
        return d


# ---------------------------------------------------------------- the cache
def cache_path() -> Path:
    from ..tuning.machine import cache_dir

    return cache_dir() / CACHE_FILE


def entry_key(device: str, threads: int | None) -> str:
    """'<machine key id>/<device>/t<threads>': another machine or version gives another key."""
    from ..tuning.machine import key_id, machine_key

    kind = device.split(":")[0]
    return f"{key_id(machine_key(device if kind == 'cuda' else 'cpu'))}/{device}/t{threads or 0}"


def _read_cache(path: Path, log) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(
                data.get("entries"), dict):
            raise ValueError("not a roofline cache of this version")
        return data["entries"]
    except (OSError, ValueError) as e:
        log(f"roofline: ignoring unreadable cache {path} ({e}); it will be rewritten")
        return {}


def _write_cache(path: Path, entries: dict, log):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True),
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a benchmark
        log(f"roofline: could not write the cache {path} ({e.strerror or e}); the numbers are not kept")


def cached(device: str, threads: int | None, log=None) -> Roofline | None:
    """The cached roofline of this machine for (device, threads), or None."""
    e = _read_cache(cache_path(), log or (lambda msg: None)).get(entry_key(device, threads))
    return None if e is None else _from_entry(e)


def store(roof: Roofline, log=None):
    """Keep a roofline in the cache (replacing the entry of the same machine, device and threads)."""
    from ..tuning.machine import machine_key

    log = log or _stderr
    path = cache_path()
    entries = _read_cache(path, lambda msg: None)  # (an unreadable cache was reported when it was read)
    kind = roof.device.split(":")[0]
    e = {k: v for k, v in roof.to_json().items() if k not in ("source", "ridge_flop_per_byte")}
    e["machine"] = machine_key(roof.device if kind == "cuda" else "cpu")
    entries[entry_key(roof.device, roof.threads)] = e
    _write_cache(path, entries, log)


def _from_entry(e: dict) -> Roofline:
    try:
        r = Roofline(device=str(e["device"]), threads=e.get("threads"), peak_gflops=float(e["peak_gflops"]),
                     read_gbs=float(e["read_gbs"]), measured_at=str(e.get("measured_at", "")), source="cache",
                     details=dict(e.get("details") or {}))
    except (KeyError, TypeError, ValueError):
        return None
    if not (r.peak_gflops > 0 and r.read_gbs > 0):
        return None
    return r


def _stderr(msg: str):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def get(device: str = "cpu", threads: int | None = None, remeasure: bool = False, log=None, **sizes) -> Roofline:
    """The roofline of this machine for a device (and Numba thread count on the CPU): from the
    cache, or measured now (a few seconds) and cached. sizes: see measure_cpu / measure_cuda."""
    log = log or _stderr
    if not remeasure:
        r = cached(device, threads, log)
        if r is not None:
            return r
    log(f"roofline: measuring {device}{'' if threads is None else f' with {threads} threads'} "
        f"(peak sgemm and read bandwidth; once, kept in {cache_path()})")
    r = measure_cuda(device, **sizes) if device.startswith("cuda") else measure_cpu(threads, **sizes)
    store(r, log)
    return r


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- CPU
def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _check_host_memory(nbytes: int, what: str):
    avail = available_host_bytes()
    if avail is not None and nbytes > 0.8 * avail:
        raise InputError(f"{what}: needs {nbytes / 2 ** 30:.2f} GiB of memory, this machine has "
                         f"{avail / 2 ** 30:.2f} GiB available")


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def measure_cpu(threads: int | None = None, gemm_shapes=None, read_mib: float = CPU_READ_MIB,
                repeat: int = 7) -> Roofline:
    """Peak sgemm GFLOP/s (nbformer's GEMM; the best of a few shapes, M,K,N each, since which
    shape is fastest depends on the caches and the blocking) and read GB/s (a parallel sum over
    read_mib MiB) with `threads` Numba threads (None: the current count)."""
    import numpy as np

    from ..kernels.cpu.gemm import auto_blocks, matmul_nn
    from .env import current_threads, set_threads

    set_threads(threads if threads is not None else current_threads())
    threads = current_threads()
    shapes = [tuple(int(d) for d in sh) for sh in (gemm_shapes or CPU_GEMM_SHAPES)]
    biggest = max(4 * (M * K + K * N + M * N) for M, K, N in shapes)
    _check_host_memory(int(biggest + read_mib * 2 ** 20), "roofline measurement")
    rng = np.random.default_rng(0)
    best_rate, best_shape, t_gemm = 0.0, None, None
    for M, K, N in shapes:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        blocks = auto_blocks(M, N)  # the blocks the model's GEMMs get at this shape
        matmul_nn(c, a, b, *blocks)  # warm-up (compile or cache load, first touch)
        t = _best(lambda: matmul_nn(c, a, b, *blocks), repeat)
        rate = 2.0 * M * K * N / t / 1e9
        if rate > best_rate:
            best_rate, best_shape, t_gemm = rate, (M, K, N), t
    a = b = c = None  # (free the GEMM operands before the read buffer is made)
    x = np.ones(max(1, int(read_mib * 2 ** 20) // 4), np.float32)
    partial = np.empty(64 * max(1, threads), np.float32)
    from ._stream import stream_sum as read

    read(x, partial)
    if abs(float(partial.sum(dtype=np.float64)) - x.size) > 1e-3 * x.size:
        raise NbformerError("roofline: the read-bandwidth kernel summed to a wrong value")  # pragma: no cover
    t_read = _best(lambda: read(x, partial), max(2 * repeat, 5))
    M, K, N = best_shape
    return Roofline(device="cpu", threads=threads, peak_gflops=best_rate,
                    read_gbs=x.nbytes / t_read / 1e9, measured_at=_now(),
                    details={"gemm": f"sgemm {M}x{K}x{N} (nbformer matmul_nn, gemm.auto_blocks; the fastest of "
                                     f"{', '.join('x'.join(map(str, sh)) for sh in shapes)}), best of {repeat}",
                             "gemm_s": t_gemm, "read": f"parallel sum of {x.nbytes / 2 ** 20:.0f} MiB, best of "
                                                        f"{max(2 * repeat, 5)}", "read_s": t_read})


# ---------------------------------------------------------------- CUDA
def cuda_timer(dev):
    """-> time_it(fn, inner) giving seconds per call of fn on the GPU: CUDA events around `inner`
    back-to-back launches (wall clock + synchronize under the simulator, whose events are dummies)."""
    from ..kernels.cuda._jit import SIMULATOR, cuda

    def time_it(fn, inner=1):
        if SIMULATOR:
            dev.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            dev.synchronize()
            return (time.perf_counter() - t0) / inner
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return cuda.event_elapsed_time(start, end) / 1e3 / inner

    return time_it


def measure_cuda(device: str = "cuda", gemm_n: int = CUDA_GEMM_N, read_mib: float = CUDA_READ_MIB,
                 repeat: int = 3, read_threads: int = 256, tile_candidates: bool = True) -> Roofline:
    """Peak sgemm GFLOP/s (nbformer's tiled CUDA SGEMM, gemm_n^3) and read GB/s (a grid-stride sum
    over read_mib MiB of device memory) of one GPU."""
    import numpy as np

    from ..devices import get_device
    from ..kernels.cuda.linear import linear_forward

    dev = get_device(device)
    if dev.kind != "cuda":
        raise InputError(f"roofline: {device!r} is not a CUDA device")
    n = int(gemm_n)
    read_n = max(1, int(read_mib * 2 ** 20) // 4)
    dev.ensure_fits(3 * 4 * n * n, f"the roofline sgemm ({n}x{n}x{n})")
    time_it = cuda_timer(dev)
    rng = np.random.default_rng(0)
    x = dev.upload(rng.standard_normal((n, n), dtype=np.float32))
    w = dev.upload(rng.standard_normal((n, n), dtype=np.float32))
    out = dev.empty((n, n), np.float32)
    # the default tiles and the tuner's candidates (whatever is fastest on this GPU is its peak)
    from ..kernels.cuda import linear as cl

    configs = [{}]
    if tile_candidates:
        configs += [dict(c) for c in getattr(cl, "CANDIDATES", {}).get("tiled", [])]
    t_gemm, best_cfg = float("inf"), {}
    for cfg in configs:
        try:
            linear_forward(out, x, w, **cfg)
            dev.synchronize()
        except Exception:  # a candidate this GPU cannot run (resources, shared memory) is skipped
            if not cfg:
                raise  # (the default tiles must run)
            continue
        t = min(time_it(lambda: linear_forward(out, x, w, **cfg)) for _ in range(repeat))
        if t < t_gemm:
            t_gemm, best_cfg = t, cfg
    x = w = out = None  # (free the GEMM operands before the read buffer is made)
    dev.ensure_fits(4 * read_n, f"the roofline read buffer ({4 * read_n / 2 ** 20:.0f} MiB)")
    a = dev.upload(np.ones(read_n, np.float32))
    nblocks = max(1, min(4096, (read_n + read_threads - 1) // read_threads // 8))
    partial = dev.empty(nblocks, np.float32)
    from ._cuda_read import MAX_THREADS, read_sum as k

    if read_threads < 1 or read_threads > MAX_THREADS or read_threads & (read_threads - 1):
        raise InputError(f"roofline: read_threads must be a power of two <= {MAX_THREADS}, got {read_threads}")
    launch = lambda: k[nblocks, read_threads](a, partial)  # noqa: E731
    launch()
    dev.synchronize()
    total = float(dev.download(partial).astype(np.float64).sum())
    if abs(total - read_n) > 1e-3 * read_n:
        raise NbformerError(f"roofline: the CUDA read kernel summed to {total}, expected {read_n}")
    t_read = min(time_it(launch) for _ in range(max(repeat, 5)))
    name = getattr(dev, "gpu_name", device)
    return Roofline(device=dev.name, threads=None, peak_gflops=2.0 * n ** 3 / t_gemm / 1e9,
                    read_gbs=4.0 * read_n / t_read / 1e9, measured_at=_now(),
                    details={"gpu": name, "gemm": f"sgemm {n}x{n}x{n} (nbformer tiled CUDA SGEMM, no tensor "
                                                  f"cores; tiles {best_cfg or 'default'}), best of {repeat}",
                             "gemm_s": t_gemm,
                             "read": f"grid-stride sum of {4 * read_n / 2 ** 20:.0f} MiB, {nblocks} blocks x "
                                     f"{read_threads} threads, best of {max(repeat, 5)}", "read_s": t_read})


# ---------------------------------------------------------------- plot
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NbformerError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None
    return plt


def plot(path, rooflines: list, points: list):
    """Draw the roofline(s) (log-log: arithmetic intensity in FLOP/byte vs GFLOP/s, ridge points
    marked) with the benchmarked kernels on them, into an image file.

    points: dicts with 'label', 'intensity' (FLOP/byte), 'gflops' and 'roof' (index into rooflines)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise InputError(f"--plot {path}: expected a .png, .svg, .pdf or .jpg file name")
    if not path.parent.exists():
        raise InputError(f"--plot {path}: the directory {path.parent} does not exist")
    plt = _pyplot()
    import math

    ais = [p["intensity"] for p in points if p["intensity"] > 0] + [r.ridge for r in rooflines]
    lo = 10 ** math.floor(math.log10(min(ais) / 4))
    hi = 10 ** math.ceil(math.log10(max(ais) * 4))
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_steps = 200
    xs = [lo * (hi / lo) ** (i / n_steps) for i in range(n_steps + 1)]
    for i, r in enumerate(rooflines):
        c = colors[i % len(colors)]
        ax.plot(xs, [r.attainable(x) for x in xs], color=c, lw=2,
                label=f"{r.label()}: {r.peak_gflops:,.1f} GFLOP/s, {r.read_gbs:,.1f} GB/s")
        ax.plot([r.ridge], [r.peak_gflops], "o", color=c, ms=6, mfc="white")
        ax.annotate(f"ridge {r.ridge:.2f} FLOP/B", (r.ridge, r.peak_gflops), textcoords="offset points",
                    xytext=(6, -14), fontsize=8, color=c)
    # one marker per kernel (the same kernel on two rooflines: same marker, the roofline's colour),
    # named in a legend of their own (labels written beside the points overlap when they cluster)
    markers = "osD^v<>pP*Xhd8"
    kinds = list(dict.fromkeys(p["label"] for p in points))
    for p in points:
        c = colors[p.get("roof", 0) % len(colors)]
        ax.plot([max(p["intensity"], lo)], [max(p["gflops"], 1e-9)], markers[kinds.index(p["label"]) % len(markers)],
                color=c, ms=8, mec="black", mew=0.6, ls="none")
    roof_legend = ax.legend(fontsize=8, loc="lower right")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[i % len(markers)], color="none", mfc="lightgray", mec="black", ms=8,
                      label=k) for i, k in enumerate(kinds)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.add_artist(roof_legend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ymin = min([p["gflops"] for p in points if p["gflops"] > 0] + [r.read_gbs * lo for r in rooflines])
    ax.set_ylim(ymin / 3, max(r.peak_gflops for r in rooflines) * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, compulsory traffic)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("nbformer kernels on this machine's measured roofline")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise InputError(f"--plot {path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path
