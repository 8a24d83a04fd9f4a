"""Tunable spaces: what each kernel family may change, within which limits, and what it costs in bits.

A `Family` is one launcher on one device kind (the CPU linear forward, the CUDA attention
forward, ...). It declares:

* its `Tunable`s: name, candidate values, default, and `bit_exact` (True: a change never alters
  the result bits, e.g. the CPU thread count, whose blocks are fixed; the validator then demands
  bit-identical output to the default config. False: it changes a reduction order or a GEMM call
  shape, e.g. a key-tile size of the online softmax; such candidates are validated against the
  float64 reference at the tests' tolerance and that is all they promise);
* `check(config, case)`: the constraints (scratch fits in L2, threads per block and shared memory
  within the device's limits, register tiles dividing the block tiles ...), a reason string when
  a candidate is invalid;
* `effective(config, case)`: configs that run identically at this shape (a query tile larger than
  the sequence) are timed once. A thread count is never merged with another, even above the number
  of work items: it sets the size of the parallel region, whose fork/join (and, on a loaded machine,
  the wait for a descheduled worker: ~12 ms measured on 2 busy cores) every call pays;
* `case_from_node(node, graph)`: the shapes a graph node runs at (None: not tunable, e.g. the
  training forward that keeps pre-activations);
* `bucket(case)`: the cache key of a shape (row counts rounded up to a power of two, model dims
  exact); `nearest` fields may differ when the exact bucket was not tuned;
* `workload(case, seed)`: seeded inputs on the device, the launcher call, the float64 reference;
* `launch_kwargs(config)`: the keywords the adapter passes to the launcher at run time.

Reduction chunks that fix the bits of a training reduction (kernels/cpu/linear.py, layernorm.py,
rmsnorm.py ROWS_PER_CHUNK, kernels/cuda/linear.py DB_ROWS) are deliberately not declared: they stay
fixed. The CUDA norm / softmax families' threads per block do shape their tree reductions: they are
declared bit-changing and validated at the tests' tolerance, which is all they promise.

Decoding attention: the keys a step attends grow with the session, so a decode node's case has
`Tk_max` (the cache's capacity) and the family lists `key_len_buckets` (powers of two up to it);
the runtime binds one config per key-length bucket and the adapter picks the one of the current
key length at each call (a dict lookup). `tuning_cases` gives the buckets `nbformer tune` tunes
(from DECODE_TUNE_MIN keys up to the capacity); shorter lengths use the nearest tuned bucket.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Tunable:
    name: str
    values: tuple
    default: object
    bit_exact: bool
    doc: str = ""


@dataclass
class Workload:
    """One shape of one family, ready to run: inputs live on the device; outputs are made fresh."""

    out_shapes: dict                     # name -> shape of every output the launcher writes
    run: object                          # run(outs: dict, config: dict) -> None (launch, not synchronised)
    reference: object                    # reference() -> {name: float64 array}, the oracle's answer
    tolerance: dict                      # name -> (atol, rtol), the tests' tolerances
    device: object                       # nbformer.devices.Device
    flops: float = 0.0
    bytes: float = 0.0
    compare_mask: dict = field(default_factory=dict)  # name -> bool mask of elements to check (None: all)

    def fresh_outputs(self) -> dict:
        """New output buffers filled with NaN, so that a config that writes nothing cannot pass."""
        outs = {}
        for k, shape in self.out_shapes.items():
            host = np.full(shape, np.nan, np.float32)
            outs[k] = host if self.device.kind == "cpu" else self.device.upload(host)
        return outs

    def download(self, arr):
        return arr if self.device.kind == "cpu" else self.device.download(arr)


def pow2_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _source_hash(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        spec = importlib.util.find_spec(m)
        if spec is None or spec.origin is None:
            h.update(f"<missing {m}>".encode())
            continue
        h.update(m.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def _cache_bytes(level: int, default: int) -> int:
    """CPU cache size of a level from sysfs (default when unknown)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == str(level) and \
                    (idx / "type").read_text().strip() in ("Unified", "Data"):
                s = (idx / "size").read_text().strip().upper()
                mult = {"K": 1024, "M": 1 << 20}.get(s[-1], 1)
                return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return default


def _l2_bytes() -> int:
    return _cache_bytes(2, 1 << 20)


COLD_LIMIT = 256 << 20  # at most this many bytes of input copies per workload
MAX_COPIES = 64  # (tiny inputs: a few copies already leave the L1/L2 and keep the set-up quick)


