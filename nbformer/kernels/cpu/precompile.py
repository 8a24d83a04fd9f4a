"""Every CPU kernel's explicit signature, and compiling the missing ones into Numba's on-disk
cache in parallel worker processes before the first run.

Why: a fresh clone (or a new numba / CPU / kernel source) has an empty cache, and compiling
the kernels one after the other in the first process that calls them took ~1 min, silently.

* One signature per kernel. `@kernel(sig)` on top of `@njit(cache=True)` declares the argument
  types (a tuple of numba types) every call site passes: inputs are typed read-only, so
  weights mapped read-only from a .safetensors file and writable arena / flat-buffer arrays
  share one compiled variant. At its first call a kernel compiles (or loads from the cache)
  exactly that signature and then stops compiling: Numba dispatches later calls through its
  safe conversions (writable -> read-only, C -> 'A' layout). An argument that converts to no
  declared signature still works: that exact variant is compiled (correct, only slow) and
  recorded in `unplanned`.
* `ensure_compiled(graph)` (called once when a CPU executor is built) maps the graph's ops to
  the kernels they run, checks which of them are missing from the on-disk cache by reading
  Numba's cache index files only (milliseconds), and compiles the missing ones in worker
  processes, one per CPU core, longest first, each writing Numba's cache; the parent prints
  one progress line on stderr and loads each kernel from the cache as its worker reports it.
  Workers share the parent's environment and NUMBA_CACHE_DIR, so the index keys match.
  Two workers never compile the same kernel (one cache index file each), so no index write
  races.

Switches: PROGRESS (None: progress only when stderr is a TTY or NBFORMER_PROGRESS=1; True/False
force it; NBFORMER_PROGRESS=0 also turns it off) and ENABLED (False, or NBFORMER_PRECOMPILE=0:
no worker processes, kernels compile in-process at first call as before). Both are module
globals so that the CLI's --json path and library users can set them. WORKERS (None: one per
available core; or NBFORMER_COMPILE_WORKERS) caps the number of processes.

    python -c "from nbformer.kernels.cpu import precompile; precompile.ensure_compiled('all')"

compiles every kernel ahead of time (e.g. after installing).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time

from numba import types as _t
from numba.core.registry import CPUDispatcher

PROGRESS = None  # None: auto (stderr is a TTY, or NBFORMER_PROGRESS=1); True / False: forced
ENABLED = True  # False: never start workers (kernels then compile in-process at first call)
WORKERS = None  # None: one per available core (NBFORMER_COMPILE_WORKERS overrides)
MESSAGE = "compiling kernels for this CPU (first run only)"

# ---------------------------------------------------------------- signature vocabulary


def array(dtype, ndim, layout="C", readonly=False):
    return _t.Array(dtype, ndim, layout, readonly=readonly)


_f32, _i64, _u8 = _t.float32, _t.int64, _t.uint8
F1, F2, F3 = array(_f32, 1), array(_f32, 2), array(_f32, 3)  # float32 outputs (C-contiguous, writable)
R1, R2, R3 = (array(_f32, n, readonly=True) for n in (1, 2, 3))  # float32 inputs: read-only C
RA3 = array(_f32, 3, "A", readonly=True)  # read-only, any layout (strided q/kv views)
RI1, RI2 = array(_i64, 1, readonly=True), array(_i64, 2, readonly=True)  # int64 inputs
RU2 = array(_u8, 2, readonly=True)  # uint8 masks
I64, F64, F32, U64, BOOL = _t.int64, _t.float64, _t.float32, _t.uint64, _t.boolean

# ---------------------------------------------------------------- registry

_KERNELS: dict = {}  # "linear._linear_fwd" -> Kernel
_lock = threading.RLock()
unplanned: list = []  # (kernel, argument types) compiled outside the declared signatures


class Kernel:
    """A top-level njit dispatcher and the signatures it is compiled for."""

    def __init__(self, key, disp, sigs, cost):
        self.key, self.disp, self.sigs, self.cost = key, disp, [tuple(s) for s in sigs], float(cost)
        self.loaded = False
        self._search_base = disp._search_new_conversions

    # -- in this process
    def load(self):
        """Compile (or load from the cache) the declared signatures, then dispatch only to them."""
        with _lock:
            if self.loaded:
                return
            d = self.disp
            d._can_compile = True
            for s in self.sigs:
                d.compile(s)
            d._can_compile = False  # later calls: conversions to these signatures, never a new variant
            self.loaded = True

    def _first_call(self, *args, **kws):
        # the C dispatcher found no compiled variant and asks for one to call with these args:
        # load ours, and hand back the dispatcher itself (the call is then dispatched again,
        # through the conversions to the declared signatures)
        self.load()
        return self.disp

    def _search_new_conversions(self, *args, **kws):
        # no declared signature matched exactly: Numba's own search for a safe conversion first ...
        if self._search_base(*args, **kws):
            return True
        # ... else compile this exact variant (correct, slower to start; recorded for the tests)
        d = self.disp
        tys = tuple(d.typeof_pyval(a) for a in args)
        with _lock:
            unplanned.append((self.key, tys))
            d._can_compile = True
            try:
                d.compile(tys)
            finally:
                d._can_compile = False
        return True

    # -- the on-disk cache
    def in_cache(self):
        """True if every signature is compiled here or in Numba's on-disk cache (reads the index
        file only); None if this dispatcher has no on-disk cache."""
        d = self.disp
        if self.loaded or all(s in d.overloads for s in self.sigs):
            return True
        cache = getattr(d, "_cache", None)
        cache_file = getattr(cache, "_cache_file", None)
        if cache_file is None:
            return None
        try:
            index = cache_file._load_index()
            codegen = d.targetctx.codegen()
            return all(cache._index_key(s, codegen) in index for s in self.sigs)
        except Exception:  # unreadable index: treat as missing (the worker rewrites it)
            return False

    def compile_all(self):
        """Worker side: compile every signature (each is written to the on-disk cache)."""
        d = self.disp
        d._can_compile = True
        for s in self.sigs:
            d.compile(s)


def kernel(*sigs, cost=1.0):
    """Declare the signature(s) of a top-level CPU kernel; put it above @njit(cache=True).

    cost: rough relative compile time (for the order in which workers take kernels)."""

    def deco(disp):
        if not isinstance(disp, CPUDispatcher):  # NUMBA_DISABLE_JIT: a plain function
            return disp
        mod = disp.py_func.__module__.rsplit(".", 1)[-1]
        k = Kernel(f"{mod}.{disp.py_func.__name__}", disp, sigs, cost)
        _KERNELS[k.key] = k
        disp._compile_for_args = k._first_call  # looked up by name by Numba's C dispatcher
        disp._search_new_conversions = k._search_new_conversions
        return disp

    return deco


# ---------------------------------------------------------------- calls that do not link the callee
# A parallel kernel that calls another njit function links a copy of the callee's code into its
# gufunc and again into itself, each copy optimised and code-generated anew (and the callee's own
# library once more): for the big per-work-item functions that was half of a kernel's compile
# time. native_caller / native_address let a kernel call a separately compiled and cached kernel
# through its native entry point instead, with an address passed in as an int64 argument: the
# callee compiles once, in parallel with its caller, and nothing of it is linked in.


def native_caller(sig):
    """An intrinsic call(addr, args) that calls a kernel compiled for `sig` (a tuple of numba
    types; void result) at native address addr (native_address), args a tuple converting safely
    to sig (checked when the caller is typed). Errors the callee may signal are ignored: use it
    for functions that cannot raise on the inputs their launcher lets through."""
    from numba.core import cgutils, errors
    from numba.core.typeconv import Conversion
    from numba.extending import intrinsic

    sig = tuple(sig)

    @intrinsic
    def call(typingctx, addr, args):
        if not isinstance(addr, _t.Integer) or not isinstance(args, _t.BaseTuple):
            return None
        if len(args) != len(sig):
            raise errors.TypingError(f"native call: {len(args)} arguments for a signature of {len(sig)}")
        for i, (a, f) in enumerate(zip(args.types, sig)):
            conv = typingctx.can_convert(a, f)
            if conv is None or conv > Conversion.safe:
                raise errors.TypingError(f"native call: argument {i} is {a}, the callee takes {f}")

        def codegen(context, builder, signature, llargs):
            argtys = list(sig)
            fnty = context.call_conv.get_function_type(_t.void, argtys)
            fn = builder.inttoptr(llargs[0], fnty.as_pointer())
            vals = cgutils.unpack_tuple(builder, llargs[1], len(sig))
            vals = [context.cast(builder, v, a, f) for v, a, f in zip(vals, signature.args[1].types, sig)]
            context.call_conv.call_function(builder, fn, _t.void, argtys, vals)
            return context.get_dummy_value()

        return _t.void(addr, args), codegen

    return call


_ADDRESSES: dict = {}


def entry_point(key):
    """The compiled entry point of a declared kernel (one signature), loaded or compiled first:
    callable from Python without Numba's dispatch (the caller checks the argument types)."""
    k = get(key)
    k.load()
    return k.disp.overloads[k.sigs[0]].entry_point


