"""Output of `nbformer bench`: md (llama-bench's table), csv, json, jsonl; machine info and build.

md prints rows as they finish and ends with the build / machine line; csv prints one header and
a row per result, with the machine and build on every row; jsonl one object per row (same
fields); json one object {"build", "machine", "rooflines"?, "rows"} at the end.
"""
from __future__ import annotations

import csv
import io
import json
import platform

from ..errors import InputError

FORMATS = ("md", "csv", "json", "jsonl")


def check_format(fmt: str) -> str:
    f = str(fmt).strip().lower()
    if f not in FORMATS:
        raise InputError(f"-o/--output {fmt!r}: unknown output format (expected one of {', '.join(FORMATS)})")
    return f


def build_info() -> dict:
    """nbformer version, the git commit when run from a checkout (absent otherwise), library versions."""
    import numba
    import numpy

    from .. import __version__
    from .env import git_commit

    info = {"nbformer_version": __version__, **git_commit(), "python": platform.python_version(),
            "numpy": numpy.__version__, "numba": numba.__version__}
    load = load_average()
    if load is not None:
        info["load_average"] = load  # (1, 5, 15 minutes) when the run started: other work on the machine
    return info


def load_average():
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_note(build: dict, machine: dict) -> str | None:
    """A warning when other processes kept the CPUs busy as the run started."""
    load, cores = build.get("load_average"), machine.get("cores") or 1
    if load and load[0] > 0.75 * cores:
        return (f"note: load average {load[0]:.1f} on {cores} core{'s' * (cores != 1)} when the run started: "
                f"other processes compete for the CPUs, expect noisy rows")
    return None


def machine_info(device: str) -> dict:
    """The machine key of nbformer.tuning.machine (CPU model, ISA, cores, versions, GPU), its id
    and a one-line description."""
    from ..tuning.machine import describe, key_id, machine_key

    kind = device.split(":")[0]
    key = machine_key(device if kind == "cuda" else "cpu")
    return {"id": key_id(key), "description": describe(key), **key}


def _flat_meta(build: dict, machine: dict) -> dict:
    """The per-row machine / build columns of csv and jsonl."""
    out = {k: build[k] for k in ("git_commit", "git_dirty", "nbformer_version") if k in build}
    out["machine_id"] = machine.get("id")
    out["cpu_model"] = machine.get("cpu_model")
    out["cpu_cores"] = machine.get("cores")
    out["llvm_cpu"] = machine.get("llvm_cpu")
    if machine.get("gpu"):
        out["gpu"] = machine.get("gpu")
        out["compute_capability"] = machine.get("compute_capability")
    return out


def _si(n: float) -> str:
    for unit, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f}"


def _mib(n: int) -> str:
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.2f} MiB"


def _dur(us: float, spread: float | None = None) -> str:
    if us >= 1e3:
        v, unit, f = us / 1e3, "ms", 1e3
    else:
        v, unit, f = us, "µs", 1.0
    if spread is None:
        return f"{v:.2f} {unit}"
    return f"{v:.2f} ± {spread / f:.2f} {unit}"


def _config_note(r: dict) -> str:
    """' [tuned: cache block_q=64]' / ' [block_q=64]': which launcher configuration ran."""
    kw = " ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
    if "tuned" in r:
        return f" [tuned: {r['tuned']['source']}{' ' + kw if kw else ''}]"
    return f" [{kw}]" if kw else ""


