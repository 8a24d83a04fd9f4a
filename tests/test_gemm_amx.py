"""The AMX GEMM (gemm_amx, amx_tiles, bf16_split) against a float64 reference and against sgemm's own
error, at ragged shapes, thread counts and K blocks; the linear forward that runs on it (every
epilogue, kept and per-call weight panels); the packed-weight cache.
Skipped where the host or process has no AMX (gemm_amx.available())."""
import os
import subprocess
import sys

import numpy as np
import pytest

from nbformer.kernels.cpu import gemm_amx

pytestmark = pytest.mark.skipif(not gemm_amx.available(), reason="no AMX tile data on this host / process")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _rel(x, ref):
    return float(np.abs(x.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


SHAPES = [(1, 1, 1), (1, 40, 3), (31, 33, 17), (32, 32, 32), (64, 96, 512), (100, 70, 45), (129, 257, 300),
          (33, 65, 1031), (256, 64, 2049)]


@pytest.mark.parametrize("a_trans", [False, True])
@pytest.mark.parametrize("R,C,K", SHAPES)
def test_gemm_matches_float64_as_closely_as_sgemm(rng, R, C, K, a_trans):
    """Ragged shapes (edges of 1..31 rows / columns / K, one panel or many on either side), A given
    as is or transposed (a (K, R): its panels through the register transposes, whole 16 x 32 blocks and
    ragged ones): the float64 product within twice sgemm's own error (the three-part split is
    fp32-accurate), every element written."""
    A, b = f32(rng.normal(size=(R, K))), f32(rng.normal(size=(K, C)))
    a = f32(A.T) if a_trans else A
    out = np.full((R, C), np.nan, np.float32)
    gemm_amx.gemm(out, a, b, a_trans=a_trans)
    ref = A.astype(np.float64) @ b.astype(np.float64)
    assert np.isfinite(out).all()
    assert _rel(out, ref) <= 2 * _rel(A @ b, ref) + 2 ** -24, (_rel(out, ref), _rel(A @ b, ref))


def test_transpose16_transposes_a_block_at_any_offset_and_leading_dimension():
    from numba import njit

    from nbformer.kernels.cpu.transpose16 import transpose16

    @njit
    def run(dst, d_off, d_ld, src, s_off, s_ld):
        transpose16(src, s_off, s_ld, dst, d_off, d_ld)

    src = f32(np.arange(40 * 50).reshape(40, 50))
    dst = np.full((30, 61), -1.0, np.float32)
    run(dst, 2 * 61 + 7, 61, src, 3 * 50 + 5, 50)
    np.testing.assert_array_equal(dst[2:18, 7:23], src[3:19, 5:21].T)
    dst[2:18, 7:23] = -1.0
    assert (dst == -1.0).all()  # nothing outside the block written


def test_gemm_bits_do_not_depend_on_threads_or_k_blocks(rng):
    """One micro-kernel call sequence per 32 x 32 block whatever the thread count, and partial sums
    stored in fp32 and loaded back exactly: the same bits for 1 or 2 threads and any K block."""
    import numba

    outs = []
    for R, C in ((200, 150), (64, 300)):  # (rows packed by the threads that multiply them; B panels split)
        K = 1100
        a, b = f32(rng.normal(size=(R, K))), f32(rng.normal(size=(K, C)))
        outs = []
        for a_trans in (False, True):  # (the same A, packed from its transpose: the same panels)
            for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 3):
                for kb in (1, 3, gemm_amx.K_BLOCK, 64):
                    out = np.empty((R, C), np.float32)
                    pa, pb, tc = gemm_amx.panels(R, C, K, True)
                    gemm_amx._gemm(out, f32(a.T) if a_trans else a, b, pa, pb, tc, kb, threads, gemm_amx.config(),
                                   a_trans, False)
                    outs.append(out)
        for o in outs[1:]:
            np.testing.assert_array_equal(outs[0], o)


def _aligned_empty(shape):
    raw = np.empty(int(np.prod(shape)) + 16, np.float32)
    off = (-raw.ctypes.data % 64) // 4
    return raw[off:off + int(np.prod(shape))].reshape(shape)


@pytest.mark.parametrize("R,C,K", [(64, 96, 40), (96, 64, 1100)])
def test_streamed_output_has_the_bits_of_the_cached_one(rng, monkeypatch, R, C, K):
    """Outputs from STREAM_BYTES on (lowered here) leave through non-temporal stores: the same bits,
    with one K step or several (the last step only is streamed), B panels split or rows split; an
    output whose rows are not 64-byte aligned is never streamed."""
    monkeypatch.setattr(gemm_amx, "STREAM_BYTES", 0)
    a, b = f32(rng.normal(size=(R, K))), f32(rng.normal(size=(K, C)))
    want = np.empty((R, C), np.float32)
    pa, pb, tc = gemm_amx.panels(R, C, K, True)
    gemm_amx._gemm(want, a, b, pa, pb, tc, 16, 2, gemm_amx.config(), False, False)
    got = _aligned_empty((R, C))
    got.fill(np.nan)
    assert gemm_amx.streams(got)
    gemm_amx.gemm(got, a, b)
    np.testing.assert_array_equal(got, want)
    skewed = np.empty(R * C + 1, np.float32)
    view = skewed[1:].reshape(R, C) if skewed.ctypes.data % 64 == 0 else skewed[:R * C].reshape(R, C)
    if view.ctypes.data % 64:
        assert not gemm_amx.streams(view)
    assert not gemm_amx.streams(np.empty((R, C + 1), np.float32)[:, :C])


def test_gemm_exact_on_bfloat16_representable_inputs():
    """Inputs that are bfloat16 already (h alone, m = l = 0) with sums exact in fp32: the exact result."""
    rng = np.random.default_rng(3)
    a = f32(rng.integers(-8, 9, size=(70, 96)))
    b = f32(rng.integers(-8, 9, size=(96, 50)))
    out = np.empty((70, 50), np.float32)
    gemm_amx.gemm(out, a, b)
    np.testing.assert_array_equal(out, (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32))


def test_gemm_non_finite_inputs_reach_their_rows_and_columns_only(rng):
    """NaN / inf in A reach exactly the output rows they feed (as NaN or inf: the split products of an
    inf meet zeros), and nothing else; a huge finite value stays finite."""
    R, C, K = 64, 48, 40
    a, b = f32(rng.normal(size=(R, K))), f32(rng.normal(size=(K, C)))
    a[3, 5], a[40, 0], a[10, 7] = np.nan, np.inf, np.float32(3e38)
    b = b / 1e3
    out = np.empty((R, C), np.float32)
    gemm_amx.gemm(out, a, b)
    bad = ~np.isfinite(out)
    assert bad[3].all() and bad[40].all()
    assert not np.delete(bad, [3, 40], axis=0).any()
    ref = a.astype(np.float64)[10] @ b.astype(np.float64)
    assert np.abs(out[10] - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("cvt", [False, True])
def test_bf16_split_is_exact_and_rounds_to_nearest_even(monkeypatch, cvt):
    """h + m + l == x exactly (float64 sum) for finite x from 2^-100 to FLT_MAX; h is x rounded
    to the nearest bfloat16, ties to even; NaN stays NaN in h. Both implementations: the integer
    rounding and, where the host has AVX512-BF16, its conversion instruction."""
    from numba import njit

    from nbformer.kernels.cpu import bf16_split
    from nbformer.kernels.cpu.bf16_split import split16

    if cvt and not bf16_split._host_has_avx512_bf16():
        pytest.skip("no AVX512-BF16 on this host")
    monkeypatch.setattr(bf16_split, "_CVT", cvt)  # read when the function below is compiled

    @njit
    def run(x, d):
        for i in range(0, x.size, 16):
            split16(x, i, d, (i // 16) * 3072)

    rng = np.random.default_rng(5)
    x = f32(np.concatenate([rng.normal(size=4000) * np.exp2(rng.integers(-120, 120, size=4000)),
                            [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.0, 65504.0, 1e-38, 3.3e38, np.nan,
                             np.inf, -np.inf]]))
    x = np.resize(x, (x.size + 15) // 16 * 16)
    d = np.zeros((x.size // 16) * 3072, np.uint16)
    run(x, d)
    idx = np.arange(x.size)
    base = (idx // 16) * 3072 + idx % 16
    parts = [(d[base + 1024 * s].astype(np.uint32) << 16).view(np.float32).astype(np.float64) for s in range(3)]
    # (below 2^-100 the low parts are subnormal, which AMX reads as zero anyway: not compared)
    fin = np.isfinite(x) & (np.abs(x) < 3.38e38) & ((np.abs(x) > 2.0 ** -100) | (x == 0))
    np.testing.assert_array_equal((parts[0] + parts[1] + parts[2])[fin], x[fin].astype(np.float64))
    # ties to even: 1 + 2^-8 (a tie between 1 and 1 + 2^-7) rounds to 1; 1 + 3 * 2^-8 to 1 + 2^-6
    h = dict(zip(x[:4012].tolist(), parts[0][:4012].tolist()))
    assert h[1.00390625] == 1.0 and h[1.01171875] == 1.015625
    assert np.isnan(parts[0][np.isnan(x)]).all()
    assert (parts[0][np.isinf(x)] == x[np.isinf(x)]).all() and (parts[1][np.isinf(x)] == 0).all()


# ---------------------------------------------------------------- the linear layers on it


@pytest.fixture
def small_on_amx(monkeypatch):
    """Small products take the AMX path too (the tests' shapes stay small and fast)."""
    monkeypatch.setattr(gemm_amx, "MIN_FLOPS", 0)
    monkeypatch.setattr(gemm_amx, "MIN_ROWS", 1)


def _ref_linear(x, w, b, act, res):
    import reference  # tests/reference.py: the float64 kernels' reference

    return reference.linear(x, w, b, act, res)


@pytest.mark.parametrize("N,K,M", [(64, 32, 32), (96, 200, 130), (300, 77, 513), (257, 512, 64)])
@pytest.mark.parametrize("act,use_b,use_res", [("none", False, False), ("gelu_tanh", True, False),
                                               ("gelu", True, True), ("relu", False, True), ("silu", True, False)])
def test_linear_forward_on_amx_matches_the_reference_and_training(rng, small_on_amx, monkeypatch, N, K, M, act,
                                                                   use_b, use_res):
    """linear_forward on AMX with every epilogue: the float64 reference at fp32 tolerance; the same bits
    from a read-only weight's kept panels, from panels packed for one call (too big to keep; a
    writable weight) and from training's forward (which also writes pre = x @ w.T + b); the BLAS
    path's values (blocks given) at fp32 tolerance."""
    from nbformer.kernels.cpu.linear import linear_forward, linear_forward_train

    assert gemm_amx.worth(N, M, K)
    x = f32(rng.normal(size=(N, K)))
    w = f32(rng.normal(size=(M, K)) / np.sqrt(K))
    b = f32(rng.normal(size=M)) if use_b else None
    r = f32(rng.normal(size=(N, M))) if use_res else None
    w.flags.writeable = False
    out = np.full((N, M), np.nan, np.float32)
    linear_forward(out, x, w, b, act, r)  # packs w's panels (kept)
    np.testing.assert_allclose(out, _ref_linear(x, w, b, act, r), atol=2e-5, rtol=2e-5)
    again = np.full((N, M), np.nan, np.float32)
    linear_forward(again, x, w, b, act, r)  # the kept panels
    np.testing.assert_array_equal(out, again)
    monkeypatch.setattr(gemm_amx, "CACHE_MB", 0)  # too big to keep: packed for the call
    gemm_amx.clear_packed()
    linear_forward(again, x, w, b, act, r)
    np.testing.assert_array_equal(out, again)
    assert not gemm_amx._packed
    writable = np.full((N, M), np.nan, np.float32)
    linear_forward(writable, x, w.copy(), b, act, r)  # packed inside the kernel, never kept
    np.testing.assert_array_equal(out, writable)
    assert not gemm_amx._packed
    train_out, pre = np.full((N, M), np.nan, np.float32), np.full((N, M), np.nan, np.float32)
    linear_forward_train(train_out, pre, x, w.copy(), b, act, r)
    np.testing.assert_array_equal(out, train_out)
    np.testing.assert_allclose(pre, _ref_linear(x, w, b, "none", None), atol=2e-5, rtol=2e-5)
    blas = np.full((N, M), np.nan, np.float32)
    linear_forward(blas, x, w, b, act, r, rows=64, cols=64)  # blocks given: the BLAS schedule
    np.testing.assert_allclose(out, blas, atol=2e-5, rtol=2e-5)


def test_packed_weight_cache_keeps_read_only_weights_within_its_budget(rng, monkeypatch):
    """Read-only weights are packed once and kept (the entry holds the array), writable ones never;
    past CACHE_MB the least recently used pack goes."""
    gemm_amx.clear_packed()
    w1, w2, wr = (f32(rng.normal(size=(1024, 512))) for _ in range(3))  # 3 MB packs
    for w in (w1, w2):
        w.flags.writeable = False
    assert gemm_amx.packed_weight(wr) is None
    p1 = gemm_amx.packed_weight(w1)
    assert gemm_amx.packed_weight(w1) is p1
    size_mb = p1.nbytes / 2 ** 20
    monkeypatch.setattr(gemm_amx, "CACHE_MB", int(size_mb * 1.5))
    gemm_amx.packed_weight(w2)  # over budget: w1's pack goes
    assert len(gemm_amx._packed) == 1 and gemm_amx.packed_weight(w2) is not None
    assert gemm_amx.packed_weight(w1) is not p1
    gemm_amx.clear_packed()
    assert not gemm_amx._packed and gemm_amx._packed_bytes[0] == 0


def test_nbformer_amx_0_turns_it_off():
    code = "from nbformer.kernels.cpu import gemm_amx; print(gemm_amx.available())"
    env = dict(os.environ, NBFORMER_AMX="0")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("N,K,M", [(64, 32, 32), (96, 200, 130), (300, 77, 513), (257, 512, 64)])
@pytest.mark.parametrize("act,use_b", [("none", False), ("gelu_tanh", True), ("relu", True)])
def test_linear_backward_on_amx_matches_float64(rng, small_on_amx, monkeypatch, N, K, M, act, use_b):
    """linear_backward's products on AMX (dX = G @ W; dW = G.T @ X, G packed through the register
    transposes), ragged shapes: the float64 reference within twice sgemm's error, db exact to fp32
    rounding, the same bits for 1 and 2 threads, and as gemm_amx.gemm's (the same blocks)."""
    import numba

    from nbformer.kernels.cpu import linear

    calls = []
    real = linear._amx_product
    monkeypatch.setattr(linear, "_amx_product", lambda out, a, b, a_trans: calls.append(a_trans) or real(out, a, b,
                                                                                                       a_trans))

    from nbformer.kernels.cpu.linear import activate_grad, ACT_CODES, linear_backward

    x = f32(rng.normal(size=(N, K)))
    w = f32(rng.normal(size=(M, K)) / np.sqrt(K))
    pre = f32(rng.normal(size=(N, M)))
    dout = f32(rng.normal(size=(N, M)))
    code = ACT_CODES[act]
    g = dout.astype(np.float64) * np.vectorize(lambda v: activate_grad(v, code))(pre.astype(np.float64))
    g32 = f32(g)
    runs = []
    for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
        dx, dw = np.full((N, K), np.nan, np.float32), np.full((M, K), np.nan, np.float32)
        db = np.full(M, np.nan, np.float32) if use_b else None
        with_threads = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            linear_backward(dx, dw, db, dout, x, w, pre if act != "none" else None, act)
        finally:
            numba.set_num_threads(with_threads)
        runs.append((dx, dw, db))
    assert calls == [False, True] * len(runs)  # both products on AMX
    dx, dw, db = runs[0]
    ref_dx, ref_dw = g @ w.astype(np.float64), g.T @ x.astype(np.float64)
    assert _rel(dx, ref_dx) <= 2 * _rel(g32 @ w, ref_dx) + 1e-6
    assert _rel(dw, ref_dw) <= 2 * _rel(g32.T @ x, ref_dw) + 1e-6
    if use_b:
        np.testing.assert_allclose(db, g.sum(0), rtol=1e-5, atol=1e-5 * np.abs(g).sum(0).max())
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            if want is not None:
                np.testing.assert_array_equal(got, want)
    if act == "none":  # (G = dout exactly)
        plain_dw, plain_dx = np.empty((M, K), np.float32), np.empty((N, K), np.float32)
        gemm_amx.gemm(plain_dw, dout, x, a_trans=True)
        gemm_amx.gemm(plain_dx, dout, w)
        np.testing.assert_array_equal(plain_dw, dw)
        np.testing.assert_array_equal(plain_dx, dx)