def native_address(key) -> int:
    """The native entry point of a declared kernel (one signature), loaded or compiled first."""
    a = _ADDRESSES.get(key)
    if a is None:
        k = get(key)
        k.load()
        cres = k.disp.overloads[k.sigs[0]]
        a = _ADDRESSES[key] = int(cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name))
    return a


_MODULES = ("attention", "attention_backward", "attention_backward_amx", "attention_decode", "dropout", "elementwise", "embedding", "gemm", "gemm_amx", "kv_cache",
            "layernorm", "linear", "loss", "optim", "pooling", "sampling", "softmax", "rmsnorm", "rope", "swiglu",
            "qlinear")


def _import_all():
    for m in _MODULES:
        try:
            importlib.import_module(f"{__package__}.{m}")
        except ModuleNotFoundError as e:  # a kernel family this checkout does not have
            if e.name != f"{__package__}.{m}":
                raise


def get(key) -> Kernel:
    k = _KERNELS.get(key)
    if k is None:
        importlib.import_module(f"{__package__}.{key.split('.')[0]}")
        k = _KERNELS[key]
    return k


def all_kernels() -> dict:
    _import_all()
    return dict(_KERNELS)


# ---------------------------------------------------------------- which kernels a graph runs

# (op, direction) -> kernels its CPU launcher may call
OPS = {
    ("embedding", "forward"): ["embedding._embedding_forward"],
    ("layernorm", "forward"): ["layernorm._layernorm_forward"],
    ("linear", "forward"): ["linear._linear_fwd"],
    ("kv_write", "forward"): ["kv_cache._kv_write", "kv_cache._kv_write_serial"],
    ("attention", "forward"): ["attention._attention_forward_core", "attention._attention_item"],
    ("add", "forward"): ["elementwise._add_forward"],
    ("take_rows", "forward"): ["elementwise._take_rows"],
    ("softmax", "forward"): ["softmax._softmax_forward"],
    ("log_softmax", "forward"): ["softmax._softmax_forward"],
    ("pool", "forward"): ["pooling._pool"],
    ("l2_normalize", "forward"): ["pooling._l2_normalize"],
    ("kv_reorder", "forward"): ["kv_cache._gather_rows"],
    ("sample", "forward"): ["sampling._sample"],
    ("sample_rows", "forward"): ["sampling._sample"],
    ("dropout", "forward"): ["dropout._dropout"],
    ("cross_entropy", "forward"): ["loss._cross_entropy_forward"],
    ("embedding", "backward"): ["embedding._embedding_backward_table"],
    ("layernorm", "backward"): ["layernorm._layernorm_backward"],
    ("linear", "backward"): ["linear._linear_backward_elementwise", "linear._backward_rows", "gemm.matmul_nn",
                             "gemm.matmul_tn"],
    ("dropout", "backward"): ["dropout._dropout"],
    ("cross_entropy", "backward"): ["loss._cross_entropy_backward"],
    ("attention", "backward"): ["attention_backward._dkdv"],  # + one schedule's items: _attention_backward_items
    ("adam", "forward"): ["optim._adam_step"],
    ("grad_norm", "forward"): ["optim._sumsq"],
    ("scale", "forward"): ["optim._scale"],
    ("rmsnorm", "forward"): ["rmsnorm._rmsnorm_forward", "rmsnorm._rmsnorm_forward_serial"],
    ("rmsnorm", "backward"): ["rmsnorm._rmsnorm_backward"],
    ("rope", "forward"): ["rope._rope", "rope._rope_serial"],
    ("rope", "backward"): ["rope._rope", "rope._rope_serial"],
    ("linear_glu", "forward"): ["swiglu._glu_linear_fwd"],
    ("glu", "forward"): ["swiglu._glu_fwd"],
    ("glu", "backward"): ["swiglu._glu_bwd"],
    ("qlinear", "forward"): ["qlinear._qlinear_fwd"],
    ("qlinear_glu", "forward"): ["qlinear._qlinear_fwd"],
}
# kernels run next to a graph rather than in it: the optimizer after a training step, the
# sampler and the beam-search cache reorder after a decoding step
_TRAINING = ["optim._adam_step", "optim._sumsq", "optim._scale"]
_DECODING = ["sampling._sample", "kv_cache._gather_rows", "elementwise._take_rows"]


