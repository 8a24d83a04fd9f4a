"""One kernel at one shape: time, FLOPs, bytes, GFLOP/s, GB/s and the fraction of the roofline.

Each family below names its shape dimensions, builds its arrays (random inputs; outputs filled
with NaN so a launcher that writes nothing is caught: after the warm-up every output must hold
numbers) and calls the launcher of nbformer/kernels/<device>/ with the same signature the
executor uses. FLOPs follow the usual conventions (a multiply-add is 2 FLOPs; linear 2*M*K*N plus
M*N for the bias, its activation not counted; attention counts its two matmuls, 4*D per visible
query-key pair, exactly, causal masks included; the backward its five, 10*D per pair; normalisation,
softmax, loss and Adam count their arithmetic per element, exp and sqrt as 1). Bytes are the
compulsory traffic: every input read once and every output written once, so GB/s is a lower
bound of the traffic a kernel really moves, and a shape that fits in cache can show more than the
DRAM bandwidth of the roofline.

Timing (the habits of Kernel Tuner, Triton's do_bench and llm.c's dev/cuda): one warm-up call
(compiling or loading the compiled kernel; its excess over a steady call is reported as
compile_s), then `inner` back-to-back calls per sample, chosen so a sample lasts at least
min_sample_s (calls of a few microseconds are otherwise dominated by the clock), `repeat`
samples; the median per call is the time and half the interquartile range its spread. On CUDA
the samples are timed with CUDA events.
"""
from __future__ import annotations

import importlib
import inspect
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GraphError, InputError, NbformerError
from .timing import Samples

ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")


@dataclass
class Case:
    """A kernel ready to run: call() launches it once on prepared buffers."""

    family: str
    shape: dict  # dimension name -> size
    options: dict
    flops: int
    bytes: int
    call: object
    outputs: list  # (name, array) pairs checked for NaN after the warm-up
    keep: list = field(default_factory=list)  # every array, kept alive while the case is


@dataclass
class Family:
    name: str
    dims: tuple  # accepted dimension-name tuples (one per arity), e.g. (("B","H","T","D"), ...)
    module: str  # the kernels/<device>/<module>.py file
    launcher: str
    doc: str
    build: object  # build(env, sizes, options) -> Case
    options: tuple = ()  # the option names this family reads ('causal', 'act')

    def usage(self) -> str:
        return " or ".join(",".join(d) for d in self.dims)


class _Env:
    """Allocation on the benchmark's device and the launcher to call."""

    def __init__(self, dev, family: Family, params: dict):
        self.dev, self.family = dev, family
        self.rng = np.random.default_rng(0)
        mod = importlib.import_module(f"nbformer.kernels.{dev.kind}.{family.module}")
        fn = getattr(mod, family.launcher, None)
        if fn is None:
            raise InputError(f"--kernel {family.name}: there is no {family.launcher} kernel for device "
                             f"{dev.name} yet (nbformer/kernels/{dev.kind}/{family.module}.py)")
        self.launcher = _bind_params(fn, family, params, dev)
        self.arrays = []
        self.nbytes = 0

    def _put(self, host):
        a = host if self.dev.kind == "cpu" else self.dev.upload(host)
        self.arrays.append(a)
        return a

    def randn(self, *shape, scale=1.0):
        return self._put((self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)))

    def const(self, host):
        return self._put(np.ascontiguousarray(host))

    def out(self, *shape, dtype=np.float32):
        """An output buffer filled with NaN (float) or -1 (int)."""
        fill = np.nan if np.dtype(dtype).kind == "f" else -1
        return self._put(np.full(shape, fill, dtype=dtype))

    def case(self, sizes, options, flops, nbytes, call, outputs) -> Case:
        return Case(self.family.name, sizes, options, int(flops), int(nbytes), call, outputs, list(self.arrays))


