"""nbformer/batching.py: cutting length-sorted texts into padded batches."""
import itertools

import numpy as np
import pytest

from nbformer.batching import plan_batches


def _cost(lengths, batches, c):
    return sum((e - s) * lengths[s] + c for s, e in batches)


def _brute_force(lengths, max_batch, c):
    n, best = len(lengths), None
    for cuts in itertools.product((0, 1), repeat=n - 1):  # 1: a batch ends after text i
        bounds = [0] + [i + 1 for i, x in enumerate(cuts) if x] + [n]
        batches = list(zip(bounds[:-1], bounds[1:]))
        if all(e - s <= max_batch for s, e in batches):
            cost = _cost(lengths, batches, c)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_plan_is_optimal_and_covers_every_text_once(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    lengths = sorted(rng.integers(1, 40, n).tolist(), reverse=True)
    max_batch, c = int(rng.integers(1, 6)), float(rng.choice([0, 3, 32]))
    plan = plan_batches(lengths, max_batch, c)
    assert plan[0][0] == 0 and plan[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert all(1 <= e - s <= max_batch for s, e in plan)
    assert _cost(lengths, plan, c) == pytest.approx(_brute_force(lengths, max_batch, c))


def test_equal_lengths_fill_whole_batches_and_free_batches_never_pad():
    assert plan_batches([20] * 130, 64) == [(0, 64), (64, 128), (128, 130)]  # ties: the longest batch first
    lengths = [23, 23, 21, 21, 21, 9, 9]
    plan = plan_batches(lengths, 64, 0)  # a batch costs nothing: one per length, no padding
    assert all(lengths[s] == lengths[e - 1] for s, e in plan)
    assert plan_batches([5, 5, 5], 64, 1e9) == [(0, 3)]  # batches cost everything: one batch
    assert plan_batches([], 8) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        plan_batches([3, 5], 4)
    with pytest.raises(ValueError, match="max_batch"):
        plan_batches([3], 0)