def _few_queries(graph, node) -> bool:
    """Does this attention node run the decode kernel (attention_decode.MAX_QUERIES query rows or
    fewer)? Training and embedding graphs (hundreds of rows) then never compile it."""
    from .attention_decode import MAX_QUERIES

    q = graph.tensors.get(node.inputs.get("q"))
    return q is None or len(q.shape) < 2 or q.shape[1] <= MAX_QUERIES


def _tiled_attention(graph, node) -> bool:
    """Does this attention node (possibly) run the tiled kernel: more query rows than the decode
    kernel takes, attention dropout, or shapes unknown?"""
    from .attention_decode import MAX_QUERIES

    q = graph.tensors.get(node.inputs.get("q"))
    many = q is None or len(q.shape) < 2 or q.shape[1] > MAX_QUERIES
    return many or float(node.attrs.get("dropout_p", 0.0) or 0.0) > 0.0


_ONE_PASS = ["attention_backward._one_pass_item"]
_TWO_PASSES = ["attention_backward._delta", "attention_backward._dkdv_item", "attention_backward._dq",
               "attention_backward._dq_item"]


def _attention_backward_items(graph, node, threads=None) -> list:
    """The kernels of the schedule attention_backward.choose_passes picks for this node's shapes and
    this process's thread count (a tuned `passes` that differs compiles the other one at its first call),
    attention_backward_amx's items where the launcher runs the tile products on AMX (uses_amx); both
    schedules, or both variants, where the shapes leave it open."""
    import numba

    from .attention_backward import choose_passes, uses_amx

    q = graph.tensors.get(node.inputs.get("q"))
    kv = graph.tensors.get(node.inputs.get("kv"))
    hs = node.attrs.get("head_size")
    dims = (hs, q.shape[1] if q is not None and len(q.shape) > 1 else None,
            kv.shape[1] if kv is not None and len(kv.shape) > 1 else None)
    if all(isinstance(x, int) for x in dims):
        amx = [uses_amx(*dims, bool(node.attrs.get("causal", False)))]
    else:
        amx = sorted({False, uses_amx(10 ** 6, 10 ** 6, 10 ** 6, False)})
    nkv = node.attrs.get("n_kv_heads") or node.attrs.get("n_heads")
    keys = []
    for a in amx:
        if q is None or len(q.shape) < 1 or not isinstance(q.shape[0], int) or not isinstance(nkv, int):
            items = _ONE_PASS + _TWO_PASSES
        else:
            t = numba.get_num_threads() if threads is None else threads
            items = _ONE_PASS if choose_passes(q.shape[0], nkv, t, a) == 1 else _TWO_PASSES
        keys += [k.replace("attention_backward.", "attention_backward_amx.") if a and k.endswith("_item") else k
                 for k in items]
    return list(dict.fromkeys(keys))