def rotating_copies(arrays_bytes: int, device_kind: str) -> int:
    """How many copies of a workload's large inputs to cycle through so that each call reads them
    from memory, not from a cache warmed by the previous call (as in a model, where every layer's
    weights are new): enough to span twice the last-level cache (CPU), or 1 on CUDA (its L2 is
    small next to a model's weights, and the GPU's own timing is what counts)."""
    if device_kind != "cpu" or arrays_bytes <= 0:
        return 1
    llc = _cache_bytes(3, 0) or _cache_bytes(2, 1 << 20)
    want = -(-2 * llc // arrays_bytes)
    return int(max(1, min(want, COLD_LIMIT // arrays_bytes, MAX_COPIES)))


def cpu_thread_values() -> tuple:
    """1, 2, 4, ... up to NUMBA_NUM_THREADS, and NUMBA_NUM_THREADS itself."""
    from numba import config

    n = max(1, int(config.NUMBA_NUM_THREADS))
    vals = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return tuple(sorted(set(vals + [n])))


class Family:
    name = ""         # kernel family, as on the command line: 'linear', 'attention'
    device = "cpu"    # device kind
    op = ""           # graph op and direction it serves
    direction = "forward"
    sources: tuple = ()  # modules whose source decides the tuned values (hashed into the cache key)
    nearest: tuple = ()  # bucket fields that may differ in a nearest-bucket lookup
    dtype = "f32"

    @property
    def key(self) -> str:
        return f"{self.device}.{self.name}"

    def tunables(self) -> tuple:
        raise NotImplementedError

    def tunable(self, name) -> Tunable:
        for t in self.tunables():
            if t.name == name:
                return t
        raise InputError(f"{self.key}: no tunable {name!r} (expected one of {[t.name for t in self.tunables()]})")

    def source_hash(self) -> str:
        h = getattr(self, "_hash", None)
        if h is None:
            h = self._hash = _source_hash(self.sources)
        return h

    def defaults(self, case) -> dict:
        return {t.name: t.default for t in self.tunables()}

    def candidates(self, case) -> list:
        """Every config of the grid, the default first, then by how many tunables differ from the
        default (one-at-a-time changes first): the first config of each `effective` class, the one
        kept, is then the one closest to the default, and a short budget covers the single changes."""
        ts = self.tunables()
        d = self.defaults(case)
        grid = [dict(zip([t.name for t in ts], vals)) for vals in itertools.product(*[t.values for t in ts])]
        grid.sort(key=lambda c: sum(c[k] != d.get(k) for k in c))  # stable: declared order within a rank
        return [d] + grid

    def check(self, config, case):
        """None if config is valid at this case, else the reason."""
        return None

    def effective(self, config, case):
        return tuple(sorted(config.items()))

    def bit_exact_change(self, config, default) -> bool:
        """True when config differs from default only in bit-exact tunables."""
        return all(t.bit_exact or config.get(t.name) == default.get(t.name) for t in self.tunables())

    def launch_kwargs(self, config) -> dict:
        return dict(config)

    def case_from_node(self, node, graph):
        return None

    def bucket(self, case) -> dict:
        raise NotImplementedError

    def describe(self, case) -> str:
        return ", ".join(f"{k}={v}" for k, v in case.items())

    def shape_defaults(self) -> dict:
        """The case fields of this family with defaults, for `nbformer tune --kernels NAME --shape K=V,...`
        (None where the field defaults to another one, e.g. attention's Tk to Tq)."""
        return dict(getattr(self, "SHAPE_DEFAULTS", {}))

    def tuning_cases(self, case) -> list:
        """The cases `nbformer tune` tunes for a node of this case (one, except decoding attention)."""
        return [case]

    def key_len_buckets(self, case):
        """None, or the key lengths (Tk values) a decoding node's config is chosen among at run time."""
        return None

    def workload(self, case, seed=0) -> Workload:
        raise NotImplementedError


def _dev(kind):
    from ..devices import get_device

    return get_device(kind)


# ---------------------------------------------------------------- linear (forward, inference)
def _linear_case_from_node(node, graph):
    if node.op != "linear" or node.direction != "forward" or "pre" in node.outputs:
        return None  # the training forward keeps fixed blocks (its backward reuses them)
    x = graph.tensors[node.inputs["x"]].shape
    w = graph.tensors[node.inputs["w"]].shape
    return {"N": int(np.prod(x[:-1], dtype=np.int64)), "K": int(x[-1]), "M": int(w[0]),
            "act": str(node.attrs.get("act", "none")), "bias": "b" in node.inputs,
            "residual": "residual" in node.inputs}


def _linear_bucket(case):
    return {"N": pow2_bucket(case["N"]), "K": case["K"], "M": case["M"], "act": case["act"],
            "bias": bool(case["bias"]), "residual": bool(case["residual"])}


def _linear_workload(case, seed, dev, launcher, kwargs_of):
    from ..reference.forward import linear as ref_linear

    N, K, M = case["N"], case["K"], case["M"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K), dtype=np.float32)
    w = (rng.standard_normal((M, K), dtype=np.float32) / np.float32(math.sqrt(K)))
    b = rng.standard_normal(M, dtype=np.float32) * np.float32(0.1) if case["bias"] else None
    r = rng.standard_normal((N, M), dtype=np.float32) if case["residual"] else None
    xd = dev.upload(x)
    # the weight is cycled through copies spanning twice the LLC: each call reads it from memory,
    # as every layer of a model does (a hot weight made decoding GEMVs look 2-3x faster than in a model)
    wds = [dev.upload(w if i == 0 else w.copy()) for i in range(rotating_copies(w.nbytes, dev.kind))]
    if dev.kind == "cpu":  # read-only, as a model binds them (the AMX path keeps their packs, as in a model)
        for wd in wds:
            wd.flags.writeable = False
    bd = None if b is None else dev.upload(b)
    rd = None if r is None else dev.upload(r)
    act = case["act"]
    turn = [0]

    def run(outs, config):
        wd = wds[turn[0] % len(wds)]
        turn[0] += 1
        launcher(outs["out"], xd, wd, bd, act, rd, **kwargs_of(config))

    def reference():
        return {"out": ref_linear(x, w, b, act, r)}

    # the tests' fp32-forward tolerance (1e-5), widened as sqrt(K / 64) for the longer dot products
    # of model shapes (the tests use K <= 64): fp32 rounding grows with the square root of K
    tol = 1e-5 * max(1.0, math.sqrt(K / 64.0))
    return Workload(out_shapes={"out": (N, M)}, run=run, reference=reference, tolerance={"out": (tol, tol)},
                    device=dev, flops=2.0 * N * K * M, bytes=4.0 * (N * K + M * K + N * M * (2 if r is not None else 1)))


def _too_many_threads(config) -> str | None:
    """The constraint every CPU family's `threads` tunable shares: at most NUMBA_NUM_THREADS."""
    from numba import config as nconfig

    if config["threads"] > nconfig.NUMBA_NUM_THREADS:
        return f"threads={config['threads']} > NUMBA_NUM_THREADS={nconfig.NUMBA_NUM_THREADS}"
    return None


def _gemm_block_tunables(what_cols: str, auto: bool = False, auto_doc: str = "both by shape, gemm.auto_blocks") -> tuple:
    """rows / cols / skinny_max_rows / threads of the CPU GEMM kernels (linear, linear_glu).
    auto: rows and cols also take "auto" (the launcher's default when both are: auto_doc)."""
    from ..kernels.cpu import gemm, linear

    a = ("auto",) if auto else ()
    return (
        Tunable("rows", a + (32, 64, 128, 256, 512), "auto" if auto else gemm.ROWS, False,
                "rows per GEMM block (row split: N >= 2*rows or the output width <= cols); other sgemm call shapes"),
        Tunable("cols", a + (64, 128, 256, 512, 1024), "auto" if auto else gemm.COLS, False,
                f"{what_cols} per block (column split){'; auto: ' + auto_doc if auto else ''}"),
        Tunable("skinny_max_rows", (0, 4, 8, 16, 32), linear.SKINNY_MAX_ROWS, False,
                "at most this many rows (>= 2) use the few-row kernel instead of sgemm"),
        Tunable("threads", cpu_thread_values(), max(cpu_thread_values()), True,
                "Numba threads for the call; blocks are fixed, so bits never change"),
    )


def _auto_as_none(config):
    """The launcher's keywords: "auto" blocks become None (the launcher then picks them by shape)."""
    return {k: (None if v == "auto" else v) for k, v in config.items()}


class CpuLinear(Family):
    SHAPE_DEFAULTS = {"N": 256, "K": 768, "M": 768, "act": "none", "bias": False, "residual": False}
    name, device, op = "linear", "cpu", "linear"
    sources = ("nbformer.kernels.cpu.linear", "nbformer.kernels.cpu.gemm", "nbformer.kernels.cpu.gemm_amx")
    nearest = ("N",)
    SCRATCH_LIMIT = 64 << 20  # bytes of GEMM block scratch per thread

    def tunables(self):
        return _gemm_block_tunables("columns", auto=True)

    def launch_kwargs(self, config):
        return _auto_as_none(config)

    @staticmethod
    def _rows_cols(config, case):
        from ..kernels.cpu.linear import resolve_blocks

        kw = _auto_as_none(config)
        return resolve_blocks(case["N"], case["M"], kw["rows"], kw["cols"])

    def check(self, config, case):
        N, M = case["N"], case["M"]
        if why := _too_many_threads(config):
            return why
        rows, cols = self._rows_cols(config, case)
        by_rows = N >= 2 * rows or M <= cols
        scratch = 4 * (min(rows, N) * M if by_rows else N * min(cols, M))
        if scratch > self.SCRATCH_LIMIT:
            return f"{scratch / 2**20:.0f} MiB of block scratch per thread (> {self.SCRATCH_LIMIT >> 20} MiB)"
        return None

    def effective(self, config, case):
        from ..kernels.cpu import gemm_amx

        N, M = case["N"], case["M"]
        if (config["rows"] == config["cols"] == "auto" and gemm_amx.available()
                and gemm_amx.worth(N, M, case["K"])):  # linear_forward's AMX path: no blocks to choose
            return ("amx", config["threads"])
        rows, cols = self._rows_cols(config, case)
        if N >= 2 * rows or M <= cols:
            return ("rows", min(rows, N), config["threads"])
        return ("cols", min(cols, M), 2 <= N <= config["skinny_max_rows"], config["threads"])

    def case_from_node(self, node, graph):
        return _linear_case_from_node(node, graph)

    def bucket(self, case):
        return _linear_bucket(case)

    def describe(self, case):
        extra = "".join(s for s, on in ((" +b", case["bias"]), (" +res", case["residual"])) if on)
        act = "" if case["act"] == "none" else f" {case['act']}"
        return f"linear {case['N']}x{case['K']} @ {case['K']}x{case['M']}{act}{extra}"

    def workload(self, case, seed=0):
        from ..kernels.cpu.linear import linear_forward

        return _linear_workload(case, seed, _dev("cpu"), linear_forward, self.launch_kwargs)


# ---------------------------------------------------------------- attention (forward, inference)
def _attention_case_from_node(node, graph):
    if node.op != "attention" or node.direction != "forward" or float(node.attrs.get("dropout_p", 0.0)) > 0:
        return None
    q = graph.tensors[node.inputs["q"]].shape
    kv = graph.tensors[node.inputs["kv"]].shape
    a = node.attrs
    NH = int(a["n_heads"])
    NKV = int(a.get("n_kv_heads") or NH)
    Tq, Tk = int(q[1]), int(kv[1])
    case = {"B": int(q[0]), "NH": NH, "NKV": NKV, "HS": int(a["head_size"]), "Tq": Tq, "Tk": Tk,
            "causal": bool(a.get("causal", False))}
    if "cache_pos" in node.inputs:
        if Tq > 1:
            case["Tk"] = Tq  # a KV-cache prefill: the prompt's keys only (the session starts at position 0)
        else:
            # a decoding step: the keys are a prefix of the cache that grows every step; the config is
            # chosen per key-length bucket at run time (key_len_buckets), Tk here is the capacity
            case["Tk_max"] = Tk
    return case


DECODE_TUNE_MIN = 64  # decoding attention is tuned at key lengths 64, 128, ... up to the cache's capacity


def _attention_key_len_buckets(case):
    cap = case.get("Tk_max")
    if not cap:
        return None
    out, t = [], 1
    while t < pow2_bucket(cap):
        out.append(t)
        t *= 2
    return out + [pow2_bucket(cap)]


def _attention_tuning_cases(case):
    cap = case.get("Tk_max")
    if not cap:
        return [case]
    lens = sorted({min(t, cap) for t in _attention_key_len_buckets(case) if t >= min(DECODE_TUNE_MIN, cap)})
    return [{**case, "Tk": t} for t in lens]


def _attention_bucket(case):
    return {"B": case["B"], "NH": case["NH"], "NKV": case["NKV"], "HS": case["HS"], "Tq": pow2_bucket(case["Tq"]),
            "Tk": pow2_bucket(case["Tk"]), "causal": bool(case["causal"])}


def _attention_workload(case, seed, dev, launcher, kwargs_of):
    from ..reference.forward import attention_gqa

    B, NH, NKV, HS, Tq, Tk = (case[k] for k in ("B", "NH", "NKV", "HS", "Tq", "Tk"))
    causal = bool(case["causal"])
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Tq, NH * HS), dtype=np.float32)
    kv = rng.standard_normal((B, Tk, 2 * NKV * HS), dtype=np.float32)
    mask = np.ones((B, Tk), np.uint8)
    if B > 1 and Tk > 1:  # padded keys in the last row: the masked paths run too
        mask[-1, : max(1, Tk // 4)] = 0
    scale = 1.0 / math.sqrt(HS)
    qd, md = dev.upload(q), dev.upload(mask)
    kvds = [dev.upload(kv if i == 0 else kv.copy()) for i in range(rotating_copies(kv.nbytes, dev.kind))]
    turn = [0]

    def run(outs, config):
        kw = kwargs_of(config)
        if NKV != NH:
            kw["n_kv_heads"] = NKV
        kvd = kvds[turn[0] % len(kvds)]  # keys / values read from memory, as from a model's KV cache
        turn[0] += 1
        launcher(outs["out"], outs["lse"], qd, 0, kvd, 0, NKV * HS, md, NH, HS, causal, scale, **kw)

    def reference():
        q4 = q.reshape(B, Tq, NH, HS).transpose(0, 2, 1, 3)
        k4 = kv[:, :, : NKV * HS].reshape(B, Tk, NKV, HS).transpose(0, 2, 1, 3)
        v4 = kv[:, :, NKV * HS:].reshape(B, Tk, NKV, HS).transpose(0, 2, 1, 3)
        o, lse = attention_gqa(q4, k4, v4, mask, causal, scale)
        return {"out": o.transpose(0, 2, 1, 3).reshape(B, Tq, NH * HS), "lse": lse}

    nk = Tk * (Tk + 1) / 2 if causal and Tq == Tk else Tq * Tk
    return Workload(out_shapes={"out": (B, Tq, NH * HS), "lse": (B, NH, Tq)}, run=run, reference=reference,
                    tolerance={"out": (1e-5, 0.0), "lse": (2e-6, 1e-5)}, device=dev,
                    flops=4.0 * B * NH * nk * HS, bytes=4.0 * (q.size + kv.size + B * Tq * NH * HS))


class CpuAttention(Family):
    """The CPU attention forward. Up to attention_decode.MAX_QUERIES queries (decoding) it runs the
    decode kernel, which has no tiles: there only `threads` changes anything (`effective`)."""

    name, device, op = "attention", "cpu", "attention"
    SHAPE_DEFAULTS = {"B": 1, "NH": 12, "NKV": None, "HS": 64, "Tq": 256, "Tk": None, "causal": False}
    sources = ("nbformer.kernels.cpu.attention", "nbformer.kernels.cpu.attention_decode")
    nearest = ("Tq", "Tk", "B")

    def tunables(self):
        from ..kernels.cpu import attention  # its launcher's default tiles

        return (
            Tunable("block_q", (16, 32, 64, 128, 256), attention.BLOCK_Q, False,
                    "queries per work item; changes the micro-kernel's grouping (validated at tolerance)"),
            Tunable("block_k", (32, 64, 128, 256, 512), attention.BLOCK_K, False,
                    "keys per tile of the online softmax; changes its summation order (validated at tolerance)"),
            Tunable("threads", cpu_thread_values(), max(cpu_thread_values()), True,
                    "Numba threads; items own disjoint outputs, so bits never change"),
        )

    def check(self, config, case):
        if why := _too_many_threads(config):
            return why
        bq, bk, HS = min(config["block_q"], case["Tq"]), min(config["block_k"], case["Tk"]), case["HS"]
        scratch = 4 * ((bq + 8) * (bk + HS) + (bq + bk) * HS)
        limit = _l2_bytes()
        if scratch > limit:
            return f"per-thread scratch {scratch >> 10} KiB does not fit L2 ({limit >> 10} KiB)"
        return None

    def effective(self, config, case):
        from ..kernels.cpu.attention_decode import MAX_QUERIES

        if case["Tq"] <= MAX_QUERIES:  # the decode kernel: no tiles
            return ("decode", config["threads"])
        bq = min(config["block_q"], case["Tq"])
        return (bq, min(config["block_k"], case["Tk"]), config["threads"])

    def case_from_node(self, node, graph):
        return _attention_case_from_node(node, graph)

    def bucket(self, case):
        return _attention_bucket(case)

    def tuning_cases(self, case):
        return _attention_tuning_cases(case)

    def key_len_buckets(self, case):
        return _attention_key_len_buckets(case)

    def describe(self, case):
        gqa = f"/{case['NKV']}kv" if case["NKV"] != case["NH"] else ""
        return (f"attention B{case['B']} H{case['NH']}{gqa} D{case['HS']} Tq{case['Tq']} Tk{case['Tk']}"
                f"{' causal' if case['causal'] else ''}")

    def workload(self, case, seed=0):
        from ..kernels.cpu.attention import attention_forward

        return _attention_workload(case, seed, _dev("cpu"), attention_forward, self.launch_kwargs)


# ---------------------------------------------------------------- CUDA twins
class CudaLinear(Family):
    """The CUDA linear forward: tiled SGEMM tiles (N > few_rows) or the few-row variant (decoding).
    Candidates are the kernel file's CANDIDATES lists (whole tile configurations, not a product)."""

    name, device, op = "linear", "cuda", "linear"
    SHAPE_DEFAULTS = CpuLinear.SHAPE_DEFAULTS
    sources = ("nbformer.kernels.cuda.linear", "nbformer.kernels.cuda._jit")
    nearest = ("N",)
    TILED = ("BM", "BN", "BK", "TM", "TN")
    FEW = ("fr_threads", "fr_lanes", "fr_cols", "fr_kc")

    def _mod(self):
        from ..kernels.cuda import linear

        return linear

    def tunables(self):
        L = self._mod()
        tiled, few = L.CANDIDATES["tiled"], L.CANDIDATES["few_rows"]
        out = []
        for name in self.TILED:
            out.append(Tunable(name, tuple(sorted({c[name] for c in tiled})), L.TUNABLES[name],
                               not L.BIT_CHANGING[name], "tiled SGEMM tile (N > few_rows)"))
        for name in self.FEW:
            out.append(Tunable(name, tuple(sorted({c[name] for c in few})), L.TUNABLES[name],
                               not L.BIT_CHANGING[name], "few-row kernel (N <= few_rows)"))
        return tuple(out)

    def _few(self, case):
        return case["N"] <= self._mod().TUNABLES["few_rows"]

    def defaults(self, case):
        L = self._mod()
        return {k: L.TUNABLES[k] for k in (self.FEW if self._few(case) else self.TILED)}

    def candidates(self, case):
        L = self._mod()
        lst = L.CANDIDATES["few_rows"] if self._few(case) else L.CANDIDATES["tiled"]
        return [self.defaults(case)] + [dict(c) for c in lst]

    def check(self, config, case):
        from ..errors import GraphError
        from .machine import machine_key

        L = self._mod()
        t = {**L.TUNABLES, **config}
        try:
            if self._few(case):
                threads, _, smem = L.few_rows_config(max(case["N"], 1), **t)
            else:
                threads, smem = L.tiled_config(**t)
        except GraphError as e:
            return str(e)
        key = machine_key("cuda")
        if threads > key["max_threads_per_block"]:
            return f"{threads} threads per block > the device's {key['max_threads_per_block']}"
        if smem > key["max_shared_memory_per_block"]:
            return f"{smem} bytes of shared memory > the device's {key['max_shared_memory_per_block']}"
        return None

    def case_from_node(self, node, graph):
        return _linear_case_from_node(node, graph)

    def bucket(self, case):
        return _linear_bucket(case)

    describe = CpuLinear.describe

    def workload(self, case, seed=0):
        return _linear_workload(case, seed, _dev("cuda"), self._mod().linear_forward, self.launch_kwargs)


class CudaAttention(Family):
    name, device, op = "attention", "cuda", "attention"
    SHAPE_DEFAULTS = CpuAttention.SHAPE_DEFAULTS
    sources = ("nbformer.kernels.cuda.attention", "nbformer.kernels.cuda._jit")
    nearest = ("Tq", "Tk", "B")

    def _mod(self):
        from ..kernels.cuda import attention

        return attention

    def tunables(self):
        A = self._mod()
        c = A.CANDIDATES
        return (Tunable("block_q", tuple(sorted({x[0] for x in c})), A.TUNABLES["block_q"], False, "queries per block"),
                Tunable("block_k", tuple(sorted({x[1] for x in c})), A.TUNABLES["block_k"], False,
                        "keys per tile of the online softmax (summation order)"),
                Tunable("threads", tuple(sorted({x[2] for x in c})), A.TUNABLES["threads"], False,
                        "threads per block (the split of the score tile)"))

    def defaults(self, case):
        bq, bk, nt = self._mod().default_tiles(case["HS"])
        return {"block_q": bq, "block_k": bk, "threads": nt}

    def candidates(self, case):
        return [self.defaults(case)] + [{"block_q": a, "block_k": b, "threads": c} for a, b, c in self._mod().CANDIDATES]

    def check(self, config, case):
        from ..errors import GraphError
        from .machine import machine_key

        A = self._mod()
        try:
            g = A.check_variant(config["block_q"], config["block_k"], config["threads"], case["HS"], case["HS"])
        except GraphError as e:
            return str(e)
        key = machine_key("cuda")
        if config["threads"] > key["max_threads_per_block"]:
            return f"{config['threads']} threads per block > the device's {key['max_threads_per_block']}"
        if g["shared_bytes"] > key["max_shared_memory_per_block"]:
            return f"{g['shared_bytes']} bytes of shared memory > the device's {key['max_shared_memory_per_block']}"
        return None

    def case_from_node(self, node, graph):
        return _attention_case_from_node(node, graph)

    def bucket(self, case):
        return _attention_bucket(case)

    def tuning_cases(self, case):
        return _attention_tuning_cases(case)

    def key_len_buckets(self, case):
        return _attention_key_len_buckets(case)

    describe = CpuAttention.describe

    def workload(self, case, seed=0):
        return _attention_workload(case, seed, _dev("cuda"), self._mod().attention_forward, self.launch_kwargs)


# ---------------------------------------------------------------- gated FFN input layer (forward, inference)
def _glu_case_from_node(node, graph):
    if node.op != "linear_glu" or node.direction != "forward" or "pre" in node.outputs:
        return None  # the training forward keeps the default blocks (as the linear's does)
    x = graph.tensors[node.inputs["x"]].shape
    w = graph.tensors[node.inputs["w"]].shape
    return {"N": int(np.prod(x[:-1], dtype=np.int64)), "K": int(x[-1]), "F": int(w[0]) // 2,
            "act": str(node.attrs.get("act", "silu")), "bias": "b" in node.inputs}


class CpuLinearGlu(Family):
    """The CPU gated FFN input layer act(x @ Wg.T + bg) * (x @ Wu.T + bu) (swiglu_linear_forward): the
    linear forward's blocks (row blocks of all 2F columns, or column blocks of F, gate and up of a
    block in one thread, when rows are few), the same validation and bit-safety as CpuLinear."""

    name, device, op = "linear_glu", "cpu", "linear_glu"
    SHAPE_DEFAULTS = {"N": 256, "K": 576, "F": 1536, "act": "silu", "bias": False}
    sources = ("nbformer.kernels.cpu.swiglu", "nbformer.kernels.cpu.linear", "nbformer.kernels.cpu.gemm")
    nearest = ("N",)
    SCRATCH_LIMIT = CpuLinear.SCRATCH_LIMIT

    def tunables(self):
        return _gemm_block_tunables("gate/up columns", auto=True, auto_doc="both by shape, swiglu.resolve_blocks")

    def launch_kwargs(self, config):
        return _auto_as_none(config)

    @staticmethod
    def _rows_cols(config, case):
        from ..kernels.cpu.swiglu import resolve_blocks

        kw = _auto_as_none(config)
        return resolve_blocks(case["N"], case["F"], kw["rows"], kw["cols"])

    def _by_rows(self, config, case):
        rows, cols = self._rows_cols(config, case)
        return case["N"] >= 2 * rows or 2 * case["F"] <= cols

    def check(self, config, case):
        N, F = case["N"], case["F"]
        if why := _too_many_threads(config):
            return why
        by_rows = self._by_rows(config, case)
        rows, cols = self._rows_cols(config, case)
        scratch = 4 * (min(rows, N) * 2 * F if by_rows else 2 * N * min(cols, F))
        if scratch > self.SCRATCH_LIMIT:
            return f"{scratch / 2**20:.0f} MiB of block scratch per thread (> {self.SCRATCH_LIMIT >> 20} MiB)"
        return None

    def effective(self, config, case):
        N, F = case["N"], case["F"]
        rows, cols = self._rows_cols(config, case)
        if self._by_rows(config, case):
            return ("rows", min(rows, N), config["threads"])
        return ("cols", min(cols, F), 2 <= N <= config["skinny_max_rows"], config["threads"])

    def case_from_node(self, node, graph):
        return _glu_case_from_node(node, graph)

    def bucket(self, case):
        return {"N": pow2_bucket(case["N"]), "K": case["K"], "F": case["F"], "act": case["act"],
                "bias": bool(case["bias"])}

    def describe(self, case):
        return (f"linear_glu {case['N']}x{case['K']} @ {case['K']}x2*{case['F']} {case['act']}"
                f"{' +b' if case['bias'] else ''}")

    def workload(self, case, seed=0):
        from ..kernels.cpu.swiglu import swiglu_linear_forward
        from ..reference.forward import linear_glu as ref_glu

        dev = _dev("cpu")
        N, K, F = case["N"], case["K"], case["F"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, K), dtype=np.float32)
        w = rng.standard_normal((2 * F, K), dtype=np.float32) / np.float32(math.sqrt(K))
        b = rng.standard_normal(2 * F, dtype=np.float32) * np.float32(0.1) if case["bias"] else None
        wds = [w if i == 0 else w.copy() for i in range(rotating_copies(w.nbytes, dev.kind))]
        act, kw_of, turn = case["act"], self.launch_kwargs, [0]

        def run(outs, config):
            wd = wds[turn[0] % len(wds)]
            turn[0] += 1
            swiglu_linear_forward(outs["out"], x, wd, b, act, **kw_of(config))

        # the linear's tolerance (1e-5 widened as sqrt(K / 64)), times the up value's size (~1) for the product
        tol = 1e-5 * max(1.0, math.sqrt(K / 64.0))
        return Workload(out_shapes={"out": (N, F)}, run=run, reference=lambda: {"out": ref_glu(x, w, b, act)},
                        tolerance={"out": (tol, tol)}, device=dev, flops=4.0 * N * K * F,
                        bytes=4.0 * (N * K + 2 * F * K + N * F))


# ---------------------------------------------------------------- quantized linear layers (ggml blocks kept quantized)
class CpuQLinear(Family):
    """kernels/cpu/qlinear.py: decode path (few rows of x; row dots dequantized in registers) below
    dense_rows rows, prefill path (dequantized tiles + sgemm) from it."""

    SHAPE_DEFAULTS = {"N": 1, "K": 576, "M": 960, "qtype": "q4_1"}
    name, device, op = "qlinear", "cpu", "qlinear"
    sources = ("nbformer.kernels.cpu.qlinear", "nbformer.quant.formats")
    nearest = ("N",)
    glu = False

    def tunables(self):
        from ..kernels.cpu import qlinear

        return (
            Tunable("dense_rows", (4, 8, 16, 32, 64), qlinear.PREFILL_MIN_ROWS, False,
                    "from this many rows of x the prefill path (tiles + sgemm) runs instead of the row dots"),
            Tunable("decode_cols", (16, 32, 64, 128), qlinear.DECODE_COLS, True,
                    "output columns per decode work item; each column is its own fixed-order dot: same bits"),
            Tunable("prefill_cols", (32, 64, 128, 256), qlinear.PREFILL_COLS, False,
                    "weight rows per dequantized prefill tile (the sgemm call shape may move the last bits)"),
            Tunable("threads", cpu_thread_values(), max(cpu_thread_values()), True,
                    "Numba threads for the call; work items own disjoint columns, so bits never change"),
        )

    def check(self, config, case):
        if why := _too_many_threads(config):
            return why
        if 4 * config["prefill_cols"] * case["K"] > 8 << 20:
            return f"a {config['prefill_cols']} x {case['K']} float32 tile is over 8 MiB"
        return None

    def effective(self, config, case):
        dense = case["N"] >= config["dense_rows"]
        cols = config["prefill_cols"] if dense else config["decode_cols"]
        return (dense, min(cols, self._out_cols(case)), config["threads"])

    def _out_cols(self, case):
        return case["M"] // 2 if self.glu else case["M"]

    def case_from_node(self, node, graph):
        if node.op != self.op or node.direction != self.direction:
            return None
        N, K = _rows_of(graph, node.inputs["x"])
        M = int(graph.tensors[node.inputs["w"]].shape[0])
        return {"N": N, "K": K, "M": M, "qtype": str(node.attrs.get("qtype", "q8_0")).lower()}

    def bucket(self, case):
        return {"N": pow2_bucket(case["N"]), "K": case["K"], "M": case["M"], "qtype": case["qtype"]}

    def describe(self, case):
        return f"{self.name} {case['qtype']} {case['N']}x{case['K']}->{self._out_cols(case)}"

    def workload(self, case, seed=0):
        from ..kernels.cpu import qlinear
        from ..quant.formats import quantize
        from ..quant.reference import qlinear_glu_reference, qlinear_reference

        N, K, M, qt = case["N"], case["K"], case["M"], case["qtype"]
        rng = np.random.default_rng(seed)
        w = quantize(rng.standard_normal((M, K)).astype(np.float32) * np.float32(0.2), qt)
        x = rng.standard_normal((N, K)).astype(np.float32)
        copies = [w.data if i == 0 else w.data.copy() for i in range(rotating_copies(w.data.nbytes, "cpu"))]
        glu, kw_of, turn = self.glu, self.launch_kwargs, [0]
        Mo = self._out_cols(case)

        def run(outs, config):
            wd = copies[turn[0] % len(copies)]
            turn[0] += 1
            if glu:
                qlinear.qlinear_glu_forward(outs["out"], x, wd, qt, None, "silu", **kw_of(config))
            else:
                qlinear.qlinear_forward(outs["out"], x, wd, qt, **kw_of(config))

        def reference():
            return {"out": qlinear_glu_reference(x, w, None, "silu") if glu else qlinear_reference(x, w)}

        # tests/test_quant.py's tolerance: 2e-6 of the largest output, 1e-5 relative
        scale = float(np.abs(reference()["out"]).max()) or 1.0
        return Workload(out_shapes={"out": (N, Mo)}, run=run, reference=reference,
                        tolerance={"out": (2e-6 * scale, 1e-5)}, device=_dev("cpu"), flops=2.0 * N * K * M,
                        bytes=float(w.data.nbytes + 4 * (N * K + N * Mo)))


class CpuQLinearGlu(CpuQLinear):
    SHAPE_DEFAULTS = {"N": 1, "K": 576, "M": 3072, "qtype": "q4_1"}
    name, op = "qlinear_glu", "qlinear_glu"
    glu = True


# ---------------------------------------------------------------- row kernels whose only tunable is the thread count
def _rows_of(graph, name):
    shape = graph.tensors[name].shape
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


class _CpuThreadsOnly(Family):
    """A CPU kernel whose work items (rows, or fixed row chunks reduced in a fixed order) own disjoint
    outputs: the Numba thread count is its one tunable and never changes a bit (validated bit for bit
    against the default). Subclasses give `_rows_input` (the node's (..., C) tensor that sets the case),
    `dims` (the case's field names) and `workload`."""

    nearest = ("N",)
    _rows_input = "x"
    dims = ("N", "C")

    def tunables(self):
        return (Tunable("threads", cpu_thread_values(), max(cpu_thread_values()), True,
                        "Numba threads for the call; each row (chunk) is one thread's, so bits never change"),)

    def check(self, config, case):
        if why := _too_many_threads(config):
            return why
        return None

    def shape_defaults(self):
        return {self.dims[0]: 256, self.dims[1]: 768}

    def effective(self, config, case):
        return (config["threads"],)

    def case_from_node(self, node, graph):
        if node.op != self.op or node.direction != self.direction:
            return None
        N, C = _rows_of(graph, node.inputs[self._rows_input])
        return {self.dims[0]: N, self.dims[1]: C}

    def bucket(self, case):
        return {self.dims[0]: pow2_bucket(case[self.dims[0]]), self.dims[1]: case[self.dims[1]]}

    def describe(self, case):
        return f"{self.name} {case[self.dims[0]]}x{case[self.dims[1]]}"


class CpuLayerNorm(_CpuThreadsOnly):
    name, device, op = "layernorm", "cpu", "layernorm"
    sources = ("nbformer.kernels.cpu.layernorm",)

    def workload(self, case, seed=0):
        from ..kernels.cpu.layernorm import layernorm_forward
        from ..reference.forward import layernorm as ref_ln

        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32) * np.float32(2.0) + np.float32(0.5)
        w = rng.standard_normal(C, dtype=np.float32)
        b = rng.standard_normal(C, dtype=np.float32)
        kw_of = self.launch_kwargs

        def run(outs, config):
            layernorm_forward(outs["out"], outs["mean"], outs["rstd"], x, w, b, 1e-5, **kw_of(config))

        def reference():
            o, m, r = ref_ln(x, w, b, 1e-5)
            return {"out": o, "mean": m, "rstd": r}

        return Workload(out_shapes={"out": (N, C), "mean": (N,), "rstd": (N,)}, run=run, reference=reference,
                        tolerance={"out": (1e-5, 1e-5), "mean": (1e-6, 1e-5), "rstd": (1e-6, 1e-5)},
                        device=_dev("cpu"), flops=8.0 * N * C, bytes=8.0 * N * C)


class CpuLayerNormBackward(_CpuThreadsOnly):
    """dx per row, dw / db over fixed 64-row chunks (layernorm.ROWS_PER_CHUNK, not tunable: it fixes the
    bits of the reduction) reduced in a fixed order: threads never change a bit."""

    name, device, op, direction = "layernorm_backward", "cpu", "layernorm", "backward"
    sources = ("nbformer.kernels.cpu.layernorm",)
    _rows_input = "dout"

    def workload(self, case, seed=0):
        from ..kernels.cpu.layernorm import layernorm_backward
        from ..reference.backward import layernorm_backward as ref_bwd
        from ..reference.forward import layernorm as ref_ln

        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32)
        w = rng.standard_normal(C, dtype=np.float32)
        dout = rng.standard_normal((N, C), dtype=np.float32)
        _, m64, r64 = ref_ln(x, w, np.zeros(C, np.float32), 1e-5)
        mean, rstd = m64.astype(np.float32), r64.astype(np.float32)
        dx, dw, db = ref_bwd(dout, x, w, 1e-5)
        ref = {"dx": dx, "dw": dw, "db": db}
        kw_of = self.launch_kwargs

        def run(outs, config):
            layernorm_backward(outs["dx"], outs["dw"], outs["db"], dout, x, w, mean, rstd, **kw_of(config))

        # the tests' gradient tolerance: 1e-4 of the tensor's largest gradient
        tol = {k: (1e-4 * max(1.0, float(np.abs(v).max())), 0.0) for k, v in ref.items()}
        return Workload(out_shapes={"dx": (N, C), "dw": (C,), "db": (C,)}, run=run, reference=lambda: ref,
                        tolerance=tol, device=_dev("cpu"), flops=12.0 * N * C, bytes=12.0 * N * C)


