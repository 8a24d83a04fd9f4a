"""Device-side next-token choice (kernels/cuda/sampling.py): token-identical to the CPU's
sample_token for the same logits row and uniform u, over many random rows.

Under the simulator the shapes and the threads per block are tiny (V = 5, 37, 64); the realistic
GPT-2 shape (8 x 50257) is a GPU-only parametrization.
"""
import sys

import numpy as np
import pytest
from numba import cuda

from nbformer.errors import GraphError
from nbformer.kernels.cpu.sampling import sample_token
from nbformer.kernels.cuda import sampling
from nbformer.kernels.cuda._jit import SIMULATOR

gpu_only = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: real GPU only (NBFORMER_TEST_GPU=1)")
TH = {"threads": 2} if SIMULATOR else {}

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator():
    """A short GIL switch interval makes the simulator's syncthreads() hand-offs ~10x cheaper."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


def _cpu(logits, temperature, top_k, top_p, u):
    return np.array([sample_token(row, temperature, top_k, top_p, x) for row, x in zip(logits, u)], np.int64)


def _gpu(logits, temperature, top_k, top_p, u, **kw):
    out = cuda.device_array(logits.shape[0], np.int64)
    sampling.sample_tokens(out, cuda.to_device(np.ascontiguousarray(logits, np.float32)), temperature, top_k, top_p,
                           cuda.to_device(np.asarray(u, np.float64)), **{**TH, **kw})
    return out.copy_to_host()


def _rows(rng, N, V, ties=False):
    x = rng.normal(0.0, 2.0, size=(N, V))
    if ties:  # coarse values: many equal logits, so the order of ties matters
        x = np.round(x)
    return x.astype(np.float32)


def test_greedy_with_ties_nan_and_masks(rng):
    V = 37
    x = _rows(rng, 10, V, ties=True)
    x[0] = 1.0  # all tied: token 0
    x[1, [3, 20, 36]] = 50.0  # first of the tied maxima
    x[2] = -np.inf  # all masked: token 0, like the CPU loop
    x[3, 30] = np.inf
    x[4, 0] = np.nan  # a NaN logit 0: the CPU never moves off it
    x[5, [2, 9]] = np.nan  # NaN elsewhere never wins
    x[6, -1] = 60.0  # the last id
    u = rng.random(10)
    want = _cpu(x, 0.0, None, None, u)
    assert want[:5].tolist() == [0, 3, 0, 30, 0] and want[6] == V - 1  # the CPU's rules, spelled out
    for th in ((1, 4, 8) if SIMULATOR else (32, 256, 1024)):
        assert np.array_equal(_gpu(x, 0.0, None, None, u, threads=th), want), th
    assert np.array_equal(_gpu(x, -1.0, 5, 0.5, u), want)  # temperature <= 0: greedy, top-k/p unused


CASES = [  # (temperature, top_k, top_p)
    (1.0, None, None),
    (0.7, None, None),
    (1.3, 5, None),
    (1.0, None, 0.9),
    (0.8, 10, 0.6),
    (1.0, 100, None),  # top_k > V
    (1.0, 1, None),  # top_k = 1: the argmax
    (2.0, None, 0.0),  # top_p = 0: the first sorted token
    (1.0, 3, 1.5),  # top_p > 1: off
]


@pytest.mark.parametrize("V", [5, 37])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c[0]}-k{c[1]}-p{c[2]}")
def test_sampling_matches_cpu(rng, V, case):
    N = 6
    x = _rows(rng, N, V, ties=V == 37)
    u = rng.random(N)
    u[0] = 0.0
    u[1] = np.nextafter(1.0, 0.0)
    assert np.array_equal(_gpu(x, *case, u), _cpu(x, *case, u))


def test_sampling_many_random_rows(rng):
    """One launch over many rows of a V that is not a power of two, random options per batch."""
    threads = (1, 2, 4) if SIMULATOR else (64, 256, 1024)
    for V, N in ((37, 24), (64, 8), (5, 24)):
        for i in range(4):
            x = _rows(rng, N, V, ties=i % 2 == 0)
            t = float(rng.uniform(0.3, 2.0))
            k = int(rng.integers(0, V + 3))
            p = float(rng.choice([1.0, rng.uniform(0.05, 1.0)]))
            u = rng.random(N)
            th = threads[i % len(threads)]
            assert np.array_equal(_gpu(x, t, k, p, u, threads=th), _cpu(x, t, k, p, u)), (V, t, k, p, th)


def test_sampling_cumulative_boundaries_are_the_cpus():
    """Equal logits: probabilities 1 each, so u = r / V lands exactly on a cumulative boundary
    (the CPU draws `target < acc`: the next token), and top_p = r / V on a prefix boundary."""
    V = 5
    x = np.zeros((V + 1, V), np.float32)
    u = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9999999])
    for top_p in (None, 0.4, 0.6, 0.2):
        want = _cpu(x, 1.0, None, top_p, u)
        assert np.array_equal(_gpu(x, 1.0, None, top_p, u), want), top_p
    assert _cpu(x, 1.0, None, None, u).tolist() == [0, 1, 2, 3, 4, 4]


def test_sampling_nan_and_masked_rows_match_cpu(rng):
    V = 37
    x = _rows(rng, 5, V)
    x[0, ::3] = -np.inf  # masked logits
    x[1] = -np.inf
    x[2, [4, 11]] = np.nan
    x[3, :-1] = -np.inf  # only the last token possible
    x[4, 5] = np.inf
    u = rng.random(5)
    for case in ((1.0, None, None), (0.9, 4, 0.8)):
        assert np.array_equal(_gpu(x, *case, u), _cpu(x, *case, u)), case


def test_tiny_vocabularies(rng):
    for V in (1, 2, 3):
        x = _rows(rng, 4, V)
        u = rng.random(4)
        for case in ((0.0, None, None), (1.0, None, None), (1.0, 2, 0.5)):
            assert np.array_equal(_gpu(x, *case, u), _cpu(x, *case, u)), (V, case)


def test_sequential_walk_across_staged_chunks(rng):
    """The sums run over chunks staged in shared memory: with 4-element chunks a V of 37 spans
    ten of them, and the top-p prefix and the draw stop inside later chunks."""
    V, N = 37, 6
    x = (rng.normal(0.0, 0.3, size=(N, V))).astype(np.float32)  # flat: long prefixes
    u = np.array([0.05, 0.3, 0.55, 0.8, 0.97, np.nextafter(1.0, 0.0)])
    for case in ((1.0, None, None), (1.0, None, 0.7), (1.0, 30, 0.95)):
        for stage in (4, 5):
            assert np.array_equal(_gpu(x, *case, u, threads=4, stage=stage), _cpu(x, *case, u)), (case, stage)


def test_scratch_reuse_determinism_and_host_helper(rng):
    N, V = 4, 37
    x = _rows(rng, N, V, ties=True)
    u = rng.random(N)
    logits = cuda.to_device(x)
    scratch = sampling.sampling_scratch(N, V)
    assert scratch.shape == (N, 2, 64)
    out = cuda.device_array(N, np.int64)
    ud = cuda.to_device(u)
    want = _cpu(x, 0.8, 7, 0.9, u)
    for _ in range(2):  # same inputs, same tokens, through a reused scratch
        sampling.sample_tokens(out, logits, 0.8, 7, 0.9, ud, scratch, **TH)
        assert np.array_equal(out.copy_to_host(), want)
    got = sampling.sample_tokens_host(logits, 0.8, 7, 0.9, u, **TH)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and np.array_equal(got, want)
    assert sampling.sample_rows is sampling.sample_tokens_host


def test_sampling_rejects_bad_arguments():
    N, V = 2, 7
    logits = cuda.to_device(np.zeros((N, V), np.float32))
    out, u = cuda.device_array(N, np.int64), cuda.to_device(np.zeros(N))
    with pytest.raises(GraphError, match="'logits'.*device"):
        sampling.sample_tokens(out, np.zeros((N, V), np.float32), 1.0, None, None, u)
    with pytest.raises(GraphError, match="'logits'.*float32"):
        sampling.sample_tokens(out, cuda.to_device(np.zeros((N, V))), 1.0, None, None, u)
    with pytest.raises(GraphError, match="'out_ids'"):
        sampling.sample_tokens(cuda.device_array(N, np.int32), logits, 1.0, None, None, u)
    with pytest.raises(GraphError, match="'u'"):
        sampling.sample_tokens(out, logits, 1.0, None, None, cuda.to_device(np.zeros(N, np.float32)))
    with pytest.raises(GraphError, match="'u'"):
        sampling.sample_tokens(out, logits, 1.0, None, None, cuda.to_device(np.zeros(N + 1)))
    with pytest.raises(GraphError, match="'scratch'"):
        sampling.sample_tokens(out, logits, 1.0, None, None, u, cuda.device_array((N, 2, 7)))
    with pytest.raises(GraphError, match="power of two"):
        sampling.sample_tokens(out, logits, 1.0, None, None, u, threads=3)
    with pytest.raises(GraphError, match="stage"):
        sampling.sample_tokens(out, logits, 1.0, None, None, u, stage=0)
    with pytest.raises(GraphError, match="'u_host'"):
        sampling.sample_tokens_host(logits, 1.0, None, None, np.zeros(N + 1))
    with pytest.raises(GraphError, match="'u_host'"):
        sampling.sample_tokens_host(logits, 1.0, None, None, u)


@gpu_only
@pytest.mark.parametrize("case", [(0.0, None, None), (1.0, None, None), (0.8, 50, None), (1.0, None, 0.9),
                                  (0.7, 40, 0.95), (1.2, 100000, 0.5)], ids=str)
@pytest.mark.parametrize("N,V", [(8, 50257)])
def test_gpu_sampling_gpt2_vocab(rng, case, N, V):
    x = (rng.normal(0.0, 3.0, size=(N, V))).astype(np.float32)
    x[0, : V // 500] = 30.0  # tied top tokens
    x[1, V // 10:] = -np.inf
    x[2] = np.round(x[2])  # many ties everywhere
    scratch = sampling.sampling_scratch(N, V)
    for _ in range(3):
        u = rng.random(N)
        got = sampling.sample_tokens_host(cuda.to_device(x), *case, u, scratch)
        assert np.array_equal(got, _cpu(x, *case, u)), case
