"""The per-machine tuning cache: one JSON file per machine key and device kind.

Location: $NBFORMER_TUNING_CACHE (one explicit file) or
<cache_dir>/tuning/<device>-<machine id>.json, cache_dir() being $NBFORMER_CACHE_DIR,
$XDG_CACHE_HOME/nbformer or ~/.cache/nbformer (nbformer.tuning.machine).

The file records the machine key it was made on (CPU model, ISA flags, core count, Numba /
llvmlite / numba-cuda versions; GPU name and compute capability on CUDA). A file whose key differs
from this machine's, or whose format is unknown, or that does not parse, is ignored with a notice
on stderr (once per file and process), never trusted. Each entry is keyed by kernel family, dtype
and shape bucket, and records the kernel source hash it was tuned with: an entry whose kernel
source has changed since is stale and is not used either.

Entries: {"family", "device", "dtype", "bucket", "case", "config", "default", "source_hash",
"time_s", "default_time_s", "spread", "default_spread", "speedup", "tuned_at", "tried",
"rejected", "tuning_s"}. Writes are atomic (a temporary file, then os.replace).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InputError
from .machine import cache_dir, differences, key_id, machine_key

FORMAT = 1
FILE_ENV = "NBFORMER_TUNING_CACHE"
_noticed: set = set()


def notice(msg: str):
    """Print a one-line notice on stderr, once per process for the same text."""
    if msg in _noticed:
        return
    _noticed.add(msg)
    try:
        sys.stderr.write(f"nbformer: {msg}\n")
    except (OSError, ValueError):
        pass


def default_path(device_kind: str, key: dict | None = None) -> Path:
    env = os.environ.get(FILE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    key = key or machine_key(device_kind)
    return cache_dir() / "tuning" / f"{key['device']}-{key_id(key)}.json"


def entry_key(family, bucket: dict) -> str:
    return f"{family.key}|{family.dtype}|" + json.dumps(bucket, sort_keys=True, separators=(",", ":"))


def _distance(a: dict, b: dict, fields) -> float:
    return sum(abs(math.log2(1 + float(a[f])) - math.log2(1 + float(b[f]))) for f in fields)


class TuningCache:
    def __init__(self, device_kind: str = "cpu", path=None, key: dict | None = None):
        self.key = key or machine_key(device_kind)
        self.device = self.key["device"]
        self.path = Path(path).expanduser() if path is not None else default_path(device_kind, self.key)
        self.entries: dict = {}
        self.ignored: str | None = None  # why the file on disk was not used
        self.mtime = None
        self.load()

    # ------------------------------------------------------------ reading
    def load(self):
        self.entries, self.ignored = {}, None
        p = self.path
        if not p.exists():
            self.mtime = None
            if os.environ.get(FILE_ENV, "").strip() == "":
                others = sorted(p.parent.glob(f"{self.device}-*.json")) if p.parent.is_dir() else []
                if others:
                    why = self._foreign_reason(others[-1])
                    self.ignored = (f"tuning cache: {len(others)} file(s) in {p.parent} were made on another machine "
                                    f"or library version and are not used ({why}); defaults until `nbformer tune` "
                                    f"runs here")
                    notice(self.ignored)
            return
        try:
            self.mtime = p.stat().st_mtime_ns
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            self.ignored = f"tuning cache {p}: unreadable ({type(e).__name__}: {e}); ignored, defaults are used"
            notice(self.ignored)
            return
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            self.ignored = (f"tuning cache {p}: not an nbformer tuning cache of format {FORMAT}; ignored, "
                            f"defaults are used")
            notice(self.ignored)
            return
        theirs = data.get("machine")
        if not isinstance(theirs, dict) or differences(theirs, self.key):
            diff = differences(theirs, self.key) if isinstance(theirs, dict) else ["no machine key"]
            self.ignored = (f"tuning cache {p} was made on another machine or library version "
                            f"({'; '.join(diff[:4])}); ignored, defaults are used")
            notice(self.ignored)
            return
        self.entries = data["entries"]

    def _foreign_reason(self, path) -> str:
        try:
            theirs = json.loads(Path(path).read_text(encoding="utf-8")).get("machine", {})
            return "; ".join(differences(theirs, self.key)[:3]) or "different machine id"
        except (OSError, ValueError, AttributeError):
            return "unreadable"

    def changed_on_disk(self) -> bool:
        try:
            m = self.path.stat().st_mtime_ns
        except OSError:
            m = None
        return m != self.mtime

    # ------------------------------------------------------------ lookups
    def lookup(self, family, bucket: dict):
        """-> (entry, how) with how 'exact' or 'nearest <field=value ...>', or (None, reason)."""
        k = entry_key(family, bucket)
        e = self.entries.get(k)
        src = family.source_hash()
        stale = 0
        if e is not None:
            if e.get("source_hash") == src:
                return e, "exact"
            stale += 1
        best, best_d = None, None
        fixed = [f for f in bucket if f not in family.nearest]
        for e2 in self.entries.values():
            if e2.get("family") != family.key or e2.get("dtype") != family.dtype:
                continue
            b2 = e2.get("bucket", {})
            if set(b2) != set(bucket) or any(b2[f] != bucket[f] for f in fixed):
                continue
            if e2.get("source_hash") != src:
                stale += 1
                continue
            d = _distance(bucket, b2, family.nearest)
            if best_d is None or d < best_d or (d == best_d and json.dumps(b2, sort_keys=True) < json.dumps(
                    best["bucket"], sort_keys=True)):
                best, best_d = e2, d
        if best is not None:
            diff = " ".join(f"{f}={best['bucket'][f]}" for f in family.nearest if best["bucket"][f] != bucket[f])
            return best, f"nearest {diff}"
        return None, ("stale (kernel source changed since tuning)" if stale else "not tuned")

    # ------------------------------------------------------------ writing
    def put(self, family, result) -> dict:
        """Store a tuner result (nbformer.tuning.tuner.CaseResult)."""
        e = {"family": family.key, "device": family.device, "dtype": family.dtype, "bucket": result.bucket,
             "case": result.case, "config": result.best, "default": result.default,
             "source_hash": family.source_hash(), "time_s": result.best_s, "default_time_s": result.default_s,
             "spread": result.best_spread, "default_spread": result.default_spread, "speedup": result.speedup,
             "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tried": result.tried,
             "rejected": [{"config": c, "reason": r} for c, r in result.rejected][:20],
             "tuning_s": result.seconds}
        self.entries[entry_key(family, result.bucket)] = e
        return e

    def save(self):
        data = {"format": FORMAT, "machine": self.key, "machine_id": key_id(self.key), "entries": self.entries}
        p = self.path
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # (mkstemp makes it 0600)
            os.replace(tmp, p)
        except OSError as e:
            raise InputError(f"tuning cache {p}: cannot write it ({e}); set NBFORMER_CACHE_DIR or "
                             f"{FILE_ENV} to a writable place") from None
        self.mtime = p.stat().st_mtime_ns
        self.ignored = None
