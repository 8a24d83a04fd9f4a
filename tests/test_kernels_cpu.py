"""CPU kernels (except attention, see test_attention_cpu.py) against the float64 reference."""
import numpy as np
import pytest

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu.elementwise import add_forward, take_rows
from nbformer.kernels.cpu.embedding import embedding_forward, sinusoidal_table
from nbformer.kernels.cpu.layernorm import layernorm_forward
from nbformer.kernels.cpu.linear import linear_forward
from nbformer.kernels.cpu.pooling import l2_normalize, pool
from nbformer.kernels.cpu.sampling import sample_token
from nbformer.kernels.cpu.softmax import log_softmax_forward, softmax_forward

SHAPES = [(1, 1), (2, 7), (1, 33), (3, 130), (1, 257)]


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("variant", ["tok", "tok+pos", "tok+pos+type", "scaled"])
def test_embedding(rng, B, T, variant):
    V, P, C = 50, 300, 24
    wte, wpe, wtt = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(P, C))), f32(rng.normal(size=(3, C)))
    ids = rng.integers(0, V, (B, T))
    pos = rng.integers(0, P, (B, T))
    typ = rng.integers(0, 3, (B, T))
    out = np.empty((B, T, C), np.float32)
    use_pos, use_type = "pos" in variant, "type" in variant
    scale = 4.0 if variant == "scaled" else 1.0
    embedding_forward(out, ids, wte, pos if use_pos else None, wpe if use_pos else None,
                      typ if use_type else None, wtt if use_type else None, scale)
    want = ref.embedding(ids, wte, wpe if use_pos else None, pos, wtt if use_type else None, typ, scale)
    assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_embedding_rejects_out_of_range_ids(rng):
    wte = f32(rng.normal(size=(10, 4)))
    out = np.empty((1, 3, 4), np.float32)
    with pytest.raises(GraphError, match="ids"):
        embedding_forward(out, np.array([[1, 10, 2]]), wte)
    with pytest.raises(GraphError, match="pos_ids"):
        embedding_forward(out, np.array([[1, 2, 3]]), wte, np.array([[0, 1, 5]]), f32(np.zeros((5, 4))))


def test_sinusoidal_table_matches_seed_formula():
    assert_close(sinusoidal_table(257, 64), ref.sinusoidal_table(257, 64), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("N,C", [(1, 1), (1, 16), (7, 80), (130, 384), (33, 768)])
def test_layernorm(rng, N, C):
    x = f32(rng.normal(3.0, 2.0, size=(N, C)))
    w, b = f32(rng.normal(size=C)), f32(rng.normal(size=C))
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm_forward(out, mean, rstd, x, w, b, 1e-5)
    o, m, r = ref.layernorm(x, w, b, 1e-5)
    assert_close(out, o, atol=1e-5, rtol=1e-5, what="out")
    assert_close(mean, m, atol=1e-6, rtol=1e-6, what="mean")
    assert_close(rstd, r, atol=1e-6, rtol=1e-5, what="rstd")


def test_layernorm_3d_and_tiny_eps(rng):
    x = f32(rng.normal(size=(2, 5, 12)))
    w, b = f32(np.ones(12)), f32(np.zeros(12))
    out, mean, rstd = np.empty_like(x), np.empty((2, 5), np.float32), np.empty((2, 5), np.float32)
    layernorm_forward(out, mean, rstd, x, w, b, 1e-12)
    assert_close(out, ref.layernorm(x, w, b, 1e-12)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("N,K,M", [(1, 1, 1), (7, 33, 5), (130, 64, 257), (3, 80, 96)])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True)])
