"""`nbformer tune`: tune the kernels of a model's plan (or named kernels at given shapes) on this
machine, validate every candidate against the float64 reference, keep the winners in the
per-machine cache (used automatically by every later run; NBFORMER_TUNING=off to ignore it)."""
from __future__ import annotations

import json
import sys
import time

import click

from .common import friendly, no_compile_progress

_PHASES = ("forward", "prefill", "decode", "embed")


def _parse_shape(text, family):
    """'N=256,K=768,M=3072' -> a case dict of family (missing fields take their defaults)."""
    from nbformer.errors import InputError

    case = dict(family.shape_defaults())  # each family declares its --shape fields
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in case:
            raise InputError(f"--shape {text!r}: expected KEY=VALUE pairs with keys {sorted(case)} for {family.name}")
        v = v.strip()
        if isinstance(case[k], str):  # act, qtype
            case[k] = v
        elif isinstance(case[k], bool):
            if v.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise InputError(f"--shape: {k}={v!r}, expected true or false")
            case[k] = v.lower() in ("1", "true", "yes")
        else:
            try:
                case[k] = int(v)
            except ValueError:
                raise InputError(f"--shape: {k}={v!r}, expected an integer") from None
            if case[k] < 1:
                raise InputError(f"--shape: {k}={v!r}, expected a positive integer")
    if "NKV" in case:
        case["NKV"] = case["NKV"] or case["NH"]
        case["Tk"] = case["Tk"] or case["Tq"]
        if case["NH"] % case["NKV"]:
            raise InputError(f"--shape: NKV={case['NKV']} must divide NH={case['NH']}")
    if "act" in case:
        from nbformer.kernels.cpu.linear import ACT_CODES

        if case["act"] not in ACT_CODES:
            raise InputError(f"--shape: act={case['act']!r}, expected one of {sorted(ACT_CODES)}")
    return case


class _Bar:
    def __init__(self, n_cases, enabled):
        self.n, self.enabled, self.i = n_cases, enabled, 0

    def case(self, i):
        self.i = i

    def __call__(self, done, total, text):
        if not self.enabled:
            return
        width = 24
        filled = width if total == 0 else int(width * done / total)
        sys.stderr.write(f"\r[{self.i + 1}/{self.n}] {text[:48]:<48} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{total}")
        sys.stderr.flush()

    def end(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt_s(s):
    if s != s:  # nan
        return "-"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_cfg(cfg, default):
    diff = {k: v for k, v in cfg.items() if default.get(k) != v}
    return "default" if not diff else " ".join(f"{k}={v}" for k, v in diff.items())


@click.command()
@click.argument("model_path", required=False)
@click.option("--device", "-d", "device", default=None, metavar="DEVICE",
              help="cpu or cuda (default: $NBFORMER_DEVICE, else cpu)")
@click.option("--kernels", "-k", default=None, metavar="LIST",
              help="kernel families to tune, comma-separated (default: every tunable family in the plan): "
                   "linear, attention")
@click.option("--batch", "-b", default=1, show_default=True, type=int)
@click.option("--seq", "-s", default=128, show_default=True, type=int,
              help="sequence length (prefill prompt length; decoding runs into a cache of 2x this)")
@click.option("--phase", "-p", "phases", default=None, metavar="LIST",
              help="graphs to take the shapes from: forward, prefill, decode, embed (default: prefill,decode "
                   "for a language model, embed for an encoder, forward otherwise)")
@click.option("--shape", "shapes", multiple=True, metavar="K=V,...",
              help="tune one --kernels family at this shape instead of a model's plan, e.g. "
                   "'N=256,K=768,M=3072,act=gelu_tanh' or 'B=1,NH=12,HS=64,Tq=256,causal=true' (repeatable)")
@click.option("--budget", default=60.0, show_default=True, type=float,
              help="seconds of candidate timing in all, shared among the kernel shapes")
@click.option("--strategy", type=click.Choice(["grid", "random"]), default="grid", show_default=True,
              help="grid: every candidate in declared order until the budget ends; random: a seeded random order")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--margin", default=0.03, show_default=True, type=float,
              help="a challenger must be this much faster (and win 3/4 of the paired rounds) to replace the incumbent")
@click.option("--sample-ms", default=5.0, show_default=True, type=float,
              help="least duration of one timing sample (longer: steadier on a busy machine, slower tuning)")
@click.option("--cache", "cache_path", default=None, metavar="FILE",
              help="tuning cache file (default: $NBFORMER_TUNING_CACHE, else the per-machine file under "
                   "$NBFORMER_CACHE_DIR or ~/.cache/nbformer/tuning)")
