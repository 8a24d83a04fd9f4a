"""What "this machine" means to the tuner and the benchmarks: a machine key and the cache directory.

A tuned value (a GEMM block, an attention tile, a CUDA block size) is only worth trusting on the
machine and library versions it was measured with. `machine_key(device_kind)` returns the facts
that decide it: CPU model, the instruction-set flags LLVM compiles for, core count, Numba /
llvmlite / numba-cuda versions and, on CUDA, the GPU name and compute capability. Two keys are
the same machine when every field matches (`same_machine`); `differences` names the fields that
do not, for the notice printed when a foreign cache is ignored.

`cache_dir()` is where nbformer keeps per-machine data (the tuning cache, the measured roofline):
$NBFORMER_CACHE_DIR when set, else $XDG_CACHE_HOME/nbformer, else ~/.cache/nbformer.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from ..errors import InputError

CACHE_ENV = "NBFORMER_CACHE_DIR"
KEY_VERSION = 1  # bump when the key's fields change: old caches then read as foreign

# the ISA flags that decide what LLVM vectorises with (from /proc/cpuinfo on x86 / arm)
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "neon", "asimd", "sve", "vnni")


def cache_dir() -> Path:
    """The directory nbformer keeps per-machine data in (not created here)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if p.exists() and not p.is_dir():
            raise InputError(f"{CACHE_ENV}={env!r}: expected a directory, found a file")
        return p
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nbformer"


@functools.lru_cache(maxsize=None)  # read once per process: importlib.metadata parses files (~2 ms a call)
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple:
    """(model name, sorted ISA flags) from /proc/cpuinfo, falling back on platform."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if model is None and k in ("model name", "hardware", "cpu model"):
                    model = v.strip()
                elif not flags and k in ("flags", "features"):
                    flags = v.split()
                if model is not None and flags:
                    break
    except OSError:
        pass
    isa = sorted({f for f in flags if f.startswith(_ISA_PREFIXES)})
    return (model or platform.processor() or platform.machine() or "unknown"), tuple(isa)


@functools.lru_cache(maxsize=1)
def _llvm_cpu() -> tuple:
    """(LLVM host CPU name, the enabled target features): what Numba actually compiles for."""
    try:
        import llvmlite.binding as ll

        name = ll.get_host_cpu_name()
        feats = ll.get_host_cpu_features()
        on = sorted(k for k, v in feats.items() if v)
        return name, tuple(on)
    except Exception:  # pragma: no cover - llvmlite always present with numba
        return "unknown", ()


def _cuda_facts(device_kind: str) -> dict:
    """GPU name, compute capability and limits of the device named by device_kind ('cuda[:N]')."""
    from ..devices import _cuda_module, parse_device_name

    _, index = parse_device_name(device_kind)
    cuda = _cuda_module()  # DeviceError when there is no usable GPU
    from numba import config

    if config.ENABLE_CUDASIM:
        return {"gpu": "CUDA simulator", "compute_capability": "5.2", "simulator": True,
                "max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024}
    if index >= len(cuda.gpus):
        raise InputError(f"device {device_kind!r}: there are {len(cuda.gpus)} GPU(s) here")
    with cuda.gpus[index]:
        d = cuda.get_current_device()
        name = d.name.decode() if isinstance(d.name, bytes) else str(d.name)
        cc = d.compute_capability
        return {"gpu": name, "compute_capability": f"{cc[0]}.{cc[1]}", "simulator": False,
                "max_threads_per_block": int(d.MAX_THREADS_PER_BLOCK),
                "max_shared_memory_per_block": int(d.MAX_SHARED_MEMORY_PER_BLOCK)}


def machine_key(device_kind: str = "cpu") -> dict:
    """The facts a tuned value depends on, as a JSON-able dict.

    device_kind: 'cpu', 'cuda' or 'cuda:N'. CUDA keys add the GPU's name, compute capability and
    limits (and raise DeviceError when no GPU is usable)."""
    from ..devices import parse_device_name

    kind, _ = parse_device_name(device_kind)
    model, isa = _cpuinfo()
    llvm_name, llvm_feats = _llvm_cpu()
    key = {
        "key_version": KEY_VERSION,
        "device": kind,
        "cpu_model": model,
        "llvm_cpu": llvm_name,
        "isa": list(isa) if isa else [f for f in llvm_feats if f.startswith(("avx", "sse", "fma", "neon", "sve"))],
        "cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "numba_cuda": _version("numba-cuda"),
    }
    if kind == "cuda":
        key.update(_cuda_facts(device_kind))
    return key


def key_id(key: dict) -> str:
    """A short stable hash of a machine key (names cache files, tags benchmark rows)."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def differences(a: dict, b: dict) -> list:
    """The fields in which two machine keys differ, as 'field: a -> b' strings."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, list) and isinstance(vb, list):
                extra, missing = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
                out.append(f"{k}: +{extra} -{missing}")
            else:
                out.append(f"{k}: {va!r} -> {vb!r}")
    return out


def same_machine(a: dict, b: dict) -> bool:
    return not differences(a, b)


def describe(key: dict) -> str:
    """One line for humans: 'AMD EPYC (znver5, 2 cores), numba 0.68.1' (+ GPU on CUDA)."""
    s = f"{key.get('cpu_model')} ({key.get('llvm_cpu')}, {key.get('cores')} cores), numba {key.get('numba')}"
    if key.get("device") == "cuda":
        s = f"{key.get('gpu')} (sm {key.get('compute_capability')}), numba-cuda {key.get('numba_cuda')}; host " + s
    return s