def kernels_for(graph, frozen_weights=True) -> list:
    """Kernel keys a graph's CPU run needs (with the optimizer / sampler that run beside it);
    frozen_weights: its parameters are read-only (an inference model's), so the linear layers that
    run on AMX keep their packed weights (gemm_amx.packed_weight)."""
    keys = []
    backward = decoding = False
    for node in graph.nodes:
        if node.op == "dropout" and float(node.attrs.get("p", 0.0)) <= 0.0:
            continue  # p = 0 is a copy
        if node.op == "attention" and node.direction == "forward":
            # the launcher's kernel for Tq <= 4 without dropout is the decode kernel, the tiled one otherwise:
            # a short prompt's prefill and every decoding step never run (or compile) the tiled kernel
            if _few_queries(graph, node):
                keys += ["attention_decode._attention_decode", "attention_decode._decode_item"]
            if _tiled_attention(graph, node):
                keys += OPS[("attention", "forward")]
        elif node.op == "linear":
            keys += _linear_kernels(graph, node, frozen_weights)
        elif node.op == "cross_entropy" and "dlogits" in node.outputs:  # the loss with its backward
            keys.append("loss._cross_entropy_fused")
        else:
            keys += OPS.get((node.op, node.direction), [])
        if node.op == "attention" and node.direction == "backward":
            keys += _attention_backward_items(graph, node)
        backward |= node.direction == "backward"
        decoding |= node.op == "kv_write"
    if backward:
        keys += _TRAINING
    if decoding or ("logits" in graph.outputs and not backward):
        keys += _DECODING
    return list(dict.fromkeys(keys))


