"""The Llama family's CUDA kernels (RMSNorm, RoPE, the gated FFN and grouped-query attention) vs the
float64 references and vs their CPU twins at T = 1, 7, 33 (GQA 4:1 and 3:1, odd head counts), and
whole tiny Llama-style models on device='cuda' vs 'cpu': logits within 1e-5, greedy generation
token-identical, loss_and_grads gradients within 1e-5 of each tensor's largest.

Without a GPU these run under Numba's CUDA simulator (tests/conftest.py) with tiny tiles; with
NBFORMER_TEST_GPU=1 on a GPU machine the same tests run with the real defaults, plus the realistic
shapes of the tests marked skipif(SIMULATOR)."""
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

from numba import cuda  # noqa: E402

import reference as ref  # noqa: E402
import reference_backward as refb  # noqa: E402
from conftest import assert_close  # noqa: E402
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.errors import GraphError  # noqa: E402
from nbformer.kernels.cpu import attention as cpu_attn  # noqa: E402
from nbformer.kernels.cpu import attention_backward as cpu_attn_bwd  # noqa: E402
from nbformer.kernels.cpu import rmsnorm as cpu_rms  # noqa: E402
from nbformer.kernels.cpu import rope as cpu_rope  # noqa: E402
from nbformer.kernels.cpu import swiglu as cpu_glu  # noqa: E402
from nbformer.kernels.cuda import attention as gpu_attn  # noqa: E402
from nbformer.kernels.cuda import attention_backward as gpu_attn_bwd  # noqa: E402
from nbformer.kernels.cuda import rmsnorm as gpu_rms  # noqa: E402
from nbformer.kernels.cuda import rope as gpu_rope  # noqa: E402
from nbformer.kernels.cuda import swiglu as gpu_glu  # noqa: E402
from nbformer.kernels.cuda._jit import SIMULATOR  # noqa: E402
from nbformer.model import Model  # noqa: E402
from nbformer.weights import Checkpoint  # noqa: E402
from nbformer.weights.params import param_shapes  # noqa: E402
from nbformer.weights.positions import rope_inv_freq  # noqa: E402

from cuda_tiles import tiny_cuda_tiles  # noqa: E402,F401  (fixture)

SHAPES = [(1, 1), (2, 7), (1, 33)]  # (B, T)
gpu_only = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: GPU only (NBFORMER_TEST_GPU=1)")


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def up(a):
    return cuda.to_device(np.ascontiguousarray(a))


def nan_dev(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))


# ================================================================ RMSNorm
@pytest.mark.parametrize("B,T", SHAPES)
def test_rmsnorm_forward_backward(rng, B, T):
    C, eps = 40, 1e-6
    x, w, dout = f32(rng.normal(size=(B, T, C))), f32(1 + 0.3 * rng.normal(size=C)), f32(rng.normal(size=(B, T, C)))
    out, rstd = nan_dev((B, T, C)), nan_dev((B, T))
    gpu_rms.rmsnorm_forward(out, rstd, up(x), up(w), eps)
    got, got_rstd = out.copy_to_host(), rstd.copy_to_host()
    want, want_rstd = ref.rmsnorm(x, w, eps)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="rmsnorm out")
    assert_close(got_rstd, want_rstd, atol=0, rtol=1e-6, what="rmsnorm rstd")
    c_out, c_rstd = np.empty_like(x), np.empty((B, T), np.float32)
    cpu_rms.rmsnorm_forward(c_out, c_rstd, x, w, eps)
    assert_close(got, c_out, atol=1e-6, rtol=1e-6, what="rmsnorm out vs CPU")
    assert np.array_equal(got_rstd, c_rstd)  # float64 row sums rounded once: the CPU's bits

    dx, dw = nan_dev((B, T, C)), nan_dev(C)
    gpu_rms.rmsnorm_backward(dx, dw, up(dout), up(x), up(w), up(c_rstd))
    want_dx, want_dw = refb.rmsnorm_backward(dout, x, w, eps)
    assert_close(dx.copy_to_host(), want_dx, atol=1e-5, rtol=1e-5, what="rmsnorm dx")
    assert_close(dw.copy_to_host(), want_dw, atol=1e-5, rtol=1e-5, what="rmsnorm dw")
    c_dx, c_dw = np.empty_like(x), np.empty(C, np.float32)
    cpu_rms.rmsnorm_backward(c_dx, c_dw, dout, x, w, c_rstd)
    assert_close(dx.copy_to_host(), c_dx, atol=1e-6, rtol=1e-5, what="rmsnorm dx vs CPU")
    assert np.array_equal(dw.copy_to_host(), c_dw)  # fixed 64-row chunks in the CPU's order: its bits


