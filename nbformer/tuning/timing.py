"""Timing that survives a noisy machine.

* Warm-up: the first call (compilation, first-touch of buffers) is timed on its own and recorded
  as `first_call_s`, never mixed into the samples.
* A sample is the mean of `reps` back-to-back calls, reps chosen at warm-up so that one sample
  lasts about `target_s` (clock resolution and launch jitter stop mattering).
* Candidate and incumbent are timed in interleaved rounds (ABBA order: A B, then B A, ...), so a
  burst of load from another process hits both alike; each round is a paired comparison.
* Results are the median and a spread (interquartile range over the median).
* `challenger_wins`: a challenger replaces the incumbent only by a clear margin: its median must be
  at least `margin` below the incumbent's AND it must win at least 3/4 of the paired rounds, so
  repeated tuning keeps the same winners instead of flipping on noise.
* Racing: after `min_rounds` rounds a challenger that lost every round by more than twice the margin
  is dropped early (no need to finish timing a config 2x slower).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

clock = time.perf_counter


@dataclass
class Timing:
    median: float
    spread: float          # (p75 - p25) / median
    samples: list = field(default_factory=list)
    reps: int = 1

    def as_dict(self):
        return {"median_s": self.median, "spread": self.spread, "samples": len(self.samples), "reps": self.reps}


def summarize(samples, reps=1) -> Timing:
    s = sorted(samples)
    med = statistics.median(s)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4, method="inclusive")
        spread = (q[2] - q[0]) / med if med > 0 else 0.0
    else:
        spread = (s[-1] - s[0]) / med if med > 0 and len(s) > 1 else 0.0
    return Timing(med, spread, list(samples), reps)


def _sample(fn, sync, reps) -> float:
    t0 = clock()
    for _ in range(reps):
        fn()
    sync()
    return (clock() - t0) / reps


def warm_up(fn, sync, target_s=0.005, max_reps=10_000) -> tuple:
    """-> (first_call_s, reps per sample): the first call timed alone, then as many warm calls as
    fill target_s (at least one) give the number of calls per sample."""
    t0 = clock()
    fn()
    sync()
    first = clock() - t0
    n, t0 = 0, clock()
    while n < max_reps:
        fn()
        sync()
        n += 1
        if clock() - t0 >= target_s:
            break
    return first, n


def duel(incumbent, challenger, sync, reps_i=1, reps_c=1, rounds=7, min_rounds=3, margin=0.03, race=True):
    """Interleaved rounds of incumbent and challenger. -> (Timing_i, Timing_c, rounds won by the
    challenger, rounds run)."""
    ti, tc, wins = [], [], 0
    for r in range(rounds):
        if r % 2 == 0:
            a = _sample(incumbent, sync, reps_i)
            b = _sample(challenger, sync, reps_c)
        else:
            b = _sample(challenger, sync, reps_c)
            a = _sample(incumbent, sync, reps_i)
        ti.append(a)
        tc.append(b)
        wins += b < a
        if race and r + 1 >= min_rounds and wins == 0 and min(tc) > max(ti) * (1 + 2 * margin):
            break  # clearly slower in every round so far: not worth finishing
    return summarize(ti, reps_i), summarize(tc, reps_c), wins, len(ti)


def challenger_wins(ti: Timing, tc: Timing, wins: int, n_rounds: int, margin=0.03) -> bool:
    """The clear-margin rule (see the module docstring)."""
    return tc.median <= ti.median * (1.0 - margin) and wins >= math.ceil(0.75 * n_rounds)
