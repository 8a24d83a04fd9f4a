"""CUDA backward kernels (linear_backward, layernorm_backward) vs the float64 oracle
(reference_backward.py) and the CPU twins on the same inputs.

Under the simulator (the default, see conftest.py) shapes and tiles are tiny so that multi-tile and
tail paths run along every dimension; the GPU-only cases at the end use GPT-2 124M shapes.
Gradient tolerance as for the CPU twins: 1e-4 times the largest reference magnitude of that tensor.
"""
import numpy as np
import pytest

import reference_backward as rb
from conftest import assert_close
from nbformer import ops
from nbformer.errors import GraphError
from nbformer.kernels.cpu import layernorm as cpu_ln
from nbformer.kernels.cpu import linear as cpu_linear
from nbformer.kernels.cuda import layernorm as LN
from nbformer.kernels.cuda import linear as L
from nbformer.kernels.cuda._jit import SIMULATOR, cuda

ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
# tiny tiles: 16 threads per GEMM block; the shapes below give several tiles and a tail along N, K, M
TILES = dict(dx_BM=8, dx_BN=8, dx_BK=4, dx_TM=2, dx_TN=2, dw_BM=8, dw_BN=8, dw_BK=4, dw_TM=2, dw_TN=2,
             bw_threads=16, bw_max_blocks=3, db_cols=4, db_lanes=2)
GPU_ONLY = pytest.mark.skipif(SIMULATOR, reason="realistic sizes: real GPU only (NBFORMER_TEST_GPU=1)")


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def dev(a):
    return None if a is None else cuda.to_device(a)


def nans(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))  # every element must be written


def host(a):
    return None if a is None else a.copy_to_host()