def _linear_kernels(graph, node, frozen_weights) -> list:
    """The kernels a linear node's launcher runs for its shapes: each of its products (the forward's;
    the backward's dX = G @ W and dW = G.T @ X) on AMX where linear._on_amx takes it, on BLAS
    otherwise, both where the shapes are unknown. frozen_weights: read-only weights, whose packed
    panels gemm_amx keeps (its packer runs as a kernel of its own)."""
    from . import gemm_amx

    x = graph.tensors.get(node.inputs.get("x"))
    w = graph.tensors.get(node.inputs.get("w"))
    dims = None
    if x is not None and w is not None and len(w.shape) == 2 and len(x.shape) >= 1:
        n = 1
        for d in x.shape[:-1]:
            n = n * d if isinstance(d, int) and isinstance(n, int) else None
        if isinstance(n, int) and all(isinstance(d, int) for d in w.shape):
            dims = (n,) + tuple(w.shape)

    def on_amx(R, C, K):  # True / False, or None: the shapes are unknown (both)
        if not gemm_amx.available():
            return False
        return None if dims is None else gemm_amx.worth(R, C, K)

    N, M, K = dims if dims is not None else (None, None, None)
    if node.direction == "forward":
        amx = on_amx(N, M, K)
        keys = (["linear._linear_amx"] + (["gemm_amx._pack_weight"] if frozen_weights else [])
                if amx is not False else [])
        return keys + (["linear._linear_fwd"] if amx is not True else [])
    keys = ["linear._linear_backward_elementwise", "linear._backward_rows"]
    products = [((M, K, N), "gemm.matmul_tn")]  # dW
    if "dx" in node.outputs:
        products.insert(0, ((N, K, M), "gemm.matmul_nn"))
    for shape, blas in products:
        amx = on_amx(*shape)
        keys += (["linear._linear_amx"] if amx is not False else []) + ([blas] if amx is not True else [])
    return keys


# ---------------------------------------------------------------- ensuring they are compiled

_verified: set = set()  # keys known compiled (or cached) in this process
last_run: dict = {}  # the last worker run: {'workers', 'kernels': key -> seconds, 'by_worker'}