# md tables: (header, align right?, cell function)
MODEL_COLUMNS = [
    ("model", False, lambda r: r["model"]),
    ("type", False, lambda r: r["model_type"]),
    ("size", True, lambda r: _mib(r["model_size"])),
    ("params", True, lambda r: _si(r["model_n_params"])),
    ("device", False, lambda r: r["device"]),
    ("batch", True, lambda r: str(r["n_batch"])),
    ("threads", True, lambda r: str(r["n_threads"])),
    ("test", True, lambda r: r["test"]),
    ("t/s", True, lambda r: f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"),
    ("compile s", True, lambda r: f"{r['compile_s']:.2f}"),
]

KERNEL_COLUMNS = [
    ("kernel", False, lambda r: r["kernel"] + "".join(f" {k}" if v is True else f" {k}={v}"
                                                      for k, v in r["options"].items() if v not in (False, "none"))
     + _config_note(r)),
    ("shape", False, lambda r: ",".join(f"{k}={v}" for k, v in r["dims"].items())),
    ("device", False, lambda r: r["device"]),
    ("threads", True, lambda r: "-" if r["n_threads"] is None else str(r["n_threads"])),
    ("time", True, lambda r: _dur(r["time_us"], r["spread_us"])),
    ("GFLOP/s", True, lambda r: f"{r['gflops']:,.2f}"),
    ("GB/s", True, lambda r: f"{r['gbs']:,.2f}"),
    ("FLOP/B", True, lambda r: f"{r['intensity']:.2f}"),
    ("roofline", True, lambda r: f"{100 * r['roof_fraction']:.1f} %"),
    ("bound", False, lambda r: r["bound"]),
    ("compile s", True, lambda r: f"{r['compile_s']:.2f}"),
]


class Writer:
    """Streams rows in one format. echo(text) writes a line (click.echo in the CLI)."""

    def __init__(self, fmt: str, kind: str, build: dict, machine: dict, echo):
        self.fmt, self.kind, self.build, self.machine, self.echo = check_format(fmt), kind, build, machine, echo
        self.rows, self.rooflines = [], []
        self._csv_fields = None
        self._md_started = False
        self.columns = MODEL_COLUMNS if kind == "model" else KERNEL_COLUMNS

    def roofline(self, roof):
        """A roofline the kernel rows refer to (md: one line before the table; json: 'rooflines')."""
        self.rooflines.append(roof)
        if self.fmt == "md":
            when = "measured now" if roof.source == "measured" else f"cached, measured {roof.measured_at}"
            self.echo(f"roofline ({roof.label()}; {when}): peak {roof.peak_gflops:,.1f} GFLOP/s, read "
                      f"{roof.read_gbs:,.1f} GB/s, ridge {roof.ridge:.2f} FLOP/B")

    def row(self, r: dict):
        self.rows.append(r)
        if self.fmt == "md":
            if not self._md_started:
                self._md_started = True
                self.echo("")
                self.echo("| " + " | ".join(h for h, _, _ in self.columns) + " |")
                self.echo("|" + "|".join(("-" * (len(h) + 1) + ":") if right else (":" + "-" * (len(h) + 1))
                                          for h, right, _ in self.columns) + "|")
            self.echo("| " + " | ".join(fn(r) for _, _, fn in self.columns) + " |")
        elif self.fmt == "jsonl":
            self.echo(json.dumps({**r, **_flat_meta(self.build, self.machine), "machine": self.machine},
                                 ensure_ascii=False))
        elif self.fmt == "csv":
            flat = self._csv_row(r)
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self._csv_fields or list(flat), lineterminator="\n",
                               extrasaction="ignore")
            if self._csv_fields is None:
                self._csv_fields = list(flat)
                w.writeheader()
            w.writerow(flat)
            self.echo(buf.getvalue().rstrip("\n"))

    def _csv_row(self, r: dict) -> dict:
        out = {}
        for k, v in r.items():
            if isinstance(v, dict):  # one column ('B=1 H=12 T=256 D=64'): rows of several kernels align
                out[k] = " ".join(f"{k2}={v2}" for k2, v2 in v.items())
            elif isinstance(v, list):
                out[k] = " ".join(str(x) for x in v)
            else:
                out[k] = v
        out.update(_flat_meta(self.build, self.machine))
        return out

    def close(self):
        if self.fmt == "json":
            doc = {"build": self.build, "machine": self.machine}
            if self.kind == "kernel":
                doc["rooflines"] = [r.to_json() for r in self.rooflines]
            doc["rows"] = self.rows
            self.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        elif self.fmt == "md":
            commit = self.build.get("git_commit")
            b = f"build: {commit[:12]}{'-dirty' if self.build.get('git_dirty') else ''}, " if commit else "build: "
            self.echo("")
            self.echo(f"{b}nbformer {self.build['nbformer_version']}; {self.machine.get('description')}")
            busy = busy_note(self.build, self.machine)
            if busy:
                self.echo(busy)
            over = [r for r in self.rows if r.get("roof_fraction", 0) > 1.05]
            if over:
                self.echo(f"note: {len(over)} row{'s' * (len(over) > 1)} above 100 % of the measured roofline: the "
                          f"roofline was measured low (a busy machine?) or the data stayed in cache; "
                          f"--remeasure on a quiet machine")