@click.option("--dry-run", is_flag=True, help="list the kernel shapes and candidate counts, tune nothing")
@click.option("--no-save", is_flag=True, help="do not write the cache")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON on stdout")
@friendly
def tune(model_path, device, kernels, batch, seq, phases, shapes, budget, strategy, seed, margin, sample_ms,
         cache_path, dry_run, no_save, as_json):
    """Tune the kernels of MODEL's plan at (--batch, --seq) on this machine and cache the winners.

    Every candidate is validated on NaN-filled outputs against the float64 reference before it is
    timed; candidate and incumbent are timed in interleaved rounds, and a challenger wins only by
    a clear margin. Later runs on this machine use the winners automatically (see `nbformer
    inspect MODEL --tuning`; NBFORMER_TUNING=off runs the defaults)."""
    from nbformer.devices import default_device_name, parse_device_name
    from nbformer.errors import InputError
    from nbformer.tuning import space
    from nbformer.tuning.cache import TuningCache
    from nbformer.tuning.machine import describe, machine_key
    from nbformer.tuning.tuner import cases_from_graph, model_graphs, tune_case

    if as_json:
        no_compile_progress()
    kind, _ = parse_device_name(device or default_device_name())
    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be positive (got {batch}, {seq})")
    if not budget > 0:
        raise InputError(f"--budget must be a positive number of seconds, got {budget}")
    if not 0 <= margin < 1:
        raise InputError(f"--margin must be in [0, 1), got {margin}")
    if not 0 < sample_ms <= 10_000:
        raise InputError(f"--sample-ms must be in (0, 10000], got {sample_ms}")
    fams = None
    if kernels:
        fams = [k.strip() for k in kernels.split(",") if k.strip()]
        for f in fams:
            space.get_family(kind, f)  # raises naming the known families
    key = machine_key(kind)  # DeviceError when cuda is asked for and absent
    plan = []  # (phase, family, case)
    if shapes:
        if model_path is not None:
            raise InputError("--shape tunes kernels at given shapes: pass either MODEL or --shape, not both")
        if not fams or len(fams) != 1:
            raise InputError("--shape needs exactly one --kernels family (e.g. --kernels linear)")
        fam = space.get_family(kind, fams[0])
        plan = [("shape", fam, _parse_shape(s, fam)) for s in shapes]
    else:
        import nbformer

        if model_path is None:
            from nbformer.defaults import default_embedder_path

            model_path = str(default_embedder_path())
        m = nbformer.load(model_path, device=kind)
        cfg = m.config
        if phases:
            phs = [p.strip() for p in phases.split(",") if p.strip()]
        elif cfg.arch == "decoder" and cfg.lm_head:
            phs = ["prefill", "decode"]
        elif cfg.arch == "encoder":
            phs = ["embed"]
        else:
            phs = ["forward"]
        if seq > cfg.max_positions:
            raise InputError(f"--seq {seq} exceeds the model's {cfg.max_positions} positions")
        seen = set()
        for ph, g in model_graphs(m, batch, seq, phs).items():
            for fam, case in cases_from_graph(g, kind, fams):
                k = (fam.key, repr(sorted(fam.bucket(case).items())))
                if k not in seen:
                    seen.add(k)
                    plan.append((ph, fam, case))
    if not plan:
        raise InputError("nothing to tune: no tunable kernel in this plan"
                         + (f" among --kernels {kernels}" if kernels else ""))
    cache = TuningCache(kind, cache_path)
    if not as_json:
        click.echo(f"machine: {describe(key)}")
        click.echo(f"cache: {cache.path}")
    if dry_run:
        from nbformer.tuning.tuner import plan_candidates

        for ph, fam, case in plan:
            cands, dups, invalid = plan_candidates(fam, case)
            click.echo(f"  {ph:8s} {fam.describe(case)}: {len(cands)} candidates besides the default "
                       f"({dups} run identically to another at this shape, {len(invalid)} invalid; "
                       f"tunables: {', '.join(t.name for t in fam.tunables())})")
        return
    bar = _Bar(len(plan), not as_json and sys.stderr.isatty())
    results = []
    t0 = time.perf_counter()
    for i, (ph, fam, case) in enumerate(plan):
        bar.case(i)
        left = budget - (time.perf_counter() - t0)
        share = max(left, 0.0) / (len(plan) - i)
        r = tune_case(fam, case, budget_s=share, strategy=strategy, seed=seed, margin=margin,
                      sample_s=sample_ms / 1e3, progress=bar)
        results.append((ph, fam, r))
        if r.error is None:
            cache.put(fam, r)
        if not bar.enabled and not as_json:
            click.echo(f"  tuned {fam.describe(case)} ({r.tried} tried, {r.seconds:.1f} s)", err=True)
    bar.end()
    total_s = time.perf_counter() - t0
    if not no_save:
        cache.save()
    if as_json:
        out = {"machine": key, "cache": str(cache.path), "seconds": total_s, "saved": not no_save,
               "results": [{"phase": ph, **r.as_dict()} for ph, _, r in results]}
        click.echo(json.dumps(out, indent=1, default=str))
        return
    rows = [("phase", "kernel", "default", "tuned", "speed-up", "config", "tried", "rejected")]
    for ph, fam, r in results:
        if r.error:
            rows.append((ph, r.description, "-", "-", "-", "ERROR: " + r.error, str(r.tried), "-"))
            continue
        sd = f"{_fmt_s(r.default_s)} ±{100 * r.default_spread:.0f}%"
        st = f"{_fmt_s(r.best_s)} ±{100 * r.best_spread:.0f}%"
        rows.append((ph, r.description, sd, st, f"{r.speedup:.2f}x", _fmt_cfg(r.best, r.default),
                     f"{r.tried}" + (f"+{r.skipped} left" if r.skipped else ""), str(len(r.rejected))))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for j, row in enumerate(rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))
    rejected = [(fam, r, c, why) for _, fam, r in results for c, why in r.rejected]
    for fam, r, c, why in rejected[:10]:
        click.echo(f"rejected: {r.description} {_fmt_cfg(c, r.default)}: {why}")
    if len(rejected) > 10:
        click.echo(f"rejected: ... and {len(rejected) - 10} more (--json lists them)")
    click.echo(f"tuning took {total_s:.1f} s; " + ("not saved (--no-save)" if no_save else f"saved to {cache.path}"))