class CpuRmsNorm(_CpuThreadsOnly):
    """One row per item; below rmsnorm.SERIAL_MAX_ELEMENTS (and at threads=1) the serial twin runs."""

    name, device, op = "rmsnorm", "cpu", "rmsnorm"
    sources = ("nbformer.kernels.cpu.rmsnorm",)

    def shape_defaults(self):
        return {"N": 256, "C": 576}

    def workload(self, case, seed=0):
        from ..kernels.cpu.rmsnorm import rmsnorm_forward
        from ..reference.forward import rmsnorm as ref_rms

        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32) * np.float32(2.0)
        w = rng.standard_normal(C, dtype=np.float32)
        kw_of = self.launch_kwargs

        def run(outs, config):
            rmsnorm_forward(outs["out"], outs["rstd"], x, w, 1e-5, **kw_of(config))

        def reference():
            o, r = ref_rms(x, w, 1e-5)
            return {"out": o, "rstd": r}

        return Workload(out_shapes={"out": (N, C), "rstd": (N,)}, run=run, reference=reference,
                        tolerance={"out": (1e-5, 1e-5), "rstd": (1e-6, 1e-5)},
                        device=_dev("cpu"), flops=4.0 * N * C, bytes=8.0 * N * C)


class CpuRmsNormBackward(_CpuThreadsOnly):
    """dx per row, dw over fixed 64-row chunks (rmsnorm.ROWS_PER_CHUNK, not tunable) in a fixed order."""

    name, device, op, direction = "rmsnorm_backward", "cpu", "rmsnorm", "backward"
    sources = ("nbformer.kernels.cpu.rmsnorm",)
    _rows_input = "dout"

    def shape_defaults(self):
        return {"N": 256, "C": 576}

    def workload(self, case, seed=0):
        from ..kernels.cpu.rmsnorm import rmsnorm_backward
        from ..reference.backward import rmsnorm_backward as ref_bwd
        from ..reference.forward import rmsnorm as ref_rms

        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32)
        w = rng.standard_normal(C, dtype=np.float32)
        dout = rng.standard_normal((N, C), dtype=np.float32)
        rstd = ref_rms(x, w, 1e-5)[1].astype(np.float32)
        dx, dw = ref_bwd(dout, x, w, 1e-5)
        ref = {"dx": dx, "dw": dw}
        kw_of = self.launch_kwargs

        def run(outs, config):
            rmsnorm_backward(outs["dx"], outs["dw"], dout, x, w, rstd, **kw_of(config))

        tol = {k: (1e-4 * max(1.0, float(np.abs(v).max())), 0.0) for k, v in ref.items()}
        return Workload(out_shapes={"dx": (N, C), "dw": (C,)}, run=run, reference=lambda: ref,
                        tolerance=tol, device=_dev("cpu"), flops=10.0 * N * C, bytes=12.0 * N * C)