def test_rmsnorm_in_place_multi_chunk_and_errors(rng):
    N, C = 130, 12  # three 64-row dw chunks over two lanes: the rounds and the tail chunk
    x, w, dout = f32(rng.normal(size=(N, C))), f32(1 + 0.3 * rng.normal(size=C)), f32(rng.normal(size=(N, C)))
    xd = up(x)
    rstd = nan_dev(N)
    gpu_rms.rmsnorm_forward(xd, rstd, xd, up(w), 1e-5, threads=4)  # out aliases x
    assert_close(xd.copy_to_host(), ref.rmsnorm(x, w, 1e-5)[0], atol=1e-5, rtol=1e-5, what="in place")
    dd, dw = up(dout), nan_dev(C)
    gpu_rms.rmsnorm_backward(dd, dw, dd, up(x), up(w), rstd, threads=4, cols=4, lanes=2)  # dx aliases dout
    want_dx, want_dw = refb.rmsnorm_backward(dout, x, w, 1e-5)
    assert_close(dd.copy_to_host(), want_dx, atol=1e-5, rtol=1e-5, what="dx in place")
    assert_close(dw.copy_to_host(), want_dw, atol=1e-5, rtol=1e-5, what="dw, 3 chunks")
    c_dx, c_dw = np.empty_like(x), np.empty(C, np.float32)
    cpu_rms.rmsnorm_backward(c_dx, c_dw, dout, x, w, rstd.copy_to_host())
    assert np.array_equal(dw.copy_to_host(), c_dw)
    with pytest.raises(GraphError, match="'w'"):
        gpu_rms.rmsnorm_forward(nan_dev((N, C)), nan_dev(N), up(x), up(w[:-1]), 1e-5)
    with pytest.raises(GraphError, match="'rstd'"):
        gpu_rms.rmsnorm_backward(nan_dev((N, C)), nan_dev(C), up(dout), up(x), up(w), nan_dev(N + 1))
    with pytest.raises(GraphError, match="'x'.*CUDA device array"):
        gpu_rms.rmsnorm_forward(nan_dev((N, C)), nan_dev(N), x, up(w), 1e-5)
    with pytest.raises(GraphError, match="unknown tunable"):
        gpu_rms.rmsnorm_backward(nan_dev((N, C)), nan_dev(C), up(dout), up(x), up(w), rstd, BM=4)