def _bind_params(fn, family, params, dev):
    """--param NAME=VALUE overrides passed to the launcher as keywords (tile sizes, threads...),
    only those its signature takes."""
    if not params:
        return fn
    sig = inspect.signature(fn)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    named = [n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY or
             (p.default is not p.empty and p.kind == p.POSITIONAL_OR_KEYWORD)]
    for k in params:
        if not takes_any and k not in named:
            raise InputError(f"--param {k}: the {family.name} kernel on {dev.kind} does not take it "
                             f"(it takes: {', '.join(named) or 'none'})")

    def bound(*args, **kw):
        return fn(*args, **kw, **params)

    return bound


def _visible_pairs(Tq: int, Tk: int, causal: bool) -> int:
    """Query-key pairs attention computes per (batch, head): bottom-right causal, as the kernels."""
    if not causal:
        return Tq * Tk
    total = 0
    off = Tk - Tq
    # query i sees keys j <= i + off, i.e. min(Tk, max(0, i + off + 1)) keys
    first_full = max(0, Tk - off - 1)  # from this row on every key is seen
    for i in range(min(Tq, first_full)):
        total += max(0, min(Tk, i + off + 1))
    total += max(0, Tq - first_full) * Tk
    return total


def _attn_sizes(s):
    if "T" in s:
        return s["B"], s["H"], s["T"], s["T"], s["D"]
    return s["B"], s["H"], s["Tq"], s["Tk"], s["D"]


# ---------------------------------------------------------------- families
def _linear(env, s, o):
    M, K, N = s["M"], s["K"], s["N"]
    act = o.get("act", "none")
    x = env.randn(M, K)
    w = env.randn(N, K, scale=1 / math.sqrt(K))
    b = env.randn(N)
    out = env.out(M, N)
    flops = 2 * M * K * N + M * N
    nbytes = 4 * (M * K + N * K + N + M * N)
    return env.case(s, {"act": act}, flops, nbytes, lambda: env.launcher(out, x, w, b, act), [("out", out)])


def _attention(env, s, o):
    B, H, Tq, Tk, D = _attn_sizes(s)
    causal = bool(o.get("causal", False))
    C = H * D
    q = env.randn(B, Tq, C)
    kv = env.randn(B, Tk, 2 * C)
    mask = env.const(np.ones((B, Tk), np.uint8))
    out = env.out(B, Tq, C)
    lse = env.out(B, H, Tq)
    scale = 1.0 / math.sqrt(D)
    pairs = B * H * _visible_pairs(Tq, Tk, causal)
    flops = 4 * D * pairs
    nbytes = 4 * (2 * B * Tq * C + 2 * B * Tk * C + B * H * Tq) + B * Tk
    fn = env.launcher
    return env.case(s, {"causal": causal}, flops, nbytes,
                    lambda: fn(out, lse, q, 0, kv, 0, C, mask, H, D, causal, scale),
                    [("out", out), ("lse", lse)])


def _attention_backward(env, s, o):
    B, H, Tq, Tk, D = _attn_sizes(s)
    causal = bool(o.get("causal", False))
    C = H * D
    q = env.randn(B, Tq, C)
    kv = env.randn(B, Tk, 2 * C)
    mask = env.const(np.ones((B, Tk), np.uint8))
    out = env.out(B, Tq, C)
    lse = env.out(B, H, Tq)
    scale = 1.0 / math.sqrt(D)
    fwd = getattr(importlib.import_module(f"nbformer.kernels.{env.dev.kind}.attention"), "attention_forward")
    fwd(out, lse, q, 0, kv, 0, C, mask, H, D, causal, scale)  # what the backward reads
    dout = env.randn(B, Tq, C)
    dq = env.out(B, Tq, C)
    dkv = env.out(B, Tk, 2 * C)
    delta = env.out(B, H, Tq)
    pairs = B * H * _visible_pairs(Tq, Tk, causal)
    flops = 10 * D * pairs
    nbytes = 4 * (3 * B * Tq * C + 2 * B * Tk * C + B * H * Tq  # read q, out, dout, kv, lse
                  + B * Tq * C + 2 * B * Tk * C + B * H * Tq) + B * Tk  # write dq, dkv, delta; mask
    fn = env.launcher
    return env.case(s, {"causal": causal}, flops, nbytes,
                    lambda: fn(dq, dkv, delta, dout, out, lse, q, 0, kv, 0, C, mask, H, D, causal, scale),
                    [("dq", dq), ("dkv", dkv)])