class CpuSoftmax(_CpuThreadsOnly):
    name, device, op = "softmax", "cpu", "softmax"
    sources = ("nbformer.kernels.cpu.softmax",)
    dims = ("N", "V")

    def workload(self, case, seed=0):
        from ..kernels.cpu.softmax import softmax_forward
        from ..reference.forward import softmax as ref_sm

        N, V = case["N"], case["V"]
        x = np.random.default_rng(seed).standard_normal((N, V), dtype=np.float32) * np.float32(3.0)
        kw_of = self.launch_kwargs

        def run(outs, config):
            softmax_forward(outs["out"], x, **kw_of(config))

        return Workload(out_shapes={"out": (N, V)}, run=run, reference=lambda: {"out": ref_sm(x)},
                        tolerance={"out": (1e-6, 1e-5)}, device=_dev("cpu"), flops=4.0 * N * V, bytes=8.0 * N * V)


def _ce_inputs(case, seed):
    N, V = case["N"], case["V"]
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, V), dtype=np.float32) * np.float32(2.0)
    targets = rng.integers(0, V, N).astype(np.int64)
    if N > 1:
        targets[::7] = -100  # ignored rows (padding) take their own path
    return logits, targets


class CpuCrossEntropy(_CpuThreadsOnly):
    """The loss's forward; its thread count also reaches a training graph's loss node, where the
    backward runs fused into it (loss.cross_entropy_fused: the same rows, one more pass over each)."""
    name, device, op = "cross_entropy", "cpu", "cross_entropy"
    sources = ("nbformer.kernels.cpu.loss",)
    dims = ("N", "V")
    _rows_input = "logits"

    def workload(self, case, seed=0):
        from ..kernels.cpu.loss import cross_entropy_forward
        from ..reference.backward import cross_entropy as ref_ce

        N, V = case["N"], case["V"]
        logits, targets = _ce_inputs(case, seed)
        losses, lse = ref_ce(logits, targets)
        kw_of = self.launch_kwargs

        def run(outs, config):
            cross_entropy_forward(outs["losses"], outs["lse"], logits, targets, **kw_of(config))

        return Workload(out_shapes={"losses": (N,), "lse": (N,)}, run=run,
                        reference=lambda: {"losses": losses, "lse": lse},
                        tolerance={"losses": (1e-5, 1e-5), "lse": (1e-5, 1e-5)}, device=_dev("cpu"),
                        flops=3.0 * N * V, bytes=4.0 * N * V)