# ================================================================ RoPE
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("NH,NKV,HS", [(4, 1, 8), (3, 3, 6), (6, 2, 10)])
def test_rope_forward_backward(rng, B, T, NH, NKV, HS):
    W = (NH + 2 * NKV) * HS
    inv = rope_inv_freq(HS, 5e5)
    pos = rng.integers(0, 300, (B, T))
    qkv = f32(rng.normal(size=(B, T, W)))
    xd = up(qkv)
    gpu_rope.rope_forward(xd, up(pos.astype(np.int64)), inv, NH, NKV, HS, threads=32, max_blocks=3)
    x = xd.copy_to_host()
    assert_close(x, ref.rope_qkv(qkv, pos, inv, NH, NKV, HS), atol=1e-6, rtol=1e-6, what="rope")
    assert np.array_equal(x[..., (NH + NKV) * HS:], qkv[..., (NH + NKV) * HS:])  # V untouched
    c = qkv.copy()
    cpu_rope.rope_forward(c, pos, inv, NH, NKV, HS)
    assert np.array_equal(x, c)  # float64 angles and products rounded once, like the CPU
    d = f32(rng.normal(size=(B, T, W)))
    dd = up(d)
    gpu_rope.rope_backward(dd, pos, inv, NH, NKV, HS)  # host pos_ids are uploaded
    dx = dd.copy_to_host()
    assert_close(dx, refb.rope_backward(d, pos, inv, NH, NKV, HS), atol=1e-6, rtol=1e-6, what="rope backward")
    cd = d.copy()
    cpu_rope.rope_backward(cd, pos, inv, NH, NKV, HS)
    assert np.array_equal(dx, cd)


def test_rope_errors():
    q = nan_dev((1, 2, 24))
    pos = up(np.zeros((1, 2), np.int64))
    inv = rope_inv_freq(8, 1e4)
    with pytest.raises(GraphError, match="even head_size"):
        gpu_rope.rope_forward(q, pos, inv, 1, 1, 7)
    with pytest.raises(GraphError, match="cannot hold"):
        gpu_rope.rope_forward(q, pos, inv, 2, 2, 8)
    with pytest.raises(GraphError, match="'pos_ids'"):
        gpu_rope.rope_forward(q, up(np.zeros((1, 3), np.int64)), inv, 1, 1, 8)
    with pytest.raises(GraphError, match="'inv_freq'"):
        gpu_rope.rope_forward(q, pos, inv[:-1], 1, 1, 8)


# ================================================================ gated FFN
GLU_CASES = [(B, T, F, act, bias) for (B, T) in SHAPES for F, act, bias in ((24, "silu", False), (20, "silu", True))]
GLU_CASES += [(2, 7, 12, "gelu_tanh", False), (1, 33, 12, "relu", True), (1, 1, 12, "gelu", False),
              (2, 7, 12, "none", True)]


@pytest.mark.parametrize("B,T,F,act,bias", GLU_CASES)
def test_swiglu_linear_forward_backward(rng, B, T, F, act, bias):
    K = 20  # T = 33 takes the tiled GEMM, T <= 7 the few-row path
    x, w = f32(rng.normal(size=(B, T, K))), f32(rng.normal(size=(2 * F, K)) / math.sqrt(K))
    b = f32(rng.normal(size=2 * F)) if bias else None
    xd, wd, bd = up(x), up(w), (up(b) if bias else None)
    want = ref.linear_glu(x, w, b, act)
    out = nan_dev((B, T, F))
    gpu_glu.swiglu_linear_forward(out, xd, wd, bd, act)
    got = out.copy_to_host()
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="swiglu_linear_forward")
    c_out = np.empty((B, T, F), np.float32)
    cpu_glu.swiglu_linear_forward(c_out, x, w, b, act)
    assert_close(got, c_out, atol=1e-5, rtol=1e-5, what="swiglu_linear_forward vs CPU")
    out2, pre = nan_dev((B, T, F)), nan_dev((B, T, 2 * F))
    gpu_glu.swiglu_linear_forward_train(out2, pre, xd, wd, bd, act)
    assert np.array_equal(out2.copy_to_host(), got)
    assert_close(pre.copy_to_host(), ref.linear(x, w, b), atol=1e-5, rtol=1e-5, what="pre")
    out3 = nan_dev((B, T, F))
    gpu_glu.swiglu_forward(out3, pre, act)
    assert np.array_equal(out3.copy_to_host(), got)
    dout = f32(rng.normal(size=(B, T, F)))
    dpre = nan_dev((B, T, 2 * F))
    gpu_glu.swiglu_backward(dpre, up(dout), pre, act)
    pre_h = pre.copy_to_host()
    assert_close(dpre.copy_to_host(), refb.glu_backward(dout, pre_h, act), atol=1e-5, rtol=1e-5, what="dpre")
    c_dpre = np.empty((B, T, 2 * F), np.float32)
    cpu_glu.swiglu_backward(c_dpre, dout, pre_h, act)
    assert_close(dpre.copy_to_host(), c_dpre, atol=1e-6, rtol=1e-5, what="dpre vs CPU")


