"""Winners used at run time: what the executor binds for each node of its plan.

NBFORMER_TUNING selects the mode:
  cached (default)  use this machine's tuning cache where it has the node's shape bucket (or the
                    nearest tuned bucket of the same kernel and model dims), else the defaults;
  off               always the kernels' defaults (the cache is not even read);
  tune              as cached, and a bucket missing from the cache is tuned on first use (when the
                    executor is built), with NBFORMER_TUNING_BUDGET seconds per kernel shape
                    (default 10), then written to the cache.

`bind(node, graph, device_kind)` -> Binding(kwargs for the launcher, where they came from). The
executor calls it once per node when it is built, so a run pays nothing per call; the bound
values are listed by `nbformer inspect MODEL --tuning`. The one exception is decoding attention,
whose key length grows every step: its Binding holds a table {power-of-two key-length bucket:
kwargs} (each bucket resolved here, exact or nearest tuned) and the adapter picks the entry of the
current length, a dict lookup per call; with nothing tuned the table is dropped (no keywords).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ..errors import InputError

ENV = "NBFORMER_TUNING"
BUDGET_ENV = "NBFORMER_TUNING_BUDGET"
MODES = ("off", "cached", "tune")
_caches: dict = {}
_lock = threading.RLock()


@dataclass
class Binding:
    family: str          # 'cpu.linear'
    case: dict
    bucket: dict
    config: dict         # the full config that runs (defaults filled in)
    kwargs: dict         # what the adapter passes to the launcher ({} = the launcher's defaults)
    source: str          # 'default', 'default (not tuned)', 'cache', 'cache (nearest N=512)', ...
    description: str = ""


def mode() -> str:
    m = os.environ.get(ENV, "").strip().lower() or "cached"
    if m not in MODES:
        raise InputError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def budget() -> float:
    v = os.environ.get(BUDGET_ENV, "").strip()
    if not v:
        return 10.0
    try:
        b = float(v)
    except ValueError:
        b = -1.0
    if not b > 0:
        raise InputError(f"{BUDGET_ENV}={v!r}: expected a positive number of seconds")
    return b


def cache_for(device_kind: str):
    """This process's TuningCache for a device kind (re-read when the file changed on disk)."""
    from .cache import TuningCache, default_path

    with _lock:
        path = default_path(device_kind)
        c = _caches.get((device_kind, str(path)))
        if c is None:
            c = _caches[(device_kind, str(path))] = TuningCache(device_kind, path)
        elif c.changed_on_disk():
            c.load()
        return c


def forget():
    """Drop the in-process caches (tests; after writing a cache file from elsewhere)."""
    with _lock:
        _caches.clear()


def _resolve(fam, case, m, cache, allow_tune):
    """(config, launcher kwargs, source) of one case from the cache (tuning it first in tune mode)."""
    bucket = fam.bucket(case)
    default = fam.defaults(case)
    entry, how = cache.lookup(fam, bucket)
    if entry is None and m == "tune" and allow_tune:
        from .tuner import tune_case

        res = tune_case(fam, case, budget_s=budget())
        if res.error is None:
            with _lock:
                cache.put(fam, res)
                cache.save()
            entry, how = cache.lookup(fam, bucket)
    if entry is None:
        return default, {}, f"default ({how})"
    config = {**default, **{k: v for k, v in entry["config"].items() if k in default}}
    if how != "exact":
        why = fam.check(config, case)
        if why:  # a neighbour's winner that does not fit this shape
            return default, {}, f"default (nearest tuned bucket invalid here: {why})"
    src = "cache" if how == "exact" else f"cache ({how})"
    if config == default:
        src += ", tuned = default"
    return config, fam.launch_kwargs(config), src


def _by_key_len(fam, case, lens, m, cache, allow_tune):
    """A decoding attention node: one config per key-length bucket (powers of two up to the cache's
    capacity), chosen by the adapter at each call from the key length it attends."""
    tuned_at = {c["Tk"] for c in fam.tuning_cases(case)}  # tune mode tunes these buckets only
    rows = []
    for t in lens:
        c = {**case, "Tk": min(t, case.get("Tk_max") or t)}
        rows.append((t, *_resolve(fam, c, m, cache, allow_tune and c["Tk"] in tuned_at)))
    parts, i = [], 0
    while i < len(rows):  # runs of buckets with the same config and source: 'Tk<=8..64 cache (nearest Tk=64)'
        j = i
        while j + 1 < len(rows) and rows[j + 1][1:] == rows[i][1:]:  # same config, kwargs and source
            j += 1
        span = f"{rows[i][0]}" if i == j else f"{rows[i][0]}..{rows[j][0]}"
        conf = " ".join(f"{k}={v}" for k, v in rows[i][2].items())
        parts.append(f"Tk<={span}: {rows[i][3]}" + (f" {conf}" if conf else ""))
        i = j + 1
    table = {t: kw for t, _, kw, _ in rows}
    kwargs = {} if not any(table.values()) else {"tuned_by_key_len": table}
    return rows[-1][1], kwargs, "per key length: " + "; ".join(parts)


def bind(node, graph, device_kind: str, allow_tune: bool = True):
    """The Binding of one node, or None when its op has no tunable family on this device.
    allow_tune=False: never tune, even with NBFORMER_TUNING=tune (`nbformer inspect --tuning`).

    A decoding attention node (family.key_len_buckets) binds a table {key-length bucket: kwargs}
    passed to the adapter as `tuned_by_key_len`; the adapter picks the entry of the current key
    length (a dict lookup per call). Its Binding.config is the capacity bucket's."""
    from .space import family_for

    fam = family_for(node.op, node.direction, device_kind)
    if fam is None:
        return None
    case = fam.case_from_node(node, graph)
    if case is None:
        return None
    m = mode()
    bucket = fam.bucket(case)
    desc = fam.describe(case)
    if m == "off":
        return Binding(fam.key, case, bucket, fam.defaults(case), {}, f"default ({ENV}=off)", desc)
    cache = cache_for(device_kind)
    lens = fam.key_len_buckets(case)
    if lens:
        config, kwargs, src = _by_key_len(fam, case, lens, m, cache, allow_tune)
    else:
        config, kwargs, src = _resolve(fam, case, m, cache, allow_tune)
    return Binding(fam.key, case, bucket, config, kwargs, src, desc)


def bind_schedule(graph, schedule, device_kind: str, allow_tune: bool = True) -> list:
    """[Binding or None] aligned with schedule."""
    memo = {}
    out = []
    for node in schedule:
        b = bind(node, graph, device_kind, allow_tune)
        if b is not None:  # nodes of one shape share one Binding object
            k = (b.family, repr(sorted(b.case.items())))
            b = memo.setdefault(k, b)
        out.append(b)
    return out