class CpuCrossEntropyBackward(_CpuThreadsOnly):
    name, device, op, direction = "cross_entropy_backward", "cpu", "cross_entropy", "backward"
    sources = ("nbformer.kernels.cpu.loss",)
    dims = ("N", "V")
    _rows_input = "logits"

    def workload(self, case, seed=0):
        from ..kernels.cpu.loss import cross_entropy_backward
        from ..reference.backward import cross_entropy as ref_ce
        from ..reference.backward import cross_entropy_backward as ref_bwd

        N, V = case["N"], case["V"]
        logits, targets = _ce_inputs(case, seed)
        lse = ref_ce(logits, targets)[1].astype(np.float32)
        dloss = 1.0 / max(1, int((targets != -100).sum()))
        ref = ref_bwd(logits, targets, dloss=dloss)
        kw_of = self.launch_kwargs

        def run(outs, config):
            cross_entropy_backward(outs["dlogits"], logits, lse, targets, dloss=dloss, **kw_of(config))

        tol = 1e-4 * max(1e-30, float(np.abs(ref).max()))
        return Workload(out_shapes={"dlogits": (N, V)}, run=run, reference=lambda: {"dlogits": ref},
                        tolerance={"dlogits": (tol, 0.0)}, device=_dev("cpu"), flops=3.0 * N * V,
                        bytes=8.0 * N * V)