def test_swiglu_errors():
    x, w = nan_dev((2, 4)), nan_dev((6, 4))
    with pytest.raises(GraphError, match="'w'"):
        gpu_glu.swiglu_linear_forward(nan_dev((2, 3)), x, nan_dev((5, 4)))
    with pytest.raises(GraphError, match="'out'"):
        gpu_glu.swiglu_linear_forward(nan_dev((2, 4)), x, w)
    with pytest.raises(GraphError, match="'pre'"):
        gpu_glu.swiglu_linear_forward_train(nan_dev((2, 3)), nan_dev((2, 5)), x, w)
    with pytest.raises(GraphError, match="'act'"):
        gpu_glu.swiglu_backward(nan_dev((2, 6)), nan_dev((2, 3)), nan_dev((2, 6)), "tanh")
    with pytest.raises(GraphError, match="unknown tunable"):
        gpu_glu.swiglu_linear_forward(nan_dev((2, 3)), x, w, BQ=3)


# ================================================================ grouped-query attention
def _gqa_case(rng, B, T, NH, NKV, HS):
    qkv = f32(rng.normal(size=(B, T, (NH + 2 * NKV) * HS)))
    mask = np.ones((B, T), np.uint8)
    if B > 1:
        mask[-1, max(1, T - 3):] = 0  # right padding
    return qkv, mask


GQA = [(4, 1, 8), (3, 1, 6), (6, 2, 4)]  # 4:1, 3:1 (odd heads), 3:1 (no grouping: tests/test_cuda_attention*.py)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("NH,NKV,HS", GQA)
def test_gqa_attention_forward_backward(rng, B, T, NH, NKV, HS):
    A, KV = NH * HS, NKV * HS
    scale = 1.0 / math.sqrt(HS)
    qkv, mask = _gqa_case(rng, B, T, NH, NKV, HS)
    q = ref.split_heads(qkv[..., :A], NH)
    k = ref.split_heads(qkv[..., A:A + KV], NKV)
    v = ref.split_heads(qkv[..., A + KV:], NKV)
    want, want_lse = ref.attention_gqa(q, k, v, mask, causal=True, scale=scale)
    tiles = dict(block_q=4, block_k=4, threads=4)
    qd, md = up(qkv), up(mask)
    out, lse = nan_dev((B, T, A)), nan_dev((B, NH, T))
    gpu_attn.attention_forward(out, lse, qd, 0, qd, A, A + KV, md, NH, HS, True, scale, n_kv_heads=NKV, **tiles)
    out_h, lse_h = out.copy_to_host(), lse.copy_to_host()
    assert_close(out_h, ref.merge_heads(want), atol=1e-5, rtol=1e-5, what="gqa out")
    assert_close(lse_h, want_lse, atol=1e-5, rtol=1e-5, what="gqa lse")
    c_out, c_lse = np.empty((B, T, A), np.float32), np.empty((B, NH, T), np.float32)
    cpu_attn.attention_forward(c_out, c_lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, True, scale, n_kv_heads=NKV)
    assert_close(out_h, c_out, atol=1e-5, rtol=1e-5, what="gqa out vs CPU")
    assert_close(lse_h, c_lse, atol=1e-5, rtol=1e-5, what="gqa lse vs CPU")

    dout = f32(rng.normal(size=(B, T, A)))
    dq, dk, dv = refb.attention_gqa_backward(q, k, v, ref.split_heads(dout, NH), mask, True, scale)
    results = []
    for _ in range(2):
        dqkv, delta = nan_dev(qkv.shape), nan_dev((B, NH, T))
        gpu_attn_bwd.attention_backward(dqkv, dqkv, delta, up(dout), out, lse, qd, 0, qd, A, A + KV, md, NH, HS,
                                        True, scale, n_kv_heads=NKV, block_q=4, block_k=4, threads=4)
        results.append(dqkv.copy_to_host())
    assert np.array_equal(results[0], results[1])  # deterministic: fixed order over the group
    g = results[0]
    assert_close(g[..., :A], ref.merge_heads(dq), atol=1e-5, rtol=1e-5, what="gqa dq")
    assert_close(g[..., A:A + KV], ref.merge_heads(dk), atol=1e-5, rtol=1e-5, what="gqa dk")
    assert_close(g[..., A + KV:], ref.merge_heads(dv), atol=1e-5, rtol=1e-5, what="gqa dv")
    c = np.full_like(qkv, np.nan)
    cpu_attn_bwd.attention_backward(c, c, np.empty((B, NH, T), np.float32), dout, c_out, c_lse, qkv, 0, qkv, A,
                                    A + KV, mask, NH, HS, True, scale, n_kv_heads=NKV)
    assert_close(g, c, atol=1e-5, rtol=1e-5, what="gqa gradients vs CPU")


