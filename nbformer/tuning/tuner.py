"""The tuner: for one kernel family at one shape, find the fastest valid config.

1. Build the workload (seeded inputs on the device) and its float64 reference once.
2. The default config is validated first (if it fails, the kernel is broken: the case reports the
   error and nothing is tuned) and its outputs kept for bit-exact comparisons.
3. Candidates (grid order, or a seeded random order with --strategy random) are filtered by the
   family's constraints (reason recorded) and by `effective` (configs that run identically at this
   shape are timed once).
4. Each candidate is validated on fresh NaN outputs (validate.py); a failing one is reported and
   never timed, never chosen. A valid one duels the incumbent in interleaved rounds (timing.py)
   and replaces it only by a clear margin.
5. Finally the winner is confirmed against the default in a longer interleaved duel; if it does not
   beat the default by the margin there, the default is kept. The reported speed-up is that duel's.
The budget (seconds of wall time per case) bounds step 4; steps 1, 2 and 5 always run.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from . import timing
from .validate import validate


@dataclass
class CaseResult:
    family: str
    device: str
    case: dict
    bucket: dict
    default: dict
    best: dict
    default_s: float = float("nan")
    best_s: float = float("nan")
    default_spread: float = 0.0
    best_spread: float = 0.0
    speedup: float = 1.0
    first_call_s: dict = field(default_factory=dict)  # effective config -> first call (compile) seconds
    tried: int = 0           # candidates validated
    timed: int = 0           # candidates timed
    invalid: list = field(default_factory=list)    # (config, constraint violated)
    rejected: list = field(default_factory=list)   # (config, validation failure)
    duplicates: int = 0      # configs identical to an earlier one at this shape
    skipped: int = 0         # left untried when the budget ran out
    seconds: float = 0.0     # tuning wall time
    error: str | None = None
    confirmed: bool = True   # the winner beat the default in the confirmation duel
    flops: float = 0.0
    bytes: float = 0.0
    description: str = ""

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _pure(config) -> dict:
    """Plain Python ints/strs/bools (JSON and variant keys)."""
    out = {}
    for k, v in config.items():
        if hasattr(v, "item"):
            v = v.item()
        out[k] = v
    return out


def plan_candidates(family, case, default=None, configs=None) -> tuple:
    """-> (candidates to try, number of duplicates dropped, [(config, constraint violated)]):
    the family's grid (or configs), configs that run identically to an earlier one at this shape
    (family.effective) dropped, invalid ones (family.check) set aside with the reason."""
    default = _pure(default if default is not None else family.defaults(case))
    raw = [_pure(c) for c in (configs if configs is not None else family.candidates(case))]
    seen = {family.effective(default, case)}
    cands, dups, invalid = [], 0, []
    for c in raw:
        full = {**default, **c}
        eff = family.effective(full, case)
        if eff in seen:
            dups += 1
            continue
        seen.add(eff)
        why = family.check(full, case)
        if why:
            invalid.append((full, why))
            continue
        cands.append(full)
    return cands, dups, invalid


def tune_case(family, case, *, budget_s=10.0, strategy="grid", seed=0, margin=0.03, rounds=7,
              confirm_rounds=9, configs=None, default=None, sample_s=0.005, progress=None) -> CaseResult:
    """Tune one family at one shape. configs: an explicit candidate list (instead of the family's
    grid); default: the baseline config (instead of the launcher's defaults; e.g. tiny CUDA tiles
    under the simulator). progress(done, total, text): called after each candidate."""
    t_start = time.perf_counter()
    default = _pure({**family.defaults(case), **(default or {})})
    res = CaseResult(family.key, family.device, dict(case), family.bucket(case), default, dict(default),
                     description=family.describe(case))
    wl = family.workload(case, seed)
    res.flops, res.bytes = wl.flops, wl.bytes
    sync = wl.device.synchronize
    ref = wl.reference()
    base = validate(wl, default, ref)
    if not base.ok:
        res.error = f"the default config {default} fails validation: {base.reason}"
        res.seconds = time.perf_counter() - t_start
        return res
    baseline = base.outputs

    cands, res.duplicates, res.invalid = plan_candidates(family, case, default, configs)
    if strategy == "random":
        random.Random(seed).shuffle(cands)
    elif strategy != "grid":
        from ..errors import InputError

        raise InputError(f"--strategy: expected 'grid' or 'random', got {strategy!r}")

    outs = {}  # config key -> output buffers used for timing (allocated once per config)

    def runner(cfg):
        k = repr(sorted(cfg.items()))
        o = outs.get(k)
        if o is None:
            o = outs[k] = wl.fresh_outputs()
        return lambda: wl.run(o, cfg)

    inc, inc_fn = default, runner(default)
    first, inc_reps = timing.warm_up(inc_fn, sync, sample_s)
    res.first_call_s[repr(sorted(default.items()))] = first
    total = len(cands)
    if progress:
        progress(0, total, res.description)
    for i, cand in enumerate(cands):
        if time.perf_counter() - t_start > budget_s:
            res.skipped = total - i
            break
        res.tried += 1
        chk = validate(wl, cand, ref, baseline, bit_exact=family.bit_exact_change(cand, default))
        if not chk.ok:
            res.rejected.append((cand, chk.reason))
        else:
            fn = runner(cand)
            first, reps = timing.warm_up(fn, sync, sample_s)
            res.first_call_s[repr(sorted(cand.items()))] = first
            ti, tc, wins, n = timing.duel(inc_fn, fn, sync, inc_reps, reps, rounds=rounds, margin=margin)
            res.timed += 1
            if timing.challenger_wins(ti, tc, wins, n, margin):
                inc, inc_fn, inc_reps = cand, fn, reps
        if progress:
            progress(i + 1, total, res.description)

    # confirm against the default, and measure both for the report
    d_fn = runner(default)
    if inc != default:
        ti, tc, wins, n = timing.duel(d_fn, inc_fn, sync, timing.warm_up(d_fn, sync, sample_s)[1], inc_reps,
                                      rounds=confirm_rounds, margin=margin, race=False)
        if timing.challenger_wins(ti, tc, wins, n, margin):
            res.best = inc
            res.default_s, res.best_s = ti.median, tc.median
            res.default_spread, res.best_spread = ti.spread, tc.spread
        else:
            res.confirmed = False
            res.best = default
            res.default_s = res.best_s = ti.median
            res.default_spread = res.best_spread = ti.spread
    else:
        reps = timing.warm_up(d_fn, sync, sample_s)[1]
        samples = [timing._sample(d_fn, sync, reps) for _ in range(confirm_rounds)]
        t = timing.summarize(samples, reps)
        res.default_s = res.best_s = t.median
        res.default_spread = res.best_spread = t.spread
    res.speedup = res.default_s / res.best_s if res.best_s > 0 else 1.0
    res.seconds = time.perf_counter() - t_start
    return res


# ---------------------------------------------------------------- the kernels of a model's plan
def cases_from_graph(graph, device_kind, families=None) -> list:
    """[(family, case)] for every tunable node of graph, one per (family, bucket); a decoding attention
    node gives one case per key-length bucket it will run at (family.tuning_cases)."""
    from .space import family_for

    out, seen = [], set()
    for node in graph.nodes:
        fam = family_for(node.op, node.direction, device_kind)
        if fam is None or (families is not None and fam.name not in families):
            continue
        case = fam.case_from_node(node, graph)
        if case is None:
            continue
        for c in fam.tuning_cases(case):  # decoding attention: one case per key-length bucket
            key = (fam.key, repr(sorted(fam.bucket(c).items())))
            if key in seen:
                continue
            seen.add(key)
            out.append((fam, c))
    return out


def model_graphs(model, batch, seq, phases):
    """{phase: graph} of a loaded nbformer Model: 'forward' (all logits / hidden states), 'prefill'
    and 'decode' (the KV-cache graphs generation runs: prompt of seq tokens, then one token at a
    time into a cache of seq + seq positions), 'embed' (the Embedder's pooled graph)."""
    from ..errors import InputError
    from ..graph.build import build_decode, build_embed, build_forward

    cfg = model.config
    out = {}
    for ph in phases:
        if ph == "forward":
            out[ph] = build_forward(cfg, batch, seq)
        elif ph in ("prefill", "decode"):
            if cfg.arch != "decoder" or not cfg.lm_head:
                raise InputError(f"--phase {ph}: needs a decoder-only language model, {cfg.family} is "
                                 f"{cfg.arch}")
            tmax = min(cfg.max_positions, 2 * seq)
            out[ph] = build_decode(cfg, batch, seq if ph == "prefill" else 1, tmax)
        elif ph == "embed":
            if cfg.arch != "encoder":
                raise InputError(f"--phase embed: needs an encoder model, {cfg.family} is {cfg.arch}")
            out[ph] = build_embed(cfg, batch, seq)
        else:
            raise InputError(f"--phase: unknown phase {ph!r} (expected forward, prefill, decode or embed)")
    return out