def _layernorm(env, s, o):
    N, C = s["N"], s["C"]
    x, w, b = env.randn(N, C), env.randn(C), env.randn(C)
    out, mean, rstd = env.out(N, C), env.out(N), env.out(N)
    return env.case(s, {}, 8 * N * C, 4 * (2 * N * C + 2 * C + 2 * N),
                    lambda: env.launcher(out, mean, rstd, x, w, b, 1e-5), [("out", out), ("rstd", rstd)])


def _rmsnorm(env, s, o):
    N, C = s["N"], s["C"]
    x, w = env.randn(N, C), env.randn(C)
    out, rstd = env.out(N, C), env.out(N)
    return env.case(s, {}, 4 * N * C, 4 * (2 * N * C + C + N),
                    lambda: env.launcher(out, rstd, x, w, 1e-6), [("out", out), ("rstd", rstd)])


def _softmax(env, s, o):
    N, V = s["N"], s["V"]
    x = env.randn(N, V)
    out = env.out(N, V)
    return env.case(s, {}, 5 * N * V, 8 * N * V, lambda: env.launcher(out, x), [("out", out)])


def _cross_entropy(env, s, o):
    N, V = s["N"], s["V"]
    logits = env.randn(N, V)
    targets = env.const(env.rng.integers(0, V, N).astype(np.int64))
    losses, lse = env.out(N), env.out(N)
    return env.case(s, {}, 4 * N * V, 4 * N * V + 8 * N + 8 * N,
                    lambda: env.launcher(losses, lse, logits, targets, 0.0, -100), [("losses", losses), ("lse", lse)])


def _embedding(env, s, o):
    B, T, C = s["B"], s["T"], s["C"]
    V = s.get("V", 50257)
    ids = env.const(env.rng.integers(0, V, (B, T)).astype(np.int64))
    pos = env.const(np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)))
    wte, wpe = env.randn(V, C), env.randn(T, C)
    out = env.out(B, T, C)
    return env.case(s, {}, B * T * C, 4 * 3 * B * T * C + 16 * B * T,
                    lambda: env.launcher(out, ids, wte, pos, wpe), [("out", out)])


def _adam(env, s, o):
    N = s["N"]
    p, g = env.randn(N), env.randn(N)
    m = env.const(np.zeros(N, np.float32))
    v = env.const(np.zeros(N, np.float32))
    return env.case(s, {}, 13 * N, 28 * N,
                    lambda: env.launcher(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, True), [("params", p)])


FAMILIES = {f.name: f for f in (
    Family("linear", (("M", "K", "N"),), "linear", "linear_forward",
           "out (M, N) = act(x (M, K) @ w.T + b), w (N, K) in nn.Linear layout", _linear, ("act",)),
    Family("attention", (("B", "H", "T", "D"), ("B", "H", "Tq", "Tk", "D")), "attention", "attention_forward",
           "FlashAttention-style forward, H heads of size D (Tq queries over Tk keys; --causal)",
           _attention, ("causal",)),
    Family("attention_backward", (("B", "H", "T", "D"), ("B", "H", "Tq", "Tk", "D")), "attention_backward",
           "attention_backward", "dQ, dK, dV of attention (--causal)", _attention_backward, ("causal",)),
    Family("layernorm", (("N", "C"),), "layernorm", "layernorm_forward", "LayerNorm of N rows of C", _layernorm),
    Family("rmsnorm", (("N", "C"),), "rmsnorm", "rmsnorm_forward", "RMSNorm of N rows of C", _rmsnorm),
    Family("softmax", (("N", "V"),), "softmax", "softmax_forward", "softmax of N rows of V", _softmax),
    Family("cross_entropy", (("N", "V"),), "loss", "cross_entropy_forward",
           "fused log-softmax + NLL of N rows of V logits", _cross_entropy),
    Family("embedding", (("B", "T", "C"), ("B", "T", "C", "V")), "embedding", "embedding_forward",
           "token (V rows, default 50257) + position embedding gather, out (B, T, C)", _embedding),
    Family("adam", (("N",),), "optim", "adam_step", "one fused AdamW update of N parameters", _adam),
)}


