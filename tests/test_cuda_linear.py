"""CUDA linear (tiled SGEMM + fused epilogue, few-row decoding path) vs the float64 oracle and the CPU twin.

Under the simulator (the default, see conftest.py) the shapes and tiles are tiny so that multi-tile,
K-tail, row-tail and column-tail paths all run; the GPU-only cases at the end use realistic sizes.
"""
import numpy as np
import pytest

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu import linear as cpu_linear
from nbformer.kernels.cuda import linear as L
from nbformer.kernels.cuda._jit import SIMULATOR, cuda

ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
# tiny tiles: 16 threads per block, several tiles and a tail along every dimension of the shapes below
TILED = dict(BM=8, BN=8, BK=4, TM=2, TN=2, few_rows=0)
FEW = dict(few_rows=64, fr_threads=16, fr_lanes=4, fr_cols=2, fr_kc=8)  # 8 columns per block, K chunks of 8
TOL = dict(atol=1e-5, rtol=1e-5)


def f32(a):
    return np.asarray(a, dtype=np.float32)


def make(rng, lead, K, M, bias=True, residual=False):
    x = f32(rng.normal(size=lead + (K,)))
    w = f32(rng.normal(size=(M, K)) / np.sqrt(K))
    b = f32(rng.normal(size=M)) if bias else None
    r = f32(rng.normal(size=lead + (M,))) if residual else None
    return x, w, b, r


def dev(a):
    return None if a is None else cuda.to_device(a)


def run(x, w, b=None, act="none", r=None, train=False, **tunables):
    """Our CUDA linear on host inputs -> (out, pre or None) on the host."""
    oshape = x.shape[:-1] + (w.shape[0],)
    out = cuda.to_device(np.full(oshape, np.nan, np.float32))  # NaN-filled: every element must be written
    if train:
        pre = cuda.to_device(np.full(oshape, np.nan, np.float32))
        L.linear_forward_train(out, pre, dev(x), dev(w), dev(b), act, dev(r), **tunables)
        return out.copy_to_host(), pre.copy_to_host()
    L.linear_forward(out, dev(x), dev(w), dev(b), act, dev(r), **tunables)
    return out.copy_to_host(), None


def cpu(x, w, b=None, act="none", r=None):
    out = np.empty(x.shape[:-1] + (w.shape[0],), np.float32)
    cpu_linear.linear_forward(out, x, w, b, act, r)
    return out


def check(out, x, w, b, act, r):
    assert_close(out, ref.linear(x, w, b, act, r), **TOL, what="out vs float64")
    assert_close(out, cpu(x, w, b, act, r), **TOL, what="out vs CPU kernel")


# ---------------------------------------------------------------- activations x epilogue inputs, both paths
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True)])
def test_tiled_3d_input(rng, act, bias, residual):
    """(B, T, K) = (2, 9, 13): 18 rows -> 3 row tiles (tail 2), M = 19 -> 3 column tiles (tail 3), K tail 1."""
    x, w, b, r = make(rng, (2, 9), 13, 19, bias, residual)
    out, _ = run(x, w, b, act, r, **TILED)
    check(out, x, w, b, act, r)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_few_rows_path(rng, act, bias, residual):
    """7 rows: M = 19 -> 3 blocks of 8 columns (last one partial), K = 13 -> K chunks of 8 and 5."""
    x, w, b, r = make(rng, (7,), 13, 19, bias, residual)
    out, _ = run(x, w, b, act, r, **FEW)
    check(out, x, w, b, act, r)


# ---------------------------------------------------------------- shapes and tile configurations
@pytest.mark.parametrize("N", [1, 2, 7, 33])
@pytest.mark.parametrize("path", ["tiled", "few"])
def test_awkward_row_counts(rng, N, path):
    x, w, b, r = make(rng, (N,), 9, 10, True, True)
    out, _ = run(x, w, b, "gelu_tanh", r, **(TILED if path == "tiled" else FEW))
    check(out, x, w, b, "gelu_tanh", r)


@pytest.mark.parametrize("tiles", [
    dict(BM=4, BN=8, BK=3, TM=1, TN=4),  # 8 threads; 12 x-tile loads over 8 threads (guarded second pass)
    dict(BM=16, BN=4, BK=5, TM=4, TN=1),  # tall tile, BK not a power of two
    dict(BM=8, BN=16, BK=16, TM=2, TN=4),  # BK > K: one partial K tile
])
def test_tile_configurations(rng, tiles):
    x, w, b, r = make(rng, (2, 6), 11, 21, True, True)
    out, _ = run(x, w, b, "silu", r, few_rows=0, **tiles)
    check(out, x, w, b, "silu", r)