def _progress_enabled(progress):
    if progress is not None:
        return bool(progress)
    if PROGRESS is not None:
        return bool(PROGRESS)
    env = os.environ.get("NBFORMER_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip() not in ("0", "false", "no", "off")
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _enabled():
    return ENABLED and os.environ.get("NBFORMER_PRECOMPILE", "1").strip() not in ("0", "false", "no", "off")


def _n_workers(n_jobs):
    n = WORKERS or os.environ.get("NBFORMER_COMPILE_WORKERS")
    if not n:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
    return max(1, min(int(n), n_jobs))


def missing(keys) -> list:
    """The kernels among keys that are neither compiled here nor in the on-disk cache."""
    out = []
    for key in keys:
        if key in _verified:
            continue
        try:
            state = get(key).in_cache()
        except (KeyError, ImportError):  # a key of OPS this checkout does not declare: nothing to do
            _verified.add(key)
            continue
        if state:
            _verified.add(key)
        elif state is False:
            out.append(key)
        # None: no on-disk cache for this kernel; it compiles in-process at its first call
    return out


def ensure_compiled(what="all", device_kind="cpu", progress=None, frozen_weights=True) -> dict:
    """Compile the kernels `what` needs that are missing from Numba's on-disk cache, in parallel
    worker processes, printing one progress line on stderr (see the module docstring).

    what: a Graph (frozen_weights: as kernels_for), an iterable of kernel keys, or 'all'. Returns {'compiled': [...], 'seconds': s}
    ({} when nothing was missing). Never raises for a failed worker: what a worker could not
    compile is compiled in this process (under the same progress line)."""
    if device_kind != "cpu":
        return {}
    from numba.core import config

    if config.DISABLE_JIT:
        return {}
    if what == "all":
        keys = list(all_kernels())
    elif hasattr(what, "nodes"):
        keys = kernels_for(what, frozen_weights=frozen_weights)
    else:
        keys = list(what)
    with _lock:
        todo = missing(keys)
        if not todo:
            return {}
        show = _progress_enabled(progress)
        t0 = time.perf_counter()
        bar = _Progress(len(todo), show)
        failed = []
        try:
            if _enabled() and len(todo) > 0:
                failed = _compile_in_workers(todo, bar)
            else:
                failed = list(todo)
            for key in failed:  # no workers, or a worker failed: compile here
                get(key).load()
                bar.step()
        finally:
            bar.close(time.perf_counter() - t0)
            if os.environ.get("NBFORMER_PRECOMPILE_LOG"):  # for benchmarks/bench_startup.py
                import json

                sys.stderr.write("precompile " + json.dumps({"seconds": round(time.perf_counter() - t0, 3),
                                                             **last_run}) + "\n")
        _verified.update(todo)
        return {"compiled": todo, "seconds": time.perf_counter() - t0, "in_process": failed}


class _Progress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self._write(f"{MESSAGE} {self.done}/{self.total}")

    def _write(self, text, end=""):
        if not self.enabled:
            return
        try:
            sys.stderr.write("\r" + text + end)
            sys.stderr.flush()
        except (OSError, ValueError):
            self.enabled = False

    def step(self):
        self.done = min(self.total, self.done + 1)
        self._write(f"{MESSAGE} {self.done}/{self.total}")

    def close(self, seconds):
        self._write(f"{MESSAGE} {self.done}/{self.total} in {seconds:.1f} s", end="\n")


_WORKER_CODE = "from nbformer.kernels.cpu.precompile import _worker_main; _worker_main()"


def _worker_env():
    from numba.core import config

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if config.CACHE_DIR:  # the cache this process reads (set by env or by numba.config at run time)
        env["NUMBA_CACHE_DIR"] = str(config.CACHE_DIR)
    env["NBFORMER_PRECOMPILE_WORKER"] = "1"
    return env


def _compile_in_workers(keys, bar) -> list:
    """Compile keys in worker processes pulling from one queue (most expensive first).
    -> the keys that failed (to be compiled in this process)."""
    import queue
    import tempfile

    jobs = sorted(keys, key=lambda k: -get(k).cost)
    pending = list(jobs)
    taking = threading.Lock()
    events = queue.Queue()
    env = _worker_env()
    procs = []
    for _ in range(_n_workers(len(jobs))):
        err = tempfile.TemporaryFile()
        try:
            p = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, env=env, text=True, bufsize=1)
        except OSError:
            err.close()
            break
        procs.append((p, err))
    if not procs:
        return list(keys)

    times = {}  # key -> (seconds in the worker, worker index)

    def drive(p, worker):
        while True:
            with taking:
                key = pending.pop(0) if pending else None
            if key is None:
                break
            try:
                p.stdin.write(key + "\n")
                p.stdin.flush()
                line = p.stdout.readline()
            except (OSError, ValueError):
                line = ""
            if not line:  # the worker died: this key, and what it would have taken, go elsewhere
                events.put(("err", key))
                break
            status, _, rest = line.strip().partition(" ")
            secs = rest.rpartition(" ")[2]
            times[key] = (float(secs) if status == "ok" and secs.replace(".", "", 1).isdigit() else None, worker)
            events.put(("ok" if status == "ok" else "err", key))
        events.put(("exit", None))

    threads = [threading.Thread(target=drive, args=(p, i), daemon=True) for i, (p, _) in enumerate(procs)]
    for th in threads:
        th.start()
    failed = []
    interrupted = True
    try:
        exits = 0
        while exits < len(threads):
            kind, key = events.get()
            if kind == "exit":
                exits += 1
            elif kind == "ok":
                get(key).load()  # from the cache the worker just wrote, while the others still compile
                bar.step()
            else:
                failed.append(key)
        failed += pending  # every worker died before these were taken
        pending.clear()
        interrupted = False
    finally:
        for p, err in procs:
            if interrupted:  # Ctrl-C (or an error here): stop the workers now
                p.kill()
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            except KeyboardInterrupt:
                p.kill()
                raise
            err.close()
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    # what the workers reported compiled must now be in the cache; anything else is compiled here
    failed += [k for k in keys if k not in failed and get(k).in_cache() is False]
    last_run.clear()
    last_run.update(workers=len(procs), kernels={k: v[0] for k, v in times.items()},
                    by_worker=[[k for k, v in times.items() if v[1] == i] for i in range(len(procs))])
    return list(dict.fromkeys(failed))


def _worker_main():
    """Worker process: read kernel keys on stdin, compile each into the cache, answer 'ok KEY s'."""
    import warnings

    warnings.simplefilter("ignore")
    for line in sys.stdin:
        key = line.strip()
        if not key:
            continue
        t0 = time.perf_counter()
        try:
            get(key).compile_all()
            reply = f"ok {key} {time.perf_counter() - t0:.3f}"
        except BaseException as e:  # noqa: BLE001  (reported to the parent, which compiles it itself)
            reply = f"err {key} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