# ---------------------------------------------------------------- parsing
def family(name: str) -> Family:
    f = FAMILIES.get(str(name).strip().lower().replace("-", "_"))
    if f is None:
        raise InputError(f"--kernel {name!r}: unknown kernel family (known: {', '.join(FAMILIES)})")
    return f


def parse_shape(fam: Family, text: str) -> dict:
    """'1,12,256,64' -> {'B': 1, 'H': 12, 'T': 256, 'D': 64} for the family's dimensions."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--shape {text!r}: expected comma-separated integers ({fam.name} takes "
                         f"{fam.usage()})") from None
    for dims in fam.dims:
        if len(dims) == len(vals):
            bad = [f"{d}={v}" for d, v in zip(dims, vals) if v < 1]
            if bad:
                raise InputError(f"--shape {text!r}: sizes must be positive integers ({', '.join(bad)})")
            return dict(zip(dims, vals))
    arities = " or ".join(str(len(d)) for d in fam.dims)
    raise InputError(f"--shape {text!r}: {fam.name} takes {arities} sizes ({fam.usage()}), got {len(vals)}")


def parse_params(items) -> dict:
    """['block_q=64', 'threads=128'] -> {'block_q': 64, 'threads': 128} (ints, floats, else strings)."""
    out = {}
    for it in items or ():
        k, sep, v = str(it).partition("=")
        k = k.strip()
        if not sep or not k.isidentifier():
            raise InputError(f"--param {it!r}: expected NAME=VALUE (e.g. block_q=64)")
        v = v.strip()
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


# ---------------------------------------------------------------- building and timing
def build(fam: Family, sizes: dict, dev, options: dict | None = None, params: dict | None = None) -> Case:
    """Allocate the buffers of one kernel call on dev (after checking they fit) -> Case."""
    options = {k: v for k, v in (options or {}).items() if k in fam.options}
    act = options.get("act", "none")
    if act not in ACTS:
        raise InputError(f"--act {act!r}: expected one of {', '.join(ACTS)}")
    need = _footprint(fam, sizes)
    what = f"--kernel {fam.name} --shape {','.join(str(v) for v in sizes.values())}"
    if dev.kind == "cpu":
        from .roofline import _check_host_memory

        _check_host_memory(2 * need, what)  # (random inputs are made on the host first)
    else:
        dev.ensure_fits(need, what)
    env = _Env(dev, fam, params or {})
    return fam.build(env, sizes, options)


def _footprint(fam, s) -> int:
    """Bytes of the buffers a case allocates (a close upper bound, checked before allocating)."""
    n = fam.name
    if n == "linear":
        return 4 * (s["M"] * s["K"] + s["N"] * s["K"] + s["N"] + s["M"] * s["N"])
    if n.startswith("attention"):
        B, H, Tq, Tk, D = _attn_sizes(s)
        one = 4 * (2 * B * Tq * H * D + 2 * B * Tk * H * D + B * H * Tq) + B * Tk
        return one * (2 if n == "attention_backward" else 1) + 4 * B * Tq * H * D
    if n in ("layernorm", "rmsnorm"):
        return 4 * (2 * s["N"] * s["C"] + 2 * s["C"] + 2 * s["N"])
    if n in ("softmax", "cross_entropy"):
        return 8 * s["N"] * s["V"] + 16 * s["N"]
    if n == "embedding":
        return 4 * (s.get("V", 50257) + s["T"] + s["B"] * s["T"]) * s["C"] + 16 * s["B"] * s["T"]
    if n == "adam":
        return 16 * s["N"]
    return 0  # pragma: no cover


def _nan_outputs(case: Case, dev) -> list:
    bad = []
    for name, a in case.outputs:
        host = a if dev.kind == "cpu" else dev.download(a)
        if np.isnan(host).any():
            bad.append(name)
    return bad


def time_case(case: Case, dev, repeat: int = 5, min_sample_s: float = 0.01, max_inner: int = 100_000) -> Samples:
    """Warm-up, check the outputs were written, then `repeat` samples of `inner` calls each
    -> Samples of seconds per call (extra: inner, warm-up call seconds)."""
    sync = dev.synchronize
    t0 = time.perf_counter()
    case.call()
    sync()
    first = time.perf_counter() - t0
    bad = _nan_outputs(case, dev)
    if bad:
        raise GraphError(f"--kernel {case.family}: the kernel left {', '.join(bad)} unwritten (NaN after a call)")
    if dev.kind == "cpu":
        def timed(inner):
            t = time.perf_counter()
            for _ in range(inner):
                case.call()
            return (time.perf_counter() - t) / inner
    else:
        from .roofline import cuda_timer

        timer = cuda_timer(dev)

        def timed(inner):
            return timer(case.call, inner)
    one = timed(1)  # a steady call, to size the samples
    inner = int(min(max_inner, max(1, math.ceil(min_sample_s / max(one, 1e-9)))))
    secs = [timed(inner) for _ in range(repeat)]
    s = Samples(secs, warmup_s=first)
    s.extra["inner"] = inner
    return s


def describe_families() -> str:
    return "\n".join(f"  {f.name:<19} --shape {f.usage():<18} {f.doc}" for f in FAMILIES.values())


# ---------------------------------------------------------------- tuned configurations
_TUNED_OPS = {"linear": "linear", "attention": "attention"}  # bench family -> graph op the tuner serves


def tuned_params(fam: Family, sizes: dict, options: dict, device_kind: str) -> tuple:
    """The launcher keywords `nbformer tune` left in this machine's tuning cache for this kernel at
    this shape, found as the executor finds them (exact shape bucket, else the nearest tuned one
    that is valid here; NBFORMER_TUNING=off: the defaults) -> (kwargs, config, source)."""
    from ..tuning import runtime, space

    op = _TUNED_OPS.get(fam.name)
    tf = None if op is None else space.family_for(op, "forward", device_kind)
    if tf is None:
        names = sorted(f.name for f in space.families(device_kind))
        raise InputError(f"--tuned: the {fam.name} kernel has no tunables on {device_kind} (tuned families: "
                         f"{', '.join(names) or 'none'})")
    if fam.name == "linear":  # the tuner's N rows, K inputs, M outputs; the benchmark's layer has a bias
        case = {"N": sizes["M"], "K": sizes["K"], "M": sizes["N"], "act": options.get("act", "none"), "bias": True,
                "residual": False}
    else:
        B, H, Tq, Tk, D = _attn_sizes(sizes)
        case = {"B": B, "NH": H, "NKV": H, "HS": D, "Tq": Tq, "Tk": Tk, "causal": bool(options.get("causal"))}
    default = tf.defaults(case)
    if runtime.mode() == "off":
        return {}, default, f"default ({runtime.ENV}=off)"
    entry, how = runtime.cache_for(device_kind).lookup(tf, tf.bucket(case))
    if entry is None:
        return {}, default, f"default ({how})"
    config = {**default, **{k: v for k, v in entry["config"].items() if k in default}}
    if how != "exact":
        why = tf.check(config, case)
        if why:
            return {}, default, f"default (nearest tuned bucket invalid here: {why})"
    return tf.launch_kwargs(config), config, "cache" if how == "exact" else f"cache ({how})"


# ---------------------------------------------------------------- rows
SIM_ENV = "NBFORMER_BENCH_SIMULATOR"


def bench_device(name):
    """The device to benchmark on. CUDA needs a real GPU: under Numba's CUDA simulator the times
    would be those of Python threads, so it is refused (unless NBFORMER_BENCH_SIMULATOR=1, which
    the tests set to exercise the CUDA code path)."""
    import os

    from ..devices import get_device

    dev = get_device(name)
    if dev.kind == "cuda":
        from numba import config

        if config.ENABLE_CUDASIM and os.environ.get(SIM_ENV) != "1":
            raise InputError(f"--device {dev.name}: Numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1), so "
                             f"there is no GPU to time; benchmark CUDA kernels on a machine with an NVIDIA GPU")
    return dev


def kernel_row(case: Case, dev, threads: dict, s: Samples, roof) -> dict:
    med = s.median
    gflops = case.flops / med / 1e9
    gbs = case.bytes / med / 1e9
    ai = case.flops / case.bytes if case.bytes else float("inf")
    attain = roof.attainable(ai)
    return {
        "kernel": case.family, "shape": ",".join(str(v) for v in case.shape.values()), "dims": dict(case.shape),
        "options": dict(case.options), "device": dev.name,
        "n_threads": threads.get("n_threads") if dev.kind == "cpu" else None,
        "blas_threads": threads.get("blas_threads") if dev.kind == "cpu" else None,
        "repetitions": s.n, "inner": s.extra.get("inner", 1),
        "time_us": med * 1e6, "spread_us": s.spread * 1e6, "min_us": s.min * 1e6, "max_us": s.max * 1e6,
        "compile_s": round(max(0.0, s.warmup_s - med), 6),
        "flops": case.flops, "bytes": case.bytes, "gflops": gflops, "gbs": gbs, "intensity": ai,
        "roof_gflops": attain, "roof_fraction": gflops / attain if attain > 0 else 0.0,
        "bound": "compute" if ai >= roof.ridge else "memory",
        "peak_gflops": roof.peak_gflops, "peak_gbs": roof.read_gbs,
    }


def run(specs: list, device, threads_list: list, repeat: int, roofline, params: dict | None = None,
        on_row=None, on_roofline=None, min_sample_s: float = 0.01, progress=None, tuned: bool = False) -> list:
    """specs: (Family, sizes, options) triples. roofline(device_name, threads) -> Roofline.
    Rows of the cross product threads x specs; on_roofline(roof) is called once per roofline
    used, on_row(row) as each row is done, progress(i, n, what) before each row starts.
    params: launcher keywords for every kernel; tuned: each kernel with the configuration of this
    machine's tuning cache (tuned_params) instead."""
    from .env import current_threads, set_threads

    if tuned and params:
        raise InputError("--tuned and --param: pass one (--tuned takes the launcher keywords from the tuning cache)")
    dev = bench_device(device)
    before = current_threads()
    try:
        return _run(specs, dev, threads_list, repeat, roofline, params, on_row, on_roofline, min_sample_s,
                    progress, tuned)
    finally:
        set_threads(before)  # the caller's thread count again


