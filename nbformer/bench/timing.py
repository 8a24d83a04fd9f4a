"""Statistics of repeated timings (no heavy imports)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


def percentile(xs, q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@dataclass
class Samples:
    """Seconds of each timed repetition (warm-up excluded) and the warm-up's own seconds."""

    seconds: list
    warmup_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def sd(self) -> float:
        """Sample standard deviation (0 for a single repetition, as llama-bench prints)."""
        return statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the interquartile range: the +- printed beside a median (robust to one outlier)."""
        return (percentile(self.seconds, 75) - percentile(self.seconds, 25)) / 2.0

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def one_time_s(self) -> float | None:
        """What the warm-up cost beyond a steady-state repetition: compiling (or loading compiled
        kernels from Numba's cache), building graphs and plans, first-touch allocation."""
        if self.warmup_s is None:
            return None
        return max(0.0, self.warmup_s - self.mean)

    def rates(self, work: float) -> list:
        """work / seconds for each repetition (tokens/s, FLOP/s, ...)."""
        return [work / s if s > 0 else float("inf") for s in self.seconds]