def test_gqa_attention_over_a_cache_prefix(rng):
    """Decoding: one new query per row against the first L rows of a (B, Tmax, 2*NKV*HS) cache."""
    B, NH, NKV, HS, Tmax, L = 2, 6, 2, 8, 20, 13
    KV = NKV * HS
    cache = f32(rng.normal(size=(B, Tmax, 2 * KV)))
    q = f32(rng.normal(size=(B, 1, NH * HS)))
    mask = np.ones((B, Tmax), np.uint8)
    mask[0, :4] = 0  # a left-padded row
    out, lse = nan_dev((B, 1, NH * HS)), nan_dev((B, NH, 1))
    gpu_attn.attention_forward(out, lse, up(q), 0, up(cache), 0, KV, up(mask), NH, HS, True, 0.3, key_len=L,
                               n_kv_heads=NKV, block_q=4, block_k=4, threads=4)
    want, want_lse = ref.attention_gqa(ref.split_heads(q, NH), ref.split_heads(cache[:, :L, :KV], NKV),
                                       ref.split_heads(cache[:, :L, KV:], NKV), mask[:, :L], True, 0.3)
    assert_close(out.copy_to_host(), ref.merge_heads(want), atol=1e-5, rtol=1e-5)
    assert_close(lse.copy_to_host(), want_lse, atol=1e-5, rtol=1e-5)


def test_gqa_errors():
    NH, NKV, HS, T = 4, 2, 4, 3
    A, KV = NH * HS, NKV * HS
    qkv = nan_dev((1, T, A + 2 * KV))
    m = up(np.ones((1, T), np.uint8))
    with pytest.raises(GraphError, match="n_kv_heads = 3"):
        gpu_attn.attention_forward(nan_dev((1, T, A)), nan_dev((1, NH, T)), qkv, 0, qkv, A, A + KV, m, NH, HS,
                                   True, 0.5, n_kv_heads=3)
    with pytest.raises(GraphError, match="v_off"):  # the values' NKV*HS columns past the end
        gpu_attn.attention_forward(nan_dev((1, T, A)), nan_dev((1, NH, T)), qkv, 0, qkv, A, A + KV + 1, m, NH,
                                   HS, True, 0.5, n_kv_heads=NKV)
    args = (nan_dev((1, T, A)), nan_dev((1, T, A)), nan_dev((1, NH, T)), qkv, 0, qkv)
    with pytest.raises(GraphError, match="n_kv_heads = 3"):
        gpu_attn_bwd.attention_backward(nan_dev(qkv.shape), nan_dev(qkv.shape), nan_dev((1, NH, T)), *args, A,
                                        A + KV, m, NH, HS, True, 0.5, n_kv_heads=3)
    d = nan_dev(qkv.shape)
    with pytest.raises(GraphError, match="overlap"):  # k and v ranges of NKV*HS columns overlap
        gpu_attn_bwd.attention_backward(d, d, nan_dev((1, NH, T)), *args, A, A + KV - 1, m, NH, HS, True, 0.5,
                                        n_kv_heads=NKV)