def _run(specs, dev, threads_list, repeat, roofline, params, on_row, on_roofline, min_sample_s, progress, tuned):
    from .env import current_threads, set_threads

    rows, seen = [], set()
    thread_runs = threads_list if dev.kind == "cpu" else [None]
    total = len(thread_runs) * len(specs)
    for t in thread_runs:
        threads = set_threads(t if t is not None else current_threads())
        roof = roofline(dev.name, threads["n_threads"] if dev.kind == "cpu" else None)
        key = (roof.device, roof.threads)
        if key not in seen:
            seen.add(key)
            if on_roofline is not None:
                on_roofline(roof)
        for fam, sizes, options in specs:
            if progress is not None:
                progress(len(rows), total, f"{fam.name} {','.join(str(v) for v in sizes.values())}"
                                           + ("" if t is None else f", {t} thread{'s' * (t != 1)}"))
            kw, tuning = params, None
            if tuned:
                kw, config, source = tuned_params(fam, sizes, options, dev.kind)
                tuning = {"config": config, "source": source}
            case = build(fam, sizes, dev, options, kw)
            try:
                s = time_case(case, dev, repeat, min_sample_s=min_sample_s)
            except NbformerError:
                raise
            except Exception as e:  # a launch the device refused (resources, a --param value the kernel rejects)
                what = f"--kernel {fam.name} --shape {','.join(str(v) for v in sizes.values())}"
                msg = " ".join(str(e).split())[:300]
                raise GraphError(f"{what} on {dev.name}: the kernel failed ({type(e).__name__}: {msg})") from None
            row = kernel_row(case, dev, threads, s, roof)
            if kw:
                row["params"] = dict(kw)
            if tuning is not None:
                row["tuned"] = tuning
            del case
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