# ---------------------------------------------------------------- attention backward (training)
class CpuAttentionBackward(Family):
    """The CPU attention backward (kernels/cpu/attention_backward.py). Every tunable is bit-exact: each
    sum there is one per-element FMA chain in a fixed order whatever the tiles, the query chunk, the
    schedule or the thread count (the kernel's tests check it bit for bit), so the validator demands the
    default's bits from every candidate, not just the tolerance."""

    name, device, op, direction = "attention_backward", "cpu", "attention", "backward"
    SHAPE_DEFAULTS = {"B": 1, "NH": 12, "NKV": None, "HS": 64, "Tq": 256, "Tk": None, "causal": True}
    sources = ("nbformer.kernels.cpu.attention_backward", "nbformer.kernels.cpu.attention_backward_tile",
               "nbformer.kernels.cpu.attention_backward_amx", "nbformer.kernels.cpu.attention_backward_amx_tile",
               "nbformer.kernels.cpu.attention")
    nearest = ("Tq", "Tk", "B")

    def tunables(self):
        return (
            Tunable("block_q", (32, 64, 128), 64, True, "query rows per tile"),
            Tunable("block_k", (32, 64, 128), 64, True, "keys per tile"),
            Tunable("passes", ("auto", 1, 2), "auto", True,
                    "1: one item per (batch, kv head); 2: dK/dV then dQ items (auto: choose_passes)"),
            Tunable("query_chunk", (256, 512, 1024), 512, True, "one pass: query rows kept in L2"),
            Tunable("threads", cpu_thread_values(), max(cpu_thread_values()), True, "Numba threads"),
        )

    def launch_kwargs(self, config):
        kw = dict(config)
        if kw.get("passes") == "auto":
            kw["passes"] = None
        return kw

    def _passes(self, config, case):
        if config["passes"] != "auto":
            return int(config["passes"])
        from ..kernels.cpu.attention_backward import choose_passes, uses_amx

        amx = uses_amx(case["HS"], case["Tq"], case["Tk"] or case["Tq"], case["causal"])
        return choose_passes(case["B"], case["NKV"], config["threads"], amx)

    def check(self, config, case):
        if why := _too_many_threads(config):
            return why
        bq, bk, HS = min(config["block_q"], case["Tq"]), min(config["block_k"], case["Tk"]), case["HS"]
        scratch = 4 * ((bq + bk) * (bk + HS + 16) + 2 * bq * (bk + 16))
        if self._passes(config, case) == 1:
            scratch += 4 * 2 * min(config["query_chunk"], case["Tq"]) * HS
        limit = _l2_bytes()
        if scratch > limit:
            return f"per-thread scratch {scratch >> 10} KiB does not fit L2 ({limit >> 10} KiB)"
        return None

    def effective(self, config, case):
        p = self._passes(config, case)
        bq, bk = min(config["block_q"], case["Tq"]), min(config["block_k"], case["Tk"])
        qch = max(bq, min(config["query_chunk"], case["Tq"]) // bq * bq) if p == 1 else 0
        return (p, bq, bk, qch, config["threads"])

    def case_from_node(self, node, graph):
        if node.op != "attention" or node.direction != "backward" or float(node.attrs.get("dropout_p", 0.0)) > 0:
            return None
        q = graph.tensors[node.inputs["q"]].shape
        kv = graph.tensors[node.inputs["kv"]].shape
        a = node.attrs
        NH = int(a["n_heads"])
        return {"B": int(q[0]), "NH": NH, "NKV": int(a.get("n_kv_heads") or NH), "HS": int(a["head_size"]),
                "Tq": int(q[1]), "Tk": int(kv[1]), "causal": bool(a.get("causal", False))}

    def bucket(self, case):
        return _attention_bucket(case)

    def describe(self, case):
        return "attention_backward" + CpuAttention.describe(self, case)[len("attention"):]

    def workload(self, case, seed=0):
        from ..kernels.cpu.attention_backward import attention_backward
        from ..reference.backward import attention_gqa_backward
        from ..reference.forward import attention_gqa

        B, NH, NKV, HS, Tq, Tk = (case[k] for k in ("B", "NH", "NKV", "HS", "Tq", "Tk"))
        causal, scale = bool(case["causal"]), 1.0 / math.sqrt(HS)
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, Tq, NH * HS), dtype=np.float32)
        kv = rng.standard_normal((B, Tk, 2 * NKV * HS), dtype=np.float32)
        dout = rng.standard_normal((B, Tq, NH * HS), dtype=np.float32)
        mask = np.ones((B, Tk), np.uint8)
        if B > 1 and Tk > 1:
            mask[-1, : max(1, Tk // 4)] = 0
        q4 = q.reshape(B, Tq, NH, HS).transpose(0, 2, 1, 3)
        k4 = kv[:, :, : NKV * HS].reshape(B, Tk, NKV, HS).transpose(0, 2, 1, 3)
        v4 = kv[:, :, NKV * HS:].reshape(B, Tk, NKV, HS).transpose(0, 2, 1, 3)
        o, lse = attention_gqa(q4, k4, v4, mask, causal, scale)
        out = np.ascontiguousarray(o.transpose(0, 2, 1, 3).reshape(B, Tq, NH * HS), np.float32)
        lse32 = np.ascontiguousarray(lse, np.float32)
        d4 = dout.reshape(B, Tq, NH, HS).transpose(0, 2, 1, 3)
        dq, dk, dv = attention_gqa_backward(q4, k4, v4, d4, mask, causal, scale)
        ref = {"dq": dq.transpose(0, 2, 1, 3).reshape(B, Tq, NH * HS),
               "dkv": np.concatenate([dk.transpose(0, 2, 1, 3).reshape(B, Tk, NKV * HS),
                                      dv.transpose(0, 2, 1, 3).reshape(B, Tk, NKV * HS)], axis=-1)}
        kw_of = self.launch_kwargs

        def run(outs, config):
            kw = kw_of(config)
            if NKV != NH:
                kw["n_kv_heads"] = NKV
            attention_backward(outs["dq"], outs["dkv"], outs["delta"], dout, out, lse32, q, 0, kv, 0, NKV * HS,
                               mask, NH, HS, causal, scale, **kw)

        tol = {k: (1e-4 * max(1.0, float(np.abs(v).max())), 0.0) for k, v in ref.items()}
        nk = Tk * (Tk + 1) / 2 if causal and Tq == Tk else Tq * Tk
        wl = Workload(out_shapes={"dq": (B, Tq, NH * HS), "dkv": (B, Tk, 2 * NKV * HS), "delta": (B, NH, Tq)},
                      run=run, reference=lambda: ref, tolerance=tol, device=_dev("cpu"),
                      flops=10.0 * B * NH * nk * HS, bytes=4.0 * (3 * q.size + 2 * kv.size))
        return wl


# ---------------------------------------------------------------- CUDA row kernels: threads per block
class _CudaRowThreads(Family):
    """A CUDA row kernel (one block per row, a fixed-order shared-memory tree over the block's threads)
    whose tunable is the threads per block: a power of two, a multiple of the warp (32) and within the
    device's limit. It shapes the tree (which partial sums meet), so it may change the last bits:
    declared bit-changing and validated at the tests' tolerance, which is all it promises."""

    device = "cuda"
    nearest = ("N",)
    dims = ("N", "C")
    _rows_input = "x"
    kernel_module = ""   # nbformer.kernels.cuda.<kernel_module>
    launcher = ""        # its launcher, also the key of its TUNABLES

    @property
    def sources(self):
        return (f"nbformer.kernels.cuda.{self.kernel_module}", "nbformer.kernels.cuda.elementwise",
                "nbformer.kernels.cuda._jit")

    def _mod(self):
        import importlib

        return importlib.import_module(f"nbformer.kernels.cuda.{self.kernel_module}")

    def tunables(self):
        return (Tunable("threads", (32, 64, 128, 256, 512, 1024), self._mod().TUNABLES[self.launcher]["threads"],
                        False, "threads per block (one block per row): the shape of the reduction tree"),)

    def check(self, config, case):
        from .machine import machine_key

        t = int(config["threads"])
        if t < 32 or t % 32 or t & (t - 1):
            return f"threads per block {t}: expected a power of two and a multiple of the warp (32)"
        limit = machine_key("cuda")["max_threads_per_block"]
        if t > limit:
            return f"{t} threads per block > the device's {limit}"
        return None

    def effective(self, config, case):
        return (int(config["threads"]),)  # a thread past the row's end still takes part in the tree

    def shape_defaults(self):
        return {self.dims[0]: 256, self.dims[1]: 768}

    def case_from_node(self, node, graph):
        if node.op != self.op or node.direction != self.direction:
            return None
        N, C = _rows_of(graph, node.inputs[self._rows_input])
        return {self.dims[0]: N, self.dims[1]: C}

    def bucket(self, case):
        return {self.dims[0]: pow2_bucket(case[self.dims[0]]), self.dims[1]: case[self.dims[1]]}

    def describe(self, case):
        return f"{self.name} {case[self.dims[0]]}x{case[self.dims[1]]}"


class CudaLayerNorm(_CudaRowThreads):
    name, op, kernel_module, launcher = "layernorm", "layernorm", "layernorm", "layernorm_forward"

    def workload(self, case, seed=0):
        from ..reference.forward import layernorm as ref_ln

        dev, fn, kw_of = _dev("cuda"), self._mod().layernorm_forward, self.launch_kwargs
        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32) * np.float32(2.0) + np.float32(0.5)
        w = rng.standard_normal(C, dtype=np.float32)
        b = rng.standard_normal(C, dtype=np.float32)
        xd, wd, bd = dev.upload(x), dev.upload(w), dev.upload(b)

        def run(outs, config):
            fn(outs["out"], outs["mean"], outs["rstd"], xd, wd, bd, 1e-5, **kw_of(config))

        def reference():
            o, m, r = ref_ln(x, w, b, 1e-5)
            return {"out": o, "mean": m, "rstd": r}

        return Workload(out_shapes={"out": (N, C), "mean": (N,), "rstd": (N,)}, run=run, reference=reference,
                        tolerance={"out": (1e-5, 1e-5), "mean": (1e-6, 1e-5), "rstd": (1e-6, 1e-5)}, device=dev,
                        flops=8.0 * N * C, bytes=8.0 * N * C)


class CudaRmsNorm(_CudaRowThreads):
    name, op, kernel_module, launcher = "rmsnorm", "rmsnorm", "rmsnorm", "rmsnorm_forward"

    def workload(self, case, seed=0):
        from ..reference.forward import rmsnorm as ref_rms

        dev, fn, kw_of = _dev("cuda"), self._mod().rmsnorm_forward, self.launch_kwargs
        N, C = case["N"], case["C"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, C), dtype=np.float32)
        w = rng.standard_normal(C, dtype=np.float32)
        xd, wd = dev.upload(x), dev.upload(w)

        def run(outs, config):
            fn(outs["out"], outs["rstd"], xd, wd, 1e-6, **kw_of(config))

        def reference():
            o, r = ref_rms(x, w, 1e-6)
            return {"out": o, "rstd": r}

        return Workload(out_shapes={"out": (N, C), "rstd": (N,)}, run=run, reference=reference,
                        tolerance={"out": (1e-5, 1e-5), "rstd": (1e-6, 1e-5)}, device=dev, flops=4.0 * N * C,
                        bytes=8.0 * N * C)


