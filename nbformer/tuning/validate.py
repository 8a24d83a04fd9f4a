"""Correctness before speed: every candidate runs on fresh NaN-filled outputs and is checked against
the float64 reference (nbformer.reference) before it may be timed (llm.c dev/cuda's habit).

* Every output element must be written: a NaN left where the reference is finite means the
  config skipped work ("left N of M elements unwritten"), and it is rejected whatever else it did.
* Then |actual - ref| <= atol + rtol * |ref| everywhere (the tests' assert_close rule; matching
  infinities count as equal, e.g. lse = -inf for rows that see no key).
* A config that differs from the default only in tunables declared bit-exact must also give the
  default's bits exactly (every output the reference checks; scratch outputs are not results); a declared-bit-exact tunable that changes bits is a bug in the
  declaration, reported as such.
A candidate that raises (an invalid launch the launcher itself refuses) is rejected with its message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Check:
    ok: bool
    reason: str = ""
    max_err: float = 0.0   # worst |actual - ref| over all outputs
    outputs: dict | None = None  # host copies of the outputs (kept for the bit-exact comparison)


def close(actual, ref, atol, rtol, what="out"):
    """(ok, message, worst error) under the tests' rule; NaN in actual where ref is not NaN fails."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(ref, np.float64)
    if a.shape != r.shape:
        return False, f"{what}: shape {a.shape}, reference {r.shape}", float("inf")
    unwritten = np.isnan(a) & ~np.isnan(r)
    if unwritten.any():
        n = int(unwritten.sum())
        i = tuple(int(j) for j in np.unravel_index(np.argmax(unwritten), a.shape))
        return False, (f"{what}: left {n:,} of {a.size:,} elements unwritten (still NaN, first at {i}): "
                       f"the config skipped work"), float("inf")
    both_inf = np.isinf(r) & (a == r)
    with np.errstate(invalid="ignore"):  # inf - inf where both are infinite: masked right here
        err = np.where(both_inf, 0.0, np.abs(a - r))
    err = np.where(np.isnan(err), np.inf, err)
    bound = atol + rtol * np.abs(np.where(np.isinf(r), 0.0, r))
    excess = err - bound
    worst = float(err.max()) if err.size else 0.0
    if excess.size and excess.max() > 0:
        i = tuple(int(j) for j in np.unravel_index(np.argmax(excess), excess.shape))
        return False, (f"{what}: wrong at {i}: got {float(a[i])!r}, reference {float(r[i])!r}, error {err[i]:.3e} > "
                       f"bound {bound[i]:.3e} (atol={atol}, rtol={rtol})"), worst
    return True, "", worst


def validate(workload, config, ref, baseline=None, bit_exact=False) -> Check:
    """Run config once on fresh NaN outputs and check it.

    ref: the reference outputs (workload.reference()); baseline: the default config's host outputs
    (needed when bit_exact); bit_exact: config differs from the default only in bit-exact tunables."""
    outs = workload.fresh_outputs()
    try:
        workload.run(outs, config)
        workload.device.synchronize()
    except Exception as e:  # noqa: BLE001  (a refused or crashing launch rejects the candidate)
        msg = str(e).splitlines()[0] if str(e) else ""
        return Check(False, f"raised {type(e).__name__}: {msg}"[:300], float("inf"))
    host = {k: np.array(workload.download(v)) for k, v in outs.items()}
    worst = 0.0
    for name, want in ref.items():
        atol, rtol = workload.tolerance[name]
        mask = workload.compare_mask.get(name)
        got = host[name] if mask is None else host[name][mask]
        exp = want if mask is None else want[mask]
        ok, msg, err = close(got, exp, atol, rtol, name)
        worst = max(worst, err)
        if not ok:
            return Check(False, msg, worst, host)
    if bit_exact and baseline is not None:
        for name in ref:  # the results (not scratch outputs such as attention backward's delta)
            a, b = host[name], baseline[name]
            same = np.array_equal(a.view(np.uint32), b.view(np.uint32)) if a.dtype == np.float32 else np.array_equal(a, b)
            if not same:
                n = int(np.sum(a.view(np.uint32) != b.view(np.uint32)))
                return Check(False, f"{name}: {n:,} elements differ in their bits from the default config, "
                                    f"though only tunables declared bit-exact changed", worst, host)
    return Check(True, "", worst, host)