def test_tiled_bits_do_not_depend_on_tiles(rng):
    """Each output is summed over k in order whatever the tiles (BIT_CHANGING says so for the tuner)."""
    x, w, b, r = make(rng, (2, 6), 11, 21, True, True)
    a, _ = run(x, w, b, "gelu", r, **TILED)
    c, _ = run(x, w, b, "gelu", r, few_rows=0, BM=4, BN=16, BK=3, TM=2, TN=4)
    if SIMULATOR:
        np.testing.assert_array_equal(a, c)
    else:  # expected equal too, unless the compiler contracts the two variants differently
        assert_close(a, c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", [
    dict(fr_threads=8, fr_lanes=8, fr_cols=3, fr_kc=5),  # one group of 8 lanes, K chunks shorter than the lanes
    dict(fr_threads=16, fr_lanes=1, fr_cols=1, fr_kc=16),  # no tree at all: one lane per column
    dict(fr_threads=32, fr_lanes=16, fr_cols=4, fr_kc=64),  # K in one chunk, 8 columns per block
])
def test_few_rows_configurations(rng, cfg):
    x, w, b, r = make(rng, (3,), 21, 11, True, False)
    out, _ = run(x, w, b, "gelu", None, few_rows=16, **cfg)
    check(out, x, w, b, "gelu", None)


def test_defaults_and_degenerate_sizes(rng):
    """The module defaults (no overrides) on both sides of few_rows, and K = M = 1."""
    for lead, K, M in [((2, 9), 16, 24), ((3,), 16, 24), ((20,), 1, 1), ((1,), 1, 1)]:
        x, w, b, r = make(rng, lead, K, M, True, True)
        out, _ = run(x, w, b, "gelu", r)
        check(out, x, w, b, "gelu", r)


def test_empty_rows_launch_nothing(rng):
    x, w, b, _ = make(rng, (0,), 5, 3)
    out, _ = run(x, w, b, "relu")
    assert out.shape == (0, 3)


def test_few_rows_match_single_row_decoding(rng):
    """A row's result does not depend on the rows decoded beside it (same per-row order of operations)."""
    x, w, b, r = make(rng, (5,), 13, 19, True, True)
    out, _ = run(x, w, b, "gelu", r, **FEW)
    for i in range(5):
        one, _ = run(x[i:i + 1], w, b, "gelu", r[i:i + 1], **FEW)
        np.testing.assert_array_equal(out[i], one[0])


# ---------------------------------------------------------------- training forward, aliasing, determinism
@pytest.mark.parametrize("path", ["tiled", "few"])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_forward_train_writes_pre(rng, path, act):
    tun = TILED if path == "tiled" else FEW
    x, w, b, r = make(rng, (2, 5) if path == "tiled" else (3,), 13, 19, True, True)
    out, pre = run(x, w, b, act, r, train=True, **tun)
    assert_close(pre, ref.linear(x, w, b), **TOL, what="pre")
    check(out, x, w, b, act, r)
    plain, _ = run(x, w, b, act, r, **tun)
    if SIMULATOR:  # the same arithmetic (compiled variants may contract differently on a GPU)
        np.testing.assert_array_equal(out, plain)
    else:
        assert_close(out, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["tiled", "few"])
def test_out_may_alias_residual(rng, path):
    x, w, b, r = make(rng, (6,), 13, 19, True, True)
    buf = cuda.to_device(r)
    L.linear_forward(buf, dev(x), dev(w), dev(b), "silu", buf, **(TILED if path == "tiled" else FEW))
    check(buf.copy_to_host(), x, w, b, "silu", r)


def test_arena_views(rng):
    """Inputs and outputs as reshaped views into one flat buffer (how the executor's arena hands them out)."""
    x, w, b, r = make(rng, (2, 3), 7, 10, True, True)
    sizes = [x.size, w.size, b.size, r.size, r.size]
    arena = cuda.to_device(np.full(sum(sizes), np.nan, np.float32))
    offs = np.cumsum([0] + sizes)
    views = [arena[offs[i]:offs[i + 1]] for i in range(5)]
    for v, a in zip(views[:4], (x, w, b, r)):
        v.copy_to_device(a.ravel())
    xd, wd, bd, rd, od = (views[0].reshape(x.shape), views[1].reshape(w.shape), views[2],
                          views[3].reshape(r.shape), views[4].reshape(r.shape))
    L.linear_forward(od, xd, wd, bd, "gelu_tanh", rd, **TILED)
    check(od.copy_to_host(), x, w, b, "gelu_tanh", r)


@pytest.mark.parametrize("path", ["tiled", "few"])
def test_deterministic(rng, path):
    x, w, b, r = make(rng, (9,), 23, 17, True, True)
    tun = TILED if path == "tiled" else FEW
    a, _ = run(x, w, b, "gelu", r, **tun)
    c, _ = run(x, w, b, "gelu", r, **tun)
    assert a.tobytes() == c.tobytes()


# ---------------------------------------------------------------- errors before any launch
def _args(rng):
    x, w, b, r = make(rng, (4,), 8, 6, True, True)
    return dict(out=cuda.to_device(np.zeros((4, 6), np.float32)), x=dev(x), w=dev(w), b=dev(b), residual=dev(r))