class CudaSoftmax(_CudaRowThreads):
    name, op, kernel_module, launcher = "softmax", "softmax", "softmax", "softmax_forward"
    dims = ("N", "V")

    def workload(self, case, seed=0):
        from ..reference.forward import softmax as ref_sm

        dev, fn, kw_of = _dev("cuda"), self._mod().softmax_forward, self.launch_kwargs
        N, V = case["N"], case["V"]
        x = np.random.default_rng(seed).standard_normal((N, V), dtype=np.float32) * np.float32(3.0)
        xd = dev.upload(x)

        def run(outs, config):
            fn(outs["out"], xd, **kw_of(config))

        return Workload(out_shapes={"out": (N, V)}, run=run, reference=lambda: {"out": ref_sm(x)},
                        tolerance={"out": (1e-6, 1e-5)}, device=dev, flops=4.0 * N * V, bytes=8.0 * N * V)


# ---------------------------------------------------------------- registry
FAMILIES: dict = {}


def register(family: Family) -> Family:
    FAMILIES[family.key] = family
    return family


for _f in (CpuLinear(), CpuAttention(), CpuLinearGlu(), CpuQLinear(), CpuQLinearGlu(), CpuLayerNorm(),
           CpuLayerNormBackward(), CpuRmsNorm(), CpuRmsNormBackward(), CpuSoftmax(), CpuCrossEntropy(),
           CpuCrossEntropyBackward(), CpuAttentionBackward(),
           CudaLinear(), CudaAttention(), CudaLayerNorm(), CudaRmsNorm(), CudaSoftmax()):
    register(_f)


def families(device_kind: str) -> list:
    return [f for f in FAMILIES.values() if f.device == device_kind]


def get_family(device_kind: str, name: str) -> Family:
    f = FAMILIES.get(f"{device_kind}.{name}")
    if f is None:
        names = sorted(f.name for f in families(device_kind))
        raise InputError(f"--kernels: no tunable kernel family {name!r} on {device_kind} (expected one of {names})")
    return f


def family_for(op: str, direction: str, device_kind: str):
    for f in FAMILIES.values():
        if f.op == op and f.direction == direction and f.device == device_kind:
            return f
    return None