def test_linear(rng, act, N, K, M, bias, residual):
    x, w = f32(rng.normal(size=(N, K))), f32(rng.normal(size=(M, K)) / np.sqrt(K))
    b = f32(rng.normal(size=M)) if bias else None
    r = f32(rng.normal(size=(N, M))) if residual else None
    out = np.empty((N, M), np.float32)
    linear_forward(out, x, w, b, act, r)
    assert_close(out, ref.linear(x, w, b, act, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [2, 3, 4, 5, 8, 13, 16, 17])
def test_linear_few_rows_decoding_path(rng, N):
    """2..16 rows take our skinny kernel (4 rows per pass + a remainder), 17 the sgemm column blocks;
    M spans several column blocks and a partial one, K is odd."""
    x, w = f32(rng.normal(size=(N, 301))), f32(rng.normal(size=(600, 301)) / np.sqrt(301))
    b, r = f32(rng.normal(size=600)), f32(rng.normal(size=(N, 600)))
    out = np.empty((N, 600), np.float32)
    linear_forward(out, x, w, b, "gelu", r)
    assert_close(out, ref.linear(x, w, b, "gelu", r), atol=1e-5, rtol=1e-5)
    for i in range(N):  # a row does not depend on the rows decoded beside it (beyond rounding)
        one = np.empty((1, 600), np.float32)
        linear_forward(one, x[i:i + 1], w, b, "gelu", r[i:i + 1])
        assert_close(out[i], one[0], atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("units", [1, 2, 3, 16])
def test_auto_blocks_split_the_longer_side_into_a_multiple_of_the_pool(units):
    from nbformer.kernels.cpu.gemm import COL_TARGET, COLS, ROW_TARGET, ROWS, auto_blocks, by_rows_with

    for N, M in ((256, 2304), (256, 50257), (1472, 1536), (1472, 384), (8192, 384), (300, 300), (255, 4096),
                 (1, 768), (17, 600), (4097, 4097), (1000, 3)):
        rows, cols = auto_blocks(N, M, units)
        if N < 2 * ROWS:  # few rows: the decoding split, unchanged
            assert (rows, cols) == (ROWS, COLS)
            continue
        by_rows = by_rows_with(N, M, rows, cols)
        n = -(-N // rows) if by_rows else -(-M // cols)
        assert by_rows == (N >= M) or n == 1, (N, M, units, rows, cols)
        assert n == 1 or n % units == 0, (N, M, units, n)  # every thread as busy
        assert (rows if by_rows else cols) <= max(ROW_TARGET if by_rows else COL_TARGET, -(-(N if by_rows else M) // units))


@pytest.mark.parametrize("units", [1, 2, 3, 16])
def test_row_blocks_split_rows_into_a_multiple_of_the_pool(units):
    from nbformer.kernels.cpu.gemm import COLS, ROW_TARGET, ROWS, by_rows_with, row_blocks

    for N, M in ((1, 3072), (255, 3072), (256, 3072), (300, 3072), (1040, 80), (4097, 17), (8192, 3072)):
        rows, cols = row_blocks(N, M, units)
        if N < 2 * ROWS:
            assert (rows, cols) == (ROWS, COLS)
            continue
        assert by_rows_with(N, M, rows, cols), (N, M, units)  # always the row path
        n = -(-N // rows)
        assert rows >= ROWS // 2 or n == 1, (N, units, rows)  # never tiny blocks (each packs the weight)
        assert n == 1 or n == N // (ROWS // 2) or (n % units == 0 and rows <= max(ROW_TARGET, -(-N // units))), \
            (N, units, rows)


def test_swiglu_blocks_by_shape_give_the_same_bits_for_any_thread_count(rng):
    import numba

    from nbformer.kernels.cpu.swiglu import resolve_blocks, swiglu_linear_forward

    N, K, F = 1029, 24, 70
    x, w = f32(rng.normal(size=(N, K))), f32(rng.normal(size=(2 * F, K)) / np.sqrt(K))
    out = np.empty((N, F), np.float32)
    swiglu_linear_forward(out, x, w, None, "silu")
    explicit = np.empty_like(out)
    rows, cols = resolve_blocks(N, F, None, None)
    swiglu_linear_forward(explicit, x, w, None, "silu", rows=rows, cols=cols)
    np.testing.assert_array_equal(out, explicit)
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        again = np.empty_like(out)
        swiglu_linear_forward(again, x, w, None, "silu", threads=threads)
        np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("units", [1, 2, 3, 16])
def test_tn_rows_cover_the_gradient_in_a_multiple_of_the_pool(units):
    from nbformer.kernels.cpu.gemm import TN_ROW_TARGET, tn_rows

    for M in (1, 2, 7, 256, 768, 1024, 1031, 8192, 50257):
        rows = tn_rows(M, units)
        n = -(-M // rows)
        assert 1 <= rows <= max(TN_ROW_TARGET, 1) and (rows - 1) * n < M <= rows * n, (M, units, rows)
        assert n % units == 0 or rows == 1, (M, units, n)  # every thread as busy (down to 1-row blocks)


def amx_runs(N, M, K):
    """Does linear_forward's default take the AMX path (gemm_amx) for this shape here (any weight:
    a read-only one's panels are kept, a writable one's packed per call)?"""
    from nbformer.kernels.cpu import gemm_amx

    return gemm_amx.available() and gemm_amx.worth(N, M, K)


@pytest.mark.parametrize("act,res", [("gelu", True), ("none", True), ("none", False)])
@pytest.mark.parametrize("N,K,M", [(256, 40, 700), (600, 24, 90), (513, 17, 513), (300, 8, 2500), (260, 5, 30)])
def test_linear_auto_blocks_match_the_reference_and_the_explicit_blocks(rng, N, K, M, act, res):
    """linear_forward with no blocks runs gemm.auto_blocks (column split when N < M, row split
    otherwise): the reference's values, and exactly the bits of those blocks given explicitly, and of
    training's forward, with and without an activation or a residual."""
    from nbformer.kernels.cpu.gemm import auto_blocks
    from nbformer.kernels.cpu.linear import linear_forward_train

    x, w = f32(rng.normal(size=(N, K))), f32(rng.normal(size=(M, K)) / np.sqrt(max(K, 1)))
    b, r = f32(rng.normal(size=M)), (f32(rng.normal(size=(N, M))) if res else None)
    out, explicit = np.full((N, M), np.nan, np.float32), np.empty((N, M), np.float32)
    linear_forward(out, x, w, b, act, r)
    assert_close(out, ref.linear(x, w, b, act, r), atol=1e-5, rtol=1e-5)
    rows, cols = auto_blocks(N, M)
    linear_forward(explicit, x, w, b, act, r, rows=rows, cols=cols)
    if amx_runs(N, M, K):  # explicit blocks name the BLAS schedule; the default runs on AMX
        assert_close(explicit, out, atol=1e-5, rtol=1e-5)
    else:
        np.testing.assert_array_equal(out, explicit)
    for threads in (1, 2):  # the pool's size sets the blocks, a call's thread count never does
        again = np.empty((N, M), np.float32)
        linear_forward(again, x, w, b, act, r, threads=min(threads, __import__("numba").config.NUMBA_NUM_THREADS))
        np.testing.assert_array_equal(out, again)
    train_out, pre = np.empty((N, M), np.float32), np.empty((N, M), np.float32)
    linear_forward_train(train_out, pre, x, w, b, act, r)  # training's forward: the same path, bits
    np.testing.assert_array_equal(out, train_out)


@pytest.mark.parametrize("N,K,M,cols", [(17, 33, 600, 256), (130, 64, 257, 100), (1, 8, 70, 32), (200, 1, 90, 7)])
def test_gemm_column_blocks_in_place_give_np_dot_bits(rng, N, K, M, cols):
    """The column split (matmul_nn, and the plain linear forward) and the weight gradient (matmul_tn)
    call sgemm on strided blocks in place (gemm.sgemm_rows): exactly np.dot's bits on contiguous
    copies of the same blocks (np.dot compiled by Numba: the BLAS the kernels bind, not NumPy's), the
    reference's values, every element written."""
    from numba import njit

    from nbformer.kernels.cpu.gemm import matmul_nn, matmul_tn, pin_blas_to_one_thread

    pin_blas_to_one_thread()
    nb_dot = njit(lambda x, y: np.dot(x, y))

    a, b = f32(rng.normal(size=(N, K))), f32(rng.normal(size=(K, M)))
    out = np.full((N, M), np.nan, np.float32)
    matmul_nn(out, a, b, rows=4 * N, cols=cols)  # rows > N / 2: the column split
    blocks = np.concatenate([nb_dot(a, np.ascontiguousarray(b[:, m0:m0 + cols])) for m0 in range(0, M, cols)], 1)
    np.testing.assert_array_equal(out, blocks)
    assert_close(out, a.astype(np.float64) @ b, atol=1e-5, rtol=1e-5)

    w = f32(rng.normal(size=(M, K)))
    lin = np.full((N, M), np.nan, np.float32)
    linear_forward(lin, a, w, rows=4 * N, cols=cols, skinny_max_rows=0)  # plain: no epilogue, no scratch
    blocks = np.concatenate([nb_dot(a, np.ascontiguousarray(w[m0:m0 + cols]).T) for m0 in range(0, M, cols)], 1)
    if N > 1:  # (one row: OpenBLAS forwards sgemm to an sgemv, transposed or not by the call's order)
        np.testing.assert_array_equal(lin, blocks)
    assert_close(lin, a.astype(np.float64) @ w.T, atol=1e-5, rtol=1e-5)

    g = f32(rng.normal(size=(N, M)))
    dw = np.full((M, K), np.nan, np.float32)
    matmul_tn(dw, g, a, rows=cols)
    blocks = np.concatenate([nb_dot(np.ascontiguousarray(g[:, m0:m0 + cols]).T, a) for m0 in range(0, M, cols)], 0)
    if K > 1:  # (one column of dW: an sgemv again, see above)
        np.testing.assert_array_equal(dw, blocks)
    assert_close(dw, g.T.astype(np.float64) @ a, atol=1e-4, rtol=1e-5)


def test_gemm_entry_points_pin_blas_to_one_thread():
    """matmul_nn / matmul_tn called first in a process (the roofline, a user) set BLAS to one
    thread as the layer launchers do: a threaded BLAS inside the blocks' prange oversubscribed the
    cores (OpenBLAS warned "Detect OpenMP Loop and this application may hang")."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from nbformer.kernels.cpu import gemm\n"
            "a = np.ones((300, 8), np.float32)\n"
            "out = np.empty((300, 5), np.float32)\n"
            "gemm.matmul_nn(out, a, np.ones((8, 5), np.float32))\n"
            "assert gemm._blas_pinned and float(out[0, 0]) == 8.0\n"
            "gemm._blas_pinned = False\n"
            "gemm.matmul_tn(np.empty((8, 5), np.float32), a, np.ones((300, 5), np.float32))\n"
            "assert gemm._blas_pinned\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_gemm_in_place_with_no_inner_dimension(rng):
    """K = 0 (an empty sum) and no rows of g: zeros, not a BLAS argument error."""
    from nbformer.kernels.cpu.gemm import matmul_nn, matmul_tn

    out = np.full((5, 40), np.nan, np.float32)
    matmul_nn(out, np.empty((5, 0), np.float32), np.empty((0, 40), np.float32), rows=64, cols=16)
    np.testing.assert_array_equal(out, 0.0)
    dw = np.full((40, 3), np.nan, np.float32)
    matmul_tn(dw, np.empty((0, 40), np.float32), np.empty((0, 3), np.float32), rows=16)
    np.testing.assert_array_equal(dw, 0.0)


def test_linear_batched_shape(rng):
    x, w, b = f32(rng.normal(size=(2, 9, 16))), f32(rng.normal(size=(48, 16))), f32(rng.normal(size=48))
    out = np.empty((2, 9, 48), np.float32)
    linear_forward(out, x, w, b, "gelu")
    assert_close(out, ref.linear(x, w, b, "gelu"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N,V", [(1, 1), (3, 7), (5, 1000), (2, 50257)])
def test_softmax_and_log_softmax(rng, N, V):
    x = f32(rng.normal(0, 5, size=(N, V)))
    out = np.empty_like(x)
    softmax_forward(out, x)
    assert_close(out, ref.softmax(x), atol=1e-7, rtol=1e-5)
    log_softmax_forward(out, x)
    assert_close(out, ref.log_softmax(x), atol=1e-5, rtol=1e-5)


def test_softmax_with_masked_entries():
    x = f32([[0.0, -np.inf, 1.0, -np.inf], [-np.inf, 2.0, -np.inf, -np.inf]])
    out = np.empty_like(x)
    softmax_forward(out, x)
    assert_close(out, ref.softmax(x), atol=1e-7, rtol=1e-6)
    log_softmax_forward(out, x)
    assert np.isneginf(out[0, 1]) and np.isneginf(out[1, 0]) and abs(out[1, 1]) < 1e-7


def test_add_in_place(rng):
    a, b = f32(rng.normal(size=(3, 5, 7))), f32(rng.normal(size=(3, 5, 7)))
    want = ref.f64(a) + b
    add_forward(a, a, b)
    assert_close(a, want, atol=1e-6, rtol=1e-6)


def test_take_rows(rng):
    x = f32(rng.normal(size=(3, 6, 4)))
    idx = np.array([5, 0, 2])
    out = np.empty((3, 4), np.float32)
    take_rows(out, x, idx)
    assert_close(out, x[np.arange(3), idx], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len", "lasttoken"])
def test_pooling(rng, mode):
    B, T, C = 4, 9, 16
    x = f32(rng.normal(size=(B, T, C)))
    mask = np.ones((B, T), np.uint8)
    mask[1, 1:] = 0  # a row padded down to one real token
    mask[2, 5:] = 0
    out = np.empty((B, C), np.float32)
    pool(out, x, mask, mode)
    assert_close(out, ref.pool(x, mask, mode), atol=1e-6, rtol=1e-6)


def test_l2_normalize(rng):
    x = f32(rng.normal(size=(5, 33)))
    x[3] = 0.0  # the zero vector stays zero (eps like torch.nn.functional.normalize)
    want = ref.f64(x) / np.maximum(np.linalg.norm(ref.f64(x), axis=1, keepdims=True), 1e-12)
    l2_normalize(x)
    assert_close(x, want, atol=1e-7, rtol=1e-6)


class TestSampling:
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], np.float32)

    def test_greedy_takes_first_max(self):
        assert sample_token(self.logits, 0.0) == 1

    def test_top_k_1_is_greedy(self):
        assert all(sample_token(self.logits, 1.0, top_k=1, u=u) == 1 for u in (0.0, 0.5, 0.999))

    def test_distribution_matches_softmax(self):
        probs = ref.softmax(self.logits / 0.7)
        us = (np.arange(20000) + 0.5) / 20000  # a uniform grid gives the inverse-CDF exactly
        counts = np.bincount([sample_token(self.logits, 0.7, u=u) for u in us], minlength=5) / len(us)
        assert_close(counts, probs, atol=2e-4, rtol=0)

    def test_top_k_and_top_p_truncate(self):
        us = (np.arange(5000) + 0.5) / 5000
        got_k = {sample_token(self.logits, 1.0, top_k=3, u=u) for u in us}
        assert got_k == {1, 3, 2}
        # probs sorted: ids 1 and 3 (~0.39 each) then 2 (~0.14): top_p=0.5 keeps {1, 3}
        got_p = {sample_token(self.logits, 1.0, top_p=0.5, u=u) for u in us}
        assert got_p == {1, 3}
        # a tiny top_p keeps exactly the most likely token
        assert {sample_token(self.logits, 1.0, top_p=1e-6, u=u) for u in us} == {1}