@pytest.mark.parametrize("name,value,match", [
    ("x", np.zeros((4, 8), np.float32), "'x' must be a CUDA device array"),
    ("x", "zeros", "'x' must be a CUDA device array"),
    ("x", np.zeros((4, 8), np.float64), "'x' must be a CUDA device array"),
    ("w", cuda.to_device(np.zeros((6, 8), np.float64)), "'w' has dtype float64, expected float32"),
    ("w", cuda.to_device(np.zeros((6, 7), np.float32)), r"'w' has shape \(6, 7\), expected \(M, 8\)"),
    ("w", cuda.to_device(np.zeros(48, np.float32)), r"'w' has shape \(48,\), expected \(M, 8\)"),
    ("out", cuda.to_device(np.zeros((4, 5), np.float32)), r"'out' has shape \(4, 5\), expected \(4, 6\)"),
    ("out", cuda.to_device(np.zeros((4, 12), np.float32))[:, :6], "'out' .* must be C-contiguous"),
    ("x", cuda.to_device(np.zeros((4, 16), np.float32))[:, ::2], "'x' .* must be C-contiguous"),
    ("b", cuda.to_device(np.zeros(5, np.float32)), r"'b' has shape \(5,\), expected \(6,\)"),
    ("residual", cuda.to_device(np.zeros((6, 4), np.float32)), r"'residual' has shape \(6, 4\), expected \(4, 6\)"),
    ("act", "gelu_erf", "'act' is 'gelu_erf', expected one of"),
])
def test_bad_arguments(rng, name, value, match):
    a = _args(rng)
    act = value if name == "act" else "gelu"
    if name != "act":
        a[name] = value
    with pytest.raises(GraphError, match=match):
        L.linear_forward(a["out"], a["x"], a["w"], a["b"], act, a["residual"])


def test_bad_pre(rng):
    a = _args(rng)
    with pytest.raises(GraphError, match=r"linear_forward_train: 'pre' has shape \(4, 5\), expected \(4, 6\)"):
        L.linear_forward_train(a["out"], cuda.to_device(np.zeros((4, 5), np.float32)), a["x"], a["w"], a["b"])


@pytest.mark.parametrize("tunables,match", [
    (dict(BX=4), r"unknown tunable\(s\) \['BX'\]"),
    (dict(few_rows=0, BM=8, TM=3), "multiples of the register tile"),
    (dict(few_rows=0, BM=64, BN=64, TM=1, TN=1), "4096 threads per block, at most 1024"),
    (dict(few_rows=0, BM=32, BN=32, BK=200, TM=1, TN=1), "bytes of shared memory per block, at most 49152"),
    (dict(few_rows=0, BK=0), "tunable BK=0, expected a positive int"),
    (dict(few_rows=0, TN=2.0), r"tunable TN=2.0, expected a positive int"),
    (dict(fr_lanes=6, fr_threads=12), "fr_lanes=6, expected a power of two"),
    (dict(fr_lanes=8, fr_threads=12), "fr_threads=12 must be a multiple of fr_lanes=8"),
    (dict(fr_kc=4096, fr_threads=32), "few-row path for 4 rows .* at most 49152"),
])
def test_bad_tunables(rng, tunables, match):
    a = _args(rng)
    with pytest.raises(GraphError, match=match):
        L.linear_forward(a["out"], a["x"], a["w"], a["b"], "none", None, **tunables)


# ---------------------------------------------------------------- real GPU only: realistic sizes, module defaults
GPU_ONLY = pytest.mark.skipif(SIMULATOR, reason="realistic sizes: real GPU only (NBFORMER_TEST_GPU=1)")


@GPU_ONLY
@pytest.mark.parametrize("N,K,M,act", [(1024, 768, 3072, "gelu_tanh"), (1000, 3072, 768, "none"),
                                       (777, 768, 2304, "gelu")])
def test_gpu_tiled_realistic(rng, N, K, M, act):
    x, w, b, r = make(rng, (N,), K, M, True, act == "none")
    out, pre = run(x, w, b, act, r, train=True)
    check(out, x, w, b, act, r)
    assert_close(pre, ref.linear(x, w, b), **TOL, what="pre")


@GPU_ONLY
@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 16])
def test_gpu_few_rows_realistic(rng, N):
    x, w, b, r = make(rng, (N,), 768, 50257, True, False)
    out, _ = run(x, w, b, "none")
    check(out, x, w, b, "none", None)
    x, w, b, r = make(rng, (N,), 768, 3072, True, True)
    out, _ = run(x, w, b, "gelu_tanh", r)
    check(out, x, w, b, "gelu_tanh", r)
    again, _ = run(x, w, b, "gelu_tanh", r)
    assert out.tobytes() == again.tobytes()