@gpu_only
def test_gqa_realistic_shapes(rng):
    B, T, NH, NKV, HS = 2, 512, 32, 8, 128
    A, KV = NH * HS, NKV * HS
    scale = 1.0 / math.sqrt(HS)
    qkv, mask = _gqa_case(rng, B, T, NH, NKV, HS)
    qd, md = up(qkv), up(mask)
    out, lse = nan_dev((B, T, A)), nan_dev((B, NH, T))
    gpu_attn.attention_forward(out, lse, qd, 0, qd, A, A + KV, md, NH, HS, True, scale, n_kv_heads=NKV)
    c_out, c_lse = np.empty((B, T, A), np.float32), np.empty((B, NH, T), np.float32)
    cpu_attn.attention_forward(c_out, c_lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, True, scale, n_kv_heads=NKV)
    assert_close(out.copy_to_host(), c_out, atol=2e-5, rtol=1e-4, what="gqa out vs CPU")
    dout = f32(rng.normal(size=(B, T, A)))
    dqkv = nan_dev(qkv.shape)
    gpu_attn_bwd.attention_backward(dqkv, dqkv, nan_dev((B, NH, T)), up(dout), out, lse, qd, 0, qd, A, A + KV, md,
                                    NH, HS, True, scale, n_kv_heads=NKV)
    c = np.full_like(qkv, np.nan)
    cpu_attn_bwd.attention_backward(c, c, np.empty((B, NH, T), np.float32), dout, c_out, c_lse, qkv, 0, qkv, A,
                                    A + KV, mask, NH, HS, True, scale, n_kv_heads=NKV)
    g = dqkv.copy_to_host()
    err = np.abs(g - c).max() / np.abs(c).max()
    assert err <= 1e-4, err


@gpu_only
def test_llama_kernels_realistic_shapes(rng):
    N, C, F = 1024, 2048, 5632
    x, w = f32(rng.normal(size=(N, C))), f32(1 + 0.1 * rng.normal(size=C))
    out, rstd = nan_dev((N, C)), nan_dev(N)
    gpu_rms.rmsnorm_forward(out, rstd, up(x), up(w), 1e-5)
    assert_close(out.copy_to_host(), ref.rmsnorm(x, w, 1e-5)[0], atol=1e-5, rtol=1e-5)
    dout = f32(rng.normal(size=(N, C)))
    dx, dw = nan_dev((N, C)), nan_dev(C)
    gpu_rms.rmsnorm_backward(dx, dw, up(dout), up(x), up(w), rstd)
    c_dx, c_dw = np.empty_like(x), np.empty(C, np.float32)
    cpu_rms.rmsnorm_backward(c_dx, c_dw, dout, x, w, rstd.copy_to_host())
    assert np.array_equal(dw.copy_to_host(), c_dw)
    assert_close(dx.copy_to_host(), c_dx, atol=1e-5, rtol=1e-5)
    xs = f32(rng.normal(size=(256, C)) * 0.5)
    wg = f32(rng.normal(size=(2 * F, C)) / math.sqrt(C))
    o = nan_dev((256, F))
    gpu_glu.swiglu_linear_forward(o, up(xs), up(wg))
    c_o = np.empty((256, F), np.float32)
    cpu_glu.swiglu_linear_forward(c_o, xs, wg)
    assert_close(o.copy_to_host(), c_o, atol=1e-4, rtol=1e-4)