def assert_grad(got, want, what="grad", rel=1e-4):
    """Gradient tolerance: rel times the largest reference magnitude of that tensor."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    assert_close(got, want, atol=rel * max(scale, 1e-8), rtol=0, what=what)


# ================================================================ linear
def linear_case(rng, lead, K, M, act, bias=True):
    x = f32(rng.normal(size=lead + (K,)))
    w = f32(rng.normal(size=(M, K)) / np.sqrt(K))
    b = f32(rng.normal(size=M)) if bias else None
    dout = f32(rng.normal(size=lead + (M,)))
    out, pre = np.empty(lead + (M,), np.float32), np.empty(lead + (M,), np.float32)
    cpu_linear.linear_forward_train(out, pre, x, w, b, act)  # the same pre for both twins
    return x, w, b, dout, pre


def cuda_linear_backward(x, w, dout, pre, act, want=("dx", "dw", "db"), scratch=False, **tunables):
    """Our CUDA linear_backward on host inputs -> dict of the wanted gradients (and g) on the host."""
    M, K = w.shape
    outs = {"dx": nans(x.shape) if "dx" in want else None, "dw": nans((M, K)) if "dw" in want else None,
            "db": nans((M,)) if "db" in want else None}
    s = nans(dout.shape[:-1] + (M,)) if scratch else None
    dd = dev(dout)
    L.linear_backward(outs["dx"], outs["dw"], outs["db"], dd, dev(x), dev(w), dev(pre), act, s, **tunables)
    res = {k: host(v) for k, v in outs.items() if v is not None}
    if scratch:
        res["g"] = host(s)
    res["dout"] = host(dd)
    return res


def cpu_linear_backward(x, w, dout, pre, act):
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty(w.shape[0], np.float32)
    cpu_linear.linear_backward(dx, dw, db, dout, x, w, pre, act)
    return {"dx": dx, "dw": dw, "db": db}


def check_linear(got, x, w, b, dout, pre, act, cpu_rel=1e-5):
    """Each gradient present in got vs the float64 reference (1e-4) and the CPU twin on the same inputs (cpu_rel)."""
    ref = dict(zip(("dx", "dw", "db"), rb.linear_backward(dout, x, w, b, act)))
    cpu = cpu_linear_backward(x, w, dout, pre, act) if cpu_rel else None
    for k in ("dx", "dw", "db"):
        if k in got:
            assert_grad(got[k], ref[k], f"{k} vs float64")
            if cpu is not None:
                assert_grad(got[k], cpu[k], f"{k} vs CPU twin", rel=cpu_rel)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_3d(rng, act, bias):
    """(B, T) = (3, 11): N = 33 -> 5 row tiles (tail 1); K = 13, M = 19: column tiles with tails, K tail."""
    x, w, b, dout, pre = linear_case(rng, (3, 11), 13, 19, act, bias)
    got = cuda_linear_backward(x, w, dout, pre, act, ("dx", "dw", "db") if bias else ("dx", "dw"),
                               scratch=act != "none", **TILES)
    assert np.array_equal(got["dout"], dout), "dout must be left intact"
    check_linear(got, x, w, b, dout, pre, act)
    if act != "none":  # scratch holds g = dout * act'(pre), the CPU's float32 formulas
        g = dout * rb.activation_grad(pre, act)
        assert_close(got["g"], g, atol=1e-6 * np.abs(g).max(), rtol=1e-6, what="g in scratch")


@pytest.mark.parametrize("N", [1, 7])
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_linear_backward_row_counts(rng, N, act):
    x, w, b, dout, pre = linear_case(rng, (N,), 9, 10, act)
    got = cuda_linear_backward(x, w, dout, pre, act, **TILES)
    check_linear(got, x, w, b, dout, pre, act)


@pytest.mark.parametrize("act", ["none", "silu"])
def test_linear_backward_optional_outputs(rng, act):
    """Any of dx, dw, db may be None; db without dw (its own kernel) has the bits of db fused into dw."""
    x, w, b, dout, pre = linear_case(rng, (2, 7), 11, 10, act)
    full = cuda_linear_backward(x, w, dout, pre, act, **TILES)
    check_linear(full, x, w, b, dout, pre, act)
    for want in [("dx",), ("dw",), ("db",), ("dx", "db"), ("dw", "db")]:
        got = cuda_linear_backward(x, w, dout, pre, act, want, **TILES)
        assert set(got) == set(want) | {"dout"}
        for k in want:
            np.testing.assert_array_equal(got[k], full[k], err_msg=f"{k} with only {want} wanted")


@pytest.mark.parametrize("act", ["none", "relu"])
def test_linear_db_chunks_match_cpu_bits(rng, act):
    """N = 130: three 64-row chunks, the last partial; the db-only kernel with 2 lanes takes 2 rounds and
    4 columns per block (a partial block). g is exact here (dout, or dout masked), so db has the CPU's
    bits on both paths: float64 partials per chunk, chunks added in order."""
    x, w, b, dout, pre = linear_case(rng, (130,), 5, 6, act)
    fused = cuda_linear_backward(x, w, dout, pre, act, ("dw", "db"), **{**TILES, "dw_BK": 16})
    alone = cuda_linear_backward(x, w, dout, pre, act, ("db",), **TILES)
    cpu = cpu_linear_backward(x, w, dout, pre, act)
    np.testing.assert_array_equal(fused["db"], cpu["db"])
    np.testing.assert_array_equal(alone["db"], cpu["db"])
    check_linear(fused, x, w, b, dout, pre, act)


@pytest.mark.parametrize("tiles", [
    dict(BM=4, BN=8, BK=3, TM=1, TN=4),  # 8 threads; BK not a power of two; 12-element A tiles over 8 threads
    dict(BM=16, BN=4, BK=5, TM=4, TN=1),  # tall tile: the dw tile's 16 db rows over 16 threads
    dict(BM=8, BN=16, BK=16, TM=2, TN=4),  # BK > the reduced dimension of dx (M = 10): one partial K tile
])
def test_linear_backward_tiles_do_not_change_bits(rng, tiles):
    """Every gradient is summed over its reduced dimension in order whatever the tiles (BIT_CHANGING)."""
    x, w, b, dout, pre = linear_case(rng, (2, 6), 11, 10, "gelu")
    base = cuda_linear_backward(x, w, dout, pre, "gelu", **TILES)
    tun = {f"{p}_{k}": v for p in ("dx", "dw") for k, v in tiles.items()}
    got = cuda_linear_backward(x, w, dout, pre, "gelu", bw_threads=8, bw_max_blocks=2, **tun)
    check_linear(got, x, w, b, dout, pre, "gelu", cpu_rel=0)
    for k in ("dx", "dw", "db"):
        if SIMULATOR:
            np.testing.assert_array_equal(got[k], base[k], err_msg=k)
        else:  # expected equal too, unless the compiler contracts two variants differently
            assert_grad(got[k], base[k], k, rel=1e-6)
    assert not any(L.BIT_CHANGING[k] for k in L.BACKWARD_TUNABLES)


def test_linear_backward_deterministic(rng):
    x, w, b, dout, pre = linear_case(rng, (17,), 12, 9, "gelu_tanh")
    a = cuda_linear_backward(x, w, dout, pre, "gelu_tanh", **TILES)
    c = cuda_linear_backward(x, w, dout, pre, "gelu_tanh", **TILES)
    for k in ("dx", "dw", "db"):
        assert a[k].tobytes() == c[k].tobytes(), k


def test_linear_backward_defaults_and_degenerate_sizes(rng):
    """Module defaults (no overrides); K = M = 1; no scratch given for an activation (allocated)."""
    for lead, K, M, act in [((2, 9), 16, 24, "gelu"), ((5,), 1, 1, "silu")]:
        x, w, b, dout, pre = linear_case(rng, lead, K, M, act)
        got = cuda_linear_backward(x, w, dout, pre, act)
        check_linear(got, x, w, b, dout, pre, act)


def test_linear_backward_no_rows_writes_zero_weight_grads(rng):
    x, w, b, dout, pre = linear_case(rng, (0,), 5, 3, "relu")
    for want in [("dx", "dw", "db"), ("db",)]:
        got = cuda_linear_backward(x, w, dout, pre, "relu", want, **TILES)
        for k in set(want) - {"dx"}:
            np.testing.assert_array_equal(got[k], np.zeros_like(got[k]), err_msg=k)


def test_linear_backward_arena_views(rng):
    """Gradients and inputs as reshaped views into one flat buffer (how the executor's arena hands them out)."""
    x, w, b, dout, pre = linear_case(rng, (2, 3), 7, 10, "gelu_tanh")
    parts = [x, w, dout, pre, np.empty_like(x), np.empty_like(w), np.empty(10, np.float32), np.empty_like(pre)]
    offs = np.cumsum([0] + [p.size for p in parts])
    arena = cuda.to_device(np.full(int(offs[-1]), np.nan, np.float32))
    v = [arena[offs[i]:offs[i + 1]].reshape(p.shape) for i, p in enumerate(parts)]
    for i in range(4):
        v[i].copy_to_device(parts[i])
    L.linear_backward(v[4], v[5], v[6], v[2], v[0], v[1], v[3], "gelu_tanh", v[7], **TILES)
    check_linear({"dx": host(v[4]), "dw": host(v[5]), "db": host(v[6])}, x, w, b, dout, pre, "gelu_tanh")


def _lin_args(rng):
    x, w, b, dout, pre = linear_case(rng, (4,), 3, 5, "relu")
    return dict(dx=dev(np.zeros_like(x)), dw=dev(np.zeros_like(w)), db=dev(np.zeros(5, np.float32)),
                dout=dev(dout), x=dev(x), w=dev(w), pre=dev(pre), act="relu", scratch=None)


@pytest.mark.parametrize("name,value,match", [
    ("x", np.zeros((4, 3), np.float32), "'x' must be a CUDA device array"),
    ("w", cuda.to_device(np.zeros((5, 4), np.float32)), r"'w' has shape \(5, 4\), expected \(M, 3\)"),
    ("dout", cuda.to_device(np.zeros((4, 6), np.float32)), r"'dout' has shape \(4, 6\), expected \(4, 5\)"),
    ("dx", cuda.to_device(np.zeros((4, 3), np.float64)), "'dx' has dtype float64, expected float32"),
    ("dw", cuda.to_device(np.zeros((5, 3), np.float32)).T, r"'dw' has shape \(3, 5\), expected \(5, 3\)"),
    ("dw", cuda.to_device(np.zeros((5, 6), np.float32))[:, :3], "'dw' .* must be C-contiguous"),
    ("db", cuda.to_device(np.zeros(4, np.float32)), r"'db' has shape \(4,\), expected \(5,\)"),
    ("pre", None, "'pre' .* is required for act='relu'"),
    ("pre", cuda.to_device(np.zeros((5, 4), np.float32)), r"'pre' has shape \(5, 4\), expected \(4, 5\)"),
    ("act", "swish", "'act' is 'swish', expected one of"),
    ("scratch", cuda.to_device(np.zeros(3, np.float32)), "'scratch' has 3 elements, expected 20"),
    ("scratch", np.zeros((4, 5), np.float32), "'scratch' must be a CUDA device array"),
])
def test_linear_backward_bad_arguments(rng, name, value, match):
    a = _lin_args(rng)
    a[name] = value
    with pytest.raises(GraphError, match="linear_backward: " + match):
        L.linear_backward(**a)


@pytest.mark.parametrize("tunables,match", [
    (dict(BM=8), r"unknown tunable\(s\) \['BM'\]"),  # the forward's tiles are not the backward's
    (dict(dx_BM=8, dx_TM=3), "tiles dx_BM=8, dx_BN=.* multiples of the register tile dx_TM=3"),
    (dict(dw_BM=64, dw_BN=64, dw_TM=1, dw_TN=1), "4096 threads per block, at most 1024"),
    (dict(dw_BK=0), "tunable dw_BK=0, expected a positive int"),
    (dict(dx_BK=400, dx_TM=1, dx_TN=1), "bytes of shared memory per block, at most 49152"),
    (dict(bw_threads=2048), "bw_threads=2048, at most 1024"),
    (dict(bw_max_blocks=0), "tunable bw_max_blocks=0, expected a positive int"),
])
def test_linear_backward_bad_tunables(rng, tunables, match):
    a = _lin_args(rng)
    with pytest.raises(GraphError, match=match):
        L.linear_backward(**a, **tunables)


def test_linear_backward_db_kernel_tunables_checked_when_used(rng):
    a = {**_lin_args(rng), "dw": None}
    with pytest.raises(GraphError, match="db_cols=64 x db_lanes=32 threads per block, at most 1024"):
        L.linear_backward(**a, db_cols=64, db_lanes=32)
    with pytest.raises(GraphError, match="tunable db_lanes=0"):
        L.linear_backward(**a, db_lanes=0)


# ================================================================ layernorm
LN_TINY = dict(threads=8, cols=4, lanes=2)


def ln_case(rng, lead, C):
    x = f32(rng.normal(1.0, 2.0, size=lead + (C,)))
    w, b, dout = f32(rng.normal(size=C)), f32(rng.normal(size=C)), f32(rng.normal(size=lead + (C,)))
    out, mean, rstd = np.empty_like(x), np.empty(lead, np.float32), np.empty(lead, np.float32)
    cpu_ln.layernorm_forward(out, mean, rstd, x, w, b, 1e-5)  # the same saved statistics for both twins
    return x, w, dout, mean, rstd


def cuda_ln_backward(x, w, dout, mean, rstd, **tunables):
    C = x.shape[-1]
    dx, dw, db = nans(x.shape), nans((C,)), nans((C,))
    dd = dev(dout)
    LN.layernorm_backward(dx, dw, db, dd, dev(x), dev(w), dev(mean), dev(rstd), **tunables)
    assert np.array_equal(host(dd), dout), "dout must be left intact"
    return host(dx), host(dw), host(db)


def cpu_ln_backward(x, w, dout, mean, rstd):
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(w)
    cpu_ln.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    return dx, dw, db


def check_ln(got, x, w, dout, mean, rstd, dwdb_bits=True):
    """vs float64 (1e-4), vs the CPU twin (dx 1e-5; dw, db bit-identical at rows=64)."""
    ref = rb.layernorm_backward(dout, x, w, 1e-5)
    cpu = cpu_ln_backward(x, w, dout, mean, rstd)
    for name, g, r, c in zip(("dx", "dw", "db"), got, ref, cpu):
        assert_grad(g, r, f"{name} vs float64")
        assert_grad(g, c, f"{name} vs CPU twin", rel=1e-5)
    if dwdb_bits:
        np.testing.assert_array_equal(got[1], cpu[1], err_msg="dw bits vs CPU twin")
        np.testing.assert_array_equal(got[2], cpu[2], err_msg="db bits vs CPU twin")


@pytest.mark.parametrize("N,C", [(1, 1), (1, 16), (7, 80), (33, 19)])
def test_layernorm_backward(rng, N, C):
    x, w, dout, mean, rstd = ln_case(rng, (N,), C)
    check_ln(cuda_ln_backward(x, w, dout, mean, rstd, **LN_TINY), x, w, dout, mean, rstd)


def test_layernorm_backward_3d_and_defaults(rng):
    x, w, dout, mean, rstd = ln_case(rng, (2, 7), 80)
    check_ln(cuda_ln_backward(x, w, dout, mean, rstd), x, w, dout, mean, rstd)


def test_layernorm_backward_cpu_bits_over_chunks(rng):
    """N = 130: three 64-row chunks (the last partial) over 2 lanes (2 rounds), 16 columns in blocks of 6:
    dw and db have the CPU's bits (the same float64 chunk partials, added in the same order)."""
    x, w, dout, mean, rstd = ln_case(rng, (130,), 16)
    check_ln(cuda_ln_backward(x, w, dout, mean, rstd, threads=4, cols=6, lanes=2), x, w, dout, mean, rstd)


@pytest.mark.parametrize("cfg", [dict(rows=4, lanes=3, cols=3, threads=2),  # 9 chunks in 3 rounds, column tail
                                 dict(rows=1, lanes=8, cols=1, threads=1),  # a chunk per row, one thread per row
                                 dict(rows=100, lanes=4, cols=16, threads=32)])  # one chunk, threads > C
def test_layernorm_backward_configurations(rng, cfg):
    x, w, dout, mean, rstd = ln_case(rng, (33,), 10)
    check_ln(cuda_ln_backward(x, w, dout, mean, rstd, **cfg), x, w, dout, mean, rstd, dwdb_bits=False)


def test_layernorm_backward_deterministic_and_dx_may_alias_dout(rng):
    x, w, dout, mean, rstd = ln_case(rng, (9,), 21)
    a = cuda_ln_backward(x, w, dout, mean, rstd, **LN_TINY)
    c = cuda_ln_backward(x, w, dout, mean, rstd, **LN_TINY)
    for g, h in zip(a, c):
        assert g.tobytes() == h.tobytes()
    buf, dw, db = dev(dout), nans((21,)), nans((21,))
    LN.layernorm_backward(buf, dw, db, buf, dev(x), dev(w), dev(mean), dev(rstd), **LN_TINY)
    for g, h in zip(a, (host(buf), host(dw), host(db))):
        np.testing.assert_array_equal(g, h)


def test_layernorm_backward_no_rows_writes_zero_weight_grads(rng):
    x, w, dout, mean, rstd = ln_case(rng, (0,), 6)
    _, dw, db = cuda_ln_backward(x, w, dout, mean, rstd, **LN_TINY)
    np.testing.assert_array_equal(dw, np.zeros(6, np.float32))
    np.testing.assert_array_equal(db, np.zeros(6, np.float32))


def _ln_args(rng):
    x, w, dout, mean, rstd = ln_case(rng, (4,), 8)
    return dict(dx=dev(np.zeros_like(x)), dw=dev(np.zeros_like(w)), db=dev(np.zeros_like(w)), dout=dev(dout),
                x=dev(x), w=dev(w), mean=dev(mean), rstd=dev(rstd))


@pytest.mark.parametrize("name,value,match", [
    ("x", np.zeros((4, 8), np.float32), "'x' must be a CUDA device array"),
    ("dout", cuda.to_device(np.zeros((4, 4), np.float32)), r"'dout' has shape \(4, 4\), expected \(4, 8\)"),
    ("dx", cuda.to_device(np.zeros((8, 4), np.float32)).T, r"'dx' has shape \(4, 8\)|'dx' must be C-contiguous"),
    ("dw", cuda.to_device(np.zeros(8, np.float64)), "'dw' has dtype float64, expected float32"),
    ("db", cuda.to_device(np.zeros(7, np.float32)), r"'db' has shape \(7,\), expected \(8,\)"),
    ("mean", cuda.to_device(np.zeros(5, np.float32)), r"'mean' has shape \(5,\), expected \(4,\)"),
    ("rstd", np.zeros(4, np.float32), "'rstd' must be a CUDA device array"),
])
def test_layernorm_backward_bad_arguments(rng, name, value, match):
    a = _ln_args(rng)
    a[name] = value
    with pytest.raises(GraphError, match="layernorm_backward: " + match):
        LN.layernorm_backward(**a)


@pytest.mark.parametrize("tunables,match", [
    (dict(threads=12), "threads per block must be a power of two"),
    (dict(block=4), r"unknown tunable\(s\) \['block'\]"),
    (dict(rows=0), "tunable rows=0, expected a positive int"),
    (dict(cols=64, lanes=32), "cols=64 x lanes=32 threads per block, at most 1024"),
])
def test_layernorm_backward_bad_tunables(rng, tunables, match):
    with pytest.raises(GraphError, match=match):
        LN.layernorm_backward(**_ln_args(rng), **tunables)


# ================================================================ through the op registry (the executor's path)
def test_backward_ops_registered_for_cuda(rng):
    """The shared adapters bind both launchers for the cuda device (module defaults, no tunables)."""
    assert ops.has("linear", "cuda", "backward") and ops.has("layernorm", "cuda", "backward")
    x, w, b, dout, pre = linear_case(rng, (5,), 6, 7, "gelu")
    dx, dw, db, scratch = nans(x.shape), nans(w.shape), nans((7,)), nans(dout.shape)
    ops.get("linear", "cuda", "backward")(dw=dw, dout=dev(dout), x=dev(x), w=dev(w), dx=dx, db=db, pre=dev(pre),
                                          scratch=scratch, act="gelu")
    check_linear({"dx": host(dx), "dw": host(dw), "db": host(db)}, x, w, b, dout, pre, "gelu")
    x, w, dout, mean, rstd = ln_case(rng, (3,), 10)
    dx, dw, db = nans(x.shape), nans((10,)), nans((10,))
    ops.get("layernorm", "cuda", "backward")(dx, dw, db, dev(dout), dev(x), dev(w), dev(mean), dev(rstd))
    check_ln((host(dx), host(dw), host(db)), x, w, dout, mean, rstd)


# ================================================================ real GPU only: GPT-2 124M shapes, module defaults
@GPU_ONLY
@pytest.mark.parametrize("K,M,act", [(768, 3072, "gelu_tanh"), (3072, 768, "none"), (768, 2304, "none")])
def test_gpu_linear_backward_gpt2(rng, K, M, act):
    x, w, b, dout, pre = linear_case(rng, (8, 1024), K, M, act)  # N = 8192 rows
    got = cuda_linear_backward(x, w, dout, pre, act, scratch=act != "none")
    check_linear(got, x, w, b, dout, pre, act, cpu_rel=1e-4)
    again = cuda_linear_backward(x, w, dout, pre, act, scratch=act != "none")
    for k in ("dx", "dw", "db"):
        assert got[k].tobytes() == again[k].tobytes(), k


@GPU_ONLY
def test_gpu_linear_backward_few_rows_and_db_alone(rng):
    x, w, b, dout, pre = linear_case(rng, (7,), 768, 3072, "gelu")
    check_linear(cuda_linear_backward(x, w, dout, pre, "gelu"), x, w, b, dout, pre, "gelu", cpu_rel=1e-4)
    x, w, b, dout, pre = linear_case(rng, (4096,), 64, 768, "relu")
    fused = cuda_linear_backward(x, w, dout, pre, "relu", ("dw", "db"))
    alone = cuda_linear_backward(x, w, dout, pre, "relu", ("db",))
    cpu = cpu_linear_backward(x, w, dout, pre, "relu")
    np.testing.assert_array_equal(fused["db"], cpu["db"])
    np.testing.assert_array_equal(alone["db"], cpu["db"])


@GPU_ONLY
@pytest.mark.parametrize("lead,C", [((8, 1024), 768), ((3, 333), 1600)])
def test_gpu_layernorm_backward_gpt2(rng, lead, C):
    x, w, dout, mean, rstd = ln_case(rng, lead, C)
    got = cuda_ln_backward(x, w, dout, mean, rstd)
    check_ln(got, x, w, dout, mean, rstd)
    again = cuda_ln_backward(x, w, dout, mean, rstd)
    for g, h in zip(got, again):
        assert g.tobytes() == h.tobytes()