# ================================================================ whole tiny Llama models
def llama_cfg(n_heads, n_kv_heads, d_model, head_dim=None, tie=False):
    return ModelConfig(arch="decoder", vocab_size=41, d_model=d_model, n_heads=n_heads, n_layers=2, d_ff=20,
                       max_positions=48, norm="pre", positions="rope", norm_type="rmsnorm", ffn_type="glu",
                       activation="silu", n_kv_heads=n_kv_heads, head_dim=head_dim, qkv_bias=False,
                       attn_out_bias=False, ffn_bias=False, final_layernorm=True, tie_word_embeddings=tie,
                       rope_theta=1e4, layer_norm_eps=1e-6, family="llama")


LLAMAS = {"gqa4": llama_cfg(4, 1, 16),  # GQA 4:1, untied head
          "gqa3-odd-headdim-tied": llama_cfg(3, 1, 15, head_dim=4, tie=True)}  # 3 heads, head_dim != d_model / NH


def _random_ckpt(cfg, seed=0):
    from nbformer.weights.mapping import Rule

    rng = np.random.default_rng(seed)
    params = {}
    for k, shape in param_shapes(cfg).items():
        if k.endswith(".w") and len(shape) == 1:  # RMSNorm gains near 1
            params[k] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            params[k] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return Checkpoint(cfg, params, [Rule(k, (k,)) for k in params], Path("tiny-llama"))


@pytest.fixture(scope="module", params=list(LLAMAS))
def pair(request):
    ckpt = _random_ckpt(LLAMAS[request.param], seed=len(request.param))
    return Model(ckpt, device="cpu"), Model(ckpt, device="cuda")


def _close(a, b, atol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= atol, f"{what}: CUDA vs CPU max |diff| {err:.3e} > {atol}"


@pytest.mark.usefixtures("tiny_cuda_tiles")
def test_llama_logits_match_cpu(pair):
    cpu, gpu = pair
    V = cpu.config.vocab_size
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0  # left padding
    want = cpu.forward(ids, mask)
    assert np.abs(want).max() > 0.1
    _close(gpu.forward(ids, mask), want, 1e-5, "Llama logits")
    one = rng.integers(0, V, (1, 1))
    _close(gpu.forward(one), cpu.forward(one), 1e-5, "Llama logits, T = 1")


@pytest.mark.usefixtures("tiny_cuda_tiles")
@pytest.mark.parametrize("pair", ["gqa3-odd-headdim-tied"], indirect=True)  # the slowest test: one config
def test_llama_greedy_generation_matches_cpu(pair):
    cpu, gpu = pair
    rng = np.random.default_rng(3)
    ids = rng.integers(1, cpu.config.vocab_size, (2, 4))
    mask = np.ones((2, 4), np.int64)
    mask[1, :2] = 0  # left padding: prefill, then KV-cache decoding steps of one token per row
    kw = dict(max_new_tokens=4, attention_mask=mask, stop_at_eos=False, pad_token_id=0)
    np.testing.assert_array_equal(gpu.generate(ids, **kw), cpu.generate(ids, **kw), err_msg="greedy generation")


@pytest.mark.usefixtures("tiny_cuda_tiles")
def test_llama_loss_and_grads_match_cpu(pair):
    cpu, gpu = pair
    rng = np.random.default_rng(2)
    B, T = 2, 7
    ids = rng.integers(0, cpu.config.vocab_size, (B, T))
    labels = ids.copy()
    mask = np.ones((B, T), np.int64)
    mask[-1, 5:] = 0
    labels[-1, 5:] = -100
    lc, gc = cpu.loss_and_grads(ids, labels, attention_mask=mask)
    lg, gg = gpu.loss_and_grads(ids, labels, attention_mask=mask)
    assert abs(lg - lc) <= 1e-5
    assert set(gg) == set(gc)
    for n, want in gc.items():
        scale = max(np.abs(want).max(), 1e-7)
        err = np.abs(np.asarray(gg[n], np.float64) - want).max() / scale
        assert err <= 1e-5, f"{n}: CUDA vs CPU gradient error {err:.2e} of its largest element"
