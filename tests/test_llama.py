"""The Llama family (issue 12) on the CPU: RMSNorm, RoPE, SwiGLU and grouped-query attention kernels
vs their float64 references (forward and backward, T = 1, 7, 33), and random-init transformers
LlamaForCausalLM models (the oracle) vs nbformer: logits, gradients, KV-cache greedy and beam
search, fine-tuning from the CLI, config / loader errors."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbformer  # noqa: E402
import reference as ref  # noqa: E402
import reference_backward as refb  # noqa: E402
from conftest import assert_close  # noqa: E402
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.errors import ConfigError  # noqa: E402
from nbformer.kernels.cpu.attention import attention_forward  # noqa: E402
from nbformer.kernels.cpu.attention_backward import attention_backward  # noqa: E402
from nbformer.kernels.cpu.linear import linear_backward  # noqa: E402
from nbformer.kernels.cpu.rmsnorm import rmsnorm_backward, rmsnorm_forward  # noqa: E402
from nbformer.kernels.cpu.rope import rope_backward, rope_forward  # noqa: E402
from nbformer.kernels.cpu.swiglu import (swiglu_backward, swiglu_forward, swiglu_linear_forward,  # noqa: E402
                                         swiglu_linear_forward_train)
from nbformer.weights.positions import rope_inv_freq  # noqa: E402

torch.set_num_threads(2)

SHAPES = [(1, 1), (2, 7), (1, 33)]  # (B, T)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def rel_check(got, want, name, tol=1e-4):
    scale = max(np.abs(want).max(), 1e-7)
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{name}: max error {err:.2e} relative to the largest gradient (tol {tol})"
    return err


# ================================================================ kernels vs float64 references
@pytest.mark.parametrize("B,T", SHAPES)
def test_rmsnorm_forward_backward(rng, B, T):
    C, eps = 40, 1e-6
    x, w, dout = f32(rng.normal(size=(B, T, C))), f32(1 + 0.3 * rng.normal(size=C)), f32(rng.normal(size=(B, T, C)))
    out, rstd = np.empty_like(x), np.empty((B, T), np.float32)
    rmsnorm_forward(out, rstd, x, w, eps)
    want, want_rstd = ref.rmsnorm(x, w, eps)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="rmsnorm out")
    assert_close(rstd, want_rstd, atol=0, rtol=1e-6, what="rmsnorm rstd")
    dx, dw = np.full_like(x, np.nan), np.full(C, np.nan, np.float32)
    rmsnorm_backward(dx, dw, dout, x, w, rstd)
    want_dx, want_dw = refb.rmsnorm_backward(dout, x, w, eps)
    assert_close(dx, want_dx, atol=1e-5, rtol=1e-5, what="rmsnorm dx")
    assert_close(dw, want_dw, atol=1e-5, rtol=1e-5, what="rmsnorm dw")


def test_rmsnorm_reference_backward_is_the_gradient(rng):
    x, w, dout = rng.normal(size=(2, 5)), 1 + 0.3 * rng.normal(size=5), rng.normal(size=(2, 5))
    dx, dw = refb.rmsnorm_backward(dout, x, w, 1e-6)
    assert_close(dx, refb.numerical_grad(lambda: (ref.rmsnorm(x, w, 1e-6)[0] * dout).sum(), x), atol=1e-7, rtol=1e-6)
    assert_close(dw, refb.numerical_grad(lambda: (ref.rmsnorm(x, w, 1e-6)[0] * dout).sum(), w), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("NH,NKV,HS", [(4, 1, 8), (3, 3, 6), (6, 2, 10)])
def test_rope_forward_backward(rng, B, T, NH, NKV, HS):
    W = (NH + 2 * NKV) * HS
    inv = rope_inv_freq(HS, 5e5)
    pos = rng.integers(0, 300, (B, T))
    qkv = f32(rng.normal(size=(B, T, W)))
    x = qkv.copy()
    rope_forward(x, pos, inv, NH, NKV, HS)
    assert_close(x, ref.rope_qkv(qkv, pos, inv, NH, NKV, HS), atol=1e-6, rtol=1e-6, what="rope")
    assert np.array_equal(x[..., (NH + NKV) * HS:], qkv[..., (NH + NKV) * HS:])  # V untouched
    d = f32(rng.normal(size=(B, T, W)))
    dx = d.copy()
    rope_backward(dx, pos, inv, NH, NKV, HS)
    assert_close(dx, refb.rope_backward(d, pos, inv, NH, NKV, HS), atol=1e-6, rtol=1e-6, what="rope backward")
    # adjoint: <rope(a), b> = <a, rope^T(b)>, and backward undoes forward
    assert abs(np.vdot(x.astype(np.float64), d) - np.vdot(qkv.astype(np.float64), dx)) < 1e-4 * qkv.size
    rope_backward(x, pos, inv, NH, NKV, HS)
    assert_close(x, qkv, atol=1e-5, rtol=1e-5, what="rope^-1 rope")


@pytest.mark.parametrize("rows", [1, 3, 9, 70])
def test_small_work_runs_serial_with_the_same_bits(rng, monkeypatch, rows):
    """rmsnorm / rope / kv_write run on the calling thread below a size threshold (a decode step):
    the same row code as the parallel kernel, so the same bits on either side of the threshold."""
    import nbformer.kernels.cpu.kv_cache as kvc
    import nbformer.kernels.cpu.rmsnorm as rn
    import nbformer.kernels.cpu.rope as rp

    C, NH, NKV, HS = 48, 4, 2, 12
    W = (NH + 2 * NKV) * HS
    x, w = f32(rng.normal(size=(rows, C))), f32(1 + 0.3 * rng.normal(size=C))
    qkv = f32(rng.normal(size=(1, rows, W)))
    pos = rng.integers(0, 300, (1, rows))
    inv = rope_inv_freq(HS, 1e4)
    results = []
    for serial in (True, False):
        big = 1 << 40
        monkeypatch.setattr(rn, "SERIAL_MAX_ELEMENTS", big if serial else -1)
        monkeypatch.setattr(rp, "SERIAL_MAX_ROWS", big if serial else -1)
        monkeypatch.setattr(kvc, "SERIAL_MAX_FLOATS", big if serial else -1)
        out, rstd = np.full_like(x, np.nan), np.full(rows, np.nan, np.float32)
        rmsnorm_forward(out, rstd, x, w, 1e-5)
        q = qkv.copy()
        rope_forward(q, pos, inv, NH, NKV, HS)
        cache = np.full((1, rows + 2, 2 * NKV * HS), np.nan, np.float32)
        kvc.kv_write(cache, q, (NH) * HS, 1)
        results.append((out, rstd, q, cache))
    for a, b in zip(*results):
        assert np.array_equal(a, b, equal_nan=True)
    want, _ = ref.rmsnorm(x, w, 1e-5)
    assert_close(results[0][0], want, atol=1e-5, rtol=1e-5, what="serial rmsnorm")
    assert_close(results[0][2], ref.rope_qkv(qkv, pos, inv, NH, NKV, HS), atol=1e-6, rtol=1e-6, what="serial rope")
    assert np.array_equal(results[0][3][0, 1:rows + 1], results[0][2][0, :, NH * HS:])


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for params in ({"rope_type": "linear", "factor": 3.0}, {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}):
        c = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={"rope_theta": 5e5,
                                                                                                **params})
        want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](c)
        kw = {k: params[k] for k in ("factor",)}
        got = rope_inv_freq(32, 5e5, params["rope_type"], kw["factor"], params.get("low_freq_factor", 1.0),
                            params.get("high_freq_factor", 4.0), params.get("original_max_position_embeddings", 0))
        oracle = ref.rope_inv_freq(32, 5e5, params["rope_type"], kw["factor"], params.get("low_freq_factor", 1.0),
                                   params.get("high_freq_factor", 4.0),
                                   params.get("original_max_position_embeddings", 0))
        assert_close(got, oracle, atol=0, rtol=1e-12)
        assert_close(got, want.numpy(), atol=0, rtol=1e-6, what=params["rope_type"])


@pytest.mark.parametrize("B,T", SHAPES + [(3, 100), (2, 520)])  # 300, 1040 rows: 2 / 4 row blocks by shape
@pytest.mark.parametrize("F,act,bias", [(24, "silu", False), (160, "silu", True), (160, "gelu_tanh", False)])
def test_swiglu_linear_forward_backward(rng, B, T, F, act, bias):
    K = 32  # F = 160: 2F > the column block, so few rows take the column-split (decoding) path
    x, w = f32(rng.normal(size=(B, T, K))), f32(rng.normal(size=(2 * F, K)) / math.sqrt(K))
    b = f32(rng.normal(size=2 * F)) if bias else None
    want = ref.linear_glu(x, w, b, act)
    out = np.full((B, T, F), np.nan, np.float32)
    swiglu_linear_forward(out, x, w, b, act)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="swiglu_linear_forward")
    out2, pre = np.full_like(out, np.nan), np.full((B, T, 2 * F), np.nan, np.float32)
    swiglu_linear_forward_train(out2, pre, x, w, b, act)
    assert np.array_equal(out, out2)
    assert_close(pre, ref.linear(x, w, b), atol=1e-5, rtol=1e-5, what="pre")
    out3 = np.full_like(out, np.nan)
    swiglu_forward(out3, pre, act)
    assert_close(out3, want, atol=1e-5, rtol=1e-5, what="swiglu_forward")
    dout = f32(rng.normal(size=(B, T, F)))
    dpre = np.full_like(pre, np.nan)
    swiglu_backward(dpre, dout, pre, act)
    assert_close(dpre, refb.glu_backward(dout, pre, act), atol=1e-5, rtol=1e-5, what="dpre")
    # the whole layer: dpre through the plain linear backward of the fused weight
    dx, dw = np.empty_like(x), np.empty_like(w)
    db = np.empty(2 * F, np.float32) if bias else None
    linear_backward(dx, dw, db, dpre, x, w)
    g = refb.glu_backward(dout, ref.linear(x, w, b), act)
    assert_close(dx, g @ ref.f64(w), atol=1e-4, rtol=1e-4, what="dx")
    assert_close(dw, g.reshape(-1, 2 * F).T @ ref.f64(x).reshape(-1, K), atol=1e-4, rtol=1e-4, what="dw")
    if bias:
        assert_close(db, g.reshape(-1, 2 * F).sum(0), atol=1e-4, rtol=1e-4, what="db")


def test_glu_reference_backward_is_the_gradient(rng):
    pre, dout = rng.normal(size=(3, 8)), rng.normal(size=(3, 4))
    for act in ("silu", "gelu_tanh"):
        want = refb.numerical_grad(lambda: (ref.glu(pre, act) * dout).sum(), pre)
        assert_close(refb.glu_backward(dout, pre, act), want, atol=1e-7, rtol=1e-6)


def _gqa_case(rng, B, T, NH, NKV, HS):
    W = (NH + 2 * NKV) * HS
    qkv = f32(rng.normal(size=(B, T, W)))
    mask = np.ones((B, T), np.uint8)
    if B > 1:
        mask[-1, max(1, T - 3):] = 0  # right padding
    return qkv, mask


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("NH,NKV", [(4, 1), (6, 2), (3, 1)])
def test_gqa_attention_forward_backward(rng, B, T, NH, NKV):
    HS = 8
    A, KV = NH * HS, NKV * HS
    scale = 1.0 / math.sqrt(HS)
    qkv, mask = _gqa_case(rng, B, T, NH, NKV, HS)
    q = ref.split_heads(qkv[..., :A], NH)
    k = ref.split_heads(qkv[..., A:A + KV], NKV)
    v = ref.split_heads(qkv[..., A + KV:], NKV)
    want, want_lse = ref.attention_gqa(q, k, v, mask, causal=True, scale=scale)
    out, lse = np.full((B, T, A), np.nan, np.float32), np.full((B, NH, T), np.nan, np.float32)
    attention_forward(out, lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, True, scale, block_q=4, block_k=8,
                      n_kv_heads=NKV)
    assert_close(out, ref.merge_heads(want), atol=1e-5, rtol=1e-5, what="gqa out")
    assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, what="gqa lse")
    dout = f32(rng.normal(size=(B, T, A)))
    dq, dk, dv = refb.attention_gqa_backward(q, k, v, ref.split_heads(dout, NH), mask, True, scale)
    results = []
    for _ in range(2):
        dqkv = np.full_like(qkv, np.nan)
        delta = np.empty((B, NH, T), np.float32)
        attention_backward(dqkv, dqkv, delta, dout, out, lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, True, scale,
                           block_q=4, block_k=8, n_kv_heads=NKV)
        results.append(dqkv)
    assert np.array_equal(results[0], results[1])  # deterministic: fixed summation order over the group
    dqkv = results[0]
    assert_close(dqkv[..., :A], ref.merge_heads(dq), atol=1e-5, rtol=1e-5, what="gqa dq")
    assert_close(dqkv[..., A:A + KV], ref.merge_heads(dk), atol=1e-5, rtol=1e-5, what="gqa dk")
    assert_close(dqkv[..., A + KV:], ref.merge_heads(dv), atol=1e-5, rtol=1e-5, what="gqa dv")


def test_gqa_attention_over_a_cache_prefix(rng):
    """Decoding: one new query per row against the first L rows of a (B, Tmax, 2*NKV*HS) cache."""
    B, NH, NKV, HS, Tmax, L = 2, 6, 2, 8, 40, 13
    KV = NKV * HS
    cache = f32(rng.normal(size=(B, Tmax, 2 * KV)))
    q = f32(rng.normal(size=(B, 1, NH * HS)))
    mask = np.ones((B, Tmax), np.uint8)
    mask[0, :4] = 0  # a left-padded row
    out, lse = np.empty((B, 1, NH * HS), np.float32), np.empty((B, NH, 1), np.float32)
    attention_forward(out, lse, q, 0, cache, 0, KV, mask, NH, HS, True, 0.3, key_len=L, n_kv_heads=NKV)
    want, want_lse = ref.attention_gqa(ref.split_heads(q, NH), ref.split_heads(cache[:, :L, :KV], NKV),
                                       ref.split_heads(cache[:, :L, KV:], NKV), mask[:, :L], True, 0.3)
    assert_close(out, ref.merge_heads(want), atol=1e-5, rtol=1e-5)
    assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


# ================================================================ whole models vs transformers
COMMON = dict(max_position_embeddings=64, bos_token_id=None, eos_token_id=None, initializer_range=0.1,
              num_hidden_layers=2)
LLAMA_CONFIGS = {
    # GQA 4:1, untied head, rope_theta 5e5
    "gqa4-untied": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                        num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                        tie_word_embeddings=False),
    # odd head count (3, one kv head: GQA 3:1), tied embeddings
    "gqa3-tied-3heads": dict(vocab_size=89, hidden_size=48, intermediate_size=64, num_attention_heads=3,
                             num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 2e4},
                             tie_word_embeddings=True),
    # GQA 3:1 with head_dim != hidden / heads, attention and MLP biases, Llama 3.1 rope scaling
    "headdim-bias-llama3": dict(vocab_size=71, hidden_size=48, intermediate_size=40, num_attention_heads=6,
                                num_key_value_heads=2, head_dim=12, attention_bias=True, mlp_bias=True,
                                tie_word_embeddings=False,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module", params=list(LLAMA_CONFIGS))
def llama(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, **LLAMA_CONFIGS[request.param]))
    if request.param == "headdim-bias-llama3":  # biases are initialised to 0: make them matter
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    hf.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, safe_serialization=True)
    return hf, nbformer.load(d)


def _right_padded(rng, V, B, T):
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), np.int64)
    for b, n in enumerate(np.linspace(T, 1, B).astype(int)):
        mask[b, n:] = 0
    return ids, mask


def left_padded(rng, V, lengths, pad=0):
    T = max(lengths)
    ids = np.full((len(lengths), T), pad, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(1, V, n)
        mask[b, T - n:] = 1
    return ids, mask


def test_config_is_read(llama):
    hf, nb = llama
    c, h = nb.config, hf.config
    assert (c.family, c.norm_type, c.positions, c.ffn_type, c.activation) == ("llama", "rmsnorm", "rope", "glu", "silu")
    assert c.kv_heads == h.num_key_value_heads and c.head_size == h.head_dim
    assert c.tie_word_embeddings == h.tie_word_embeddings and c.layer_norm_eps == h.rms_norm_eps
    assert c.rope_theta == h.rope_parameters["rope_theta"]


@pytest.mark.parametrize("B,T", SHAPES + [(3, 33)])
def test_logits_match_transformers(llama, rng, B, T):
    hf, nb = llama
    ids, mask = _right_padded(rng, hf.config.vocab_size, B, T)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = nb.forward(ids, attention_mask=mask)
    real = mask.astype(bool)
    assert np.abs(want[real]).max() > 0.1  # a model whose logits are not all ~0
    assert_close(got[real], want[real], atol=1e-4, rtol=0, what="logits vs transformers")
    want64 = ref.llama_forward(nb.config, nb.ckpt.params, ids, mask)
    assert_close(got[real], want64[real], atol=2e-5, rtol=2e-5, what="logits vs float64 reference")


def test_left_padding_counts_real_tokens(llama, rng):
    hf, nb = llama
    ids, mask = left_padded(rng, hf.config.vocab_size, [7, 3, 5])
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1  # transformers' generate convention
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(pos)).logits.numpy()
    got = nb.forward(ids, attention_mask=mask, position_ids=pos)
    real = mask.astype(bool)
    assert_close(got[real], want[real], atol=1e-4, rtol=0, what="left-padded logits")
    alone = nb.forward(ids[1:2, -3:])  # the 3-token row on its own: same logits
    assert_close(got[1, -3:], alone[0], atol=1e-5, rtol=1e-5)


def test_gradients_match_torch(llama, rng):
    hf, nb = llama
    B, T = 3, 9
    ids = rng.integers(0, hf.config.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    labels = ids.copy()
    mask[-1, 5:] = 0
    labels[-1, 5:] = -100
    loss, grads = nb.loss_and_grads(ids, labels, attention_mask=mask)
    hf.zero_grad()
    out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    want = {n: p.grad.numpy().copy() for n, p in hf.named_parameters()}
    assert set(grads) == set(want)  # keyed by HF names; q/k/v and gate/up split back
    worst = max(rel_check(grads[n], g, n) for n, g in want.items())
    assert worst <= 1e-4


def test_greedy_generation_matches_transformers(llama, rng):
    hf, nb = llama
    V = hf.config.vocab_size
    p = rng.integers(1, V, (1, 5))
    got = nb.generate(p, max_new_tokens=16, stop_at_eos=False)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(p), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0).numpy()
    assert np.array_equal(got, want)
    assert len(set(got[0, 5:].tolist())) >= 2  # the model does not just repeat one token
    ids, mask = left_padded(rng, V, [6, 2, 4])
    got = nb.generate(ids, max_new_tokens=12, attention_mask=mask, stop_at_eos=False, pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=12,
                           min_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
    assert np.array_equal(got, want)
    assert np.array_equal(got, nb.generate(ids, max_new_tokens=12, attention_mask=mask, stop_at_eos=False,
                                           pad_token_id=0, cache=False))


def test_beam_search_matches_transformers(llama, rng):
    hf, nb = llama
    ids, mask = left_padded(rng, hf.config.vocab_size, [5, 3])
    kw = dict(num_beams=3, num_return_sequences=2, length_penalty=0.8)
    got, scores = nb.generate(ids, max_new_tokens=10, attention_mask=mask, return_scores=True, pad_token_id=0,
                              stop_at_eos=False, **kw)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=10,
                          min_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True, **kw)
    assert np.array_equal(got, out.sequences.numpy())
    np.testing.assert_allclose(scores, out.sequences_scores.numpy(), atol=1e-4, rtol=1e-4)


def test_kv_cache_holds_the_kv_heads_only(llama):
    from nbformer.kv_cache import KVCache

    _, nb = llama
    c = nb.config
    layout = KVCache.plan(c, 3, 20)
    assert {shape for _, shape in layout.values()} == {(3, 20, 2 * c.kv_heads * c.head_size)}
    assert len(layout) == c.n_layers
    s = nb.session(2, 10)
    s.start(np.array([[1, 2, 3], [4, 5, 6]]))
    assert all(v.shape == (2, 10, 2 * c.kv_heads * c.head_size) for v in s.cache.views.values())


# ================================================================ rope scaling past the original context
SCALED_ROPE = {  # llama3: original context 32 (the 40 positions below run past it); with head size 16 the
    # wavelengths 2 pi 10^(i/2) fall in all three bands: kept (< 8), interpolated, divided by factor (> 32)
    "llama3": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
}


@pytest.mark.parametrize("kind", sorted(SCALED_ROPE))
def test_rope_scaling_past_the_original_context(kind, tmp_path, rng):
    """40 positions: the inverse frequencies transformers rotates by, logits (right-padded batch),
    greedy KV-cache generation and, for llama3, every gradient vs transformers."""
    torch.manual_seed(1)
    hc = transformers.LlamaConfig(**COMMON, vocab_size=61, hidden_size=64, intermediate_size=48,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_parameters=dict(SCALED_ROPE[kind]))
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    nb = nbformer.load(tmp_path)
    c = nb.config
    assert (c.rope_scaling, c.rope_factor) == (kind, 4.0)
    from nbformer.weights.positions import rope_inv_freq_of

    inv = rope_inv_freq_of(c)
    assert_close(inv, hf.model.rotary_emb.inv_freq.double().numpy(), atol=0, rtol=1e-6, what="inv_freq")
    plain = rope_inv_freq(c.head_size, 1e4)
    kept, divided = np.isclose(inv, plain, rtol=1e-12), np.isclose(inv, plain / 4, rtol=1e-12)
    assert divided.all() if kind == "linear" else (kept.any() and divided.any() and (~kept & ~divided).any())
    ids, mask = _right_padded(rng, hc.vocab_size, 2, 40)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = nb.forward(ids, attention_mask=mask)
    real = mask.astype(bool)
    assert_close(got[real], want[real], atol=1e-4, rtol=0, what=f"{kind} logits vs transformers")
    p = ids[:1, :28]
    out = nb.generate(p, max_new_tokens=12, stop_at_eos=False)  # KV cache, positions 28 .. 39
    with torch.no_grad():
        ref_out = hf.generate(torch.from_numpy(p), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0).numpy()
    assert np.array_equal(out, ref_out)
    if kind == "llama3":
        labels = ids.copy()
        labels[~real] = -100
        loss, grads = nb.loss_and_grads(ids, labels, attention_mask=mask)
        hf.zero_grad()
        o = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
        o.loss.backward()
        assert abs(loss - o.loss.item()) < 1e-5
        for n, prm in hf.named_parameters():
            rel_check(grads[n], prm.grad.numpy(), n)


# ================================================================ fine-tuning from the CLI
def test_cli_fine_tunes_a_llama_dir(tmp_path):
    from click.testing import CliRunner
    from pathlib import Path

    from cli.main import main
    from nbformer.tokenizer import train_bpe

    text = Path(__file__).parent / "data" / "kjv_genesis_excerpt.txt"
    tok = train_bpe(text.read_text(encoding="utf-8").splitlines()[:200], 300)
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 5e5},
                                   bos_token_id=None, eos_token_id=None)
    d = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(text), "--model", str(d), "--out", str(out), "--steps", "30",
                                  "--batch", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "2",
                                  "--eval-every", "15", "--save-every", "30", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0], losses
    m = nbformer.load(out / "model.safetensors")  # nbformer's own checkpoint, config in its metadata
    assert m.config.family == "llama" and m.config.kv_heads == 2
    ids = np.array([tok.encode(text.read_text(encoding="utf-8")[:2000], add_special_tokens=False)[:64]])
    before, _ = nbformer.load(d).loss_and_grads(ids, ids)
    after, _ = m.loss_and_grads(ids, ids)
    assert after < before - 0.5, (before, after)  # from ~log(V) for the random init
    text_out = m.generate("And God said", max_new_tokens=6)
    assert text_out.startswith("And God said")


# ================================================================ config and loader errors
def _llama_json(**over):
    c = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    c.update(over)
    return c


def test_config_validation_names_the_field():
    base = dict(arch="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=40, max_positions=64,
                norm="pre", positions="rope", norm_type="rmsnorm", ffn_type="glu", activation="silu")
    ModelConfig(**base, n_kv_heads=2)
    for over, field in ((dict(n_kv_heads=3), "n_kv_heads"), (dict(norm_type="batchnorm"), "norm_type"),
                        (dict(ffn_type="moe"), "ffn_type"), (dict(head_dim=5), "head_dim"),
                        (dict(rope_theta=0.0), "rope_theta"), (dict(rope_scaling="yarn"), "rope_scaling"),
                        (dict(rope_scaling="llama3"), "rope_original_max_positions"),
                        (dict(n_kv_heads=0), "n_kv_heads")):
        with pytest.raises(ConfigError, match=field):
            ModelConfig(**{**base, **over})
    assert ModelConfig(**base, head_dim=12).attn_width == 48  # head_dim != d_model / n_heads is supported
    # defaults keep every existing model as it was
    gpt = ModelConfig(arch="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=40, max_positions=64)
    assert (gpt.norm_type, gpt.ffn_type, gpt.kv_heads, gpt.head_size, gpt.qkv_width) == ("layernorm", "mlp", 4, 8, 96)


def test_hf_config_variants():
    from nbformer.weights.hf_llama import config_from_hf

    old = config_from_hf(_llama_json(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}), "c")
    assert (old.rope_theta, old.rope_scaling, old.rope_factor) == (5e5, "linear", 2.0)
    l3 = config_from_hf(_llama_json(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}), "c")
    assert (l3.rope_scaling, l3.rope_original_max_positions) == ("llama3", 8192)
    assert config_from_hf(_llama_json(eos_token_id=[7, 9]), "c").eos_token_id == 7
    for rope_type in ("yarn", "dynamic", "longrope"):
        with pytest.raises(ConfigError, match=rf"'{rope_type}'.*default, linear, llama3"):
            config_from_hf(_llama_json(rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}),
                           "c")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        config_from_hf(_llama_json(num_key_value_heads=3), "c")
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf(_llama_json(hidden_act="tanh"), "c")


def test_hf_rope_config_spellings():
    """rope_type or legacy type, rope_parameters (transformers 5) or rope_scaling (4.x), and what
    transformers fills in: a top-level rope_theta, a top-level original_max_position_embeddings
    (it wins), else max_position_embeddings."""
    from nbformer.weights.hf_llama import config_from_hf

    l3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    a = config_from_hf(_llama_json(rope_theta=5e5, rope_scaling={"type": "llama3", **l3}), "c")
    assert (a.rope_scaling, a.rope_theta, a.rope_original_max_positions) == ("llama3", 5e5, 64)
    b = config_from_hf(_llama_json(rope_theta=5e5, original_max_position_embeddings=32,
                                   rope_parameters={"rope_type": "llama3", **l3,
                                                    "original_max_position_embeddings": 8192}), "c")
    assert (b.rope_theta, b.rope_original_max_positions) == (5e5, 32)
    c = config_from_hf(_llama_json(rope_parameters={"rope_type": "linear", "rope_theta": 2e4, "factor": 3}), "c")
    assert (c.rope_scaling, c.rope_theta, c.rope_factor) == ("linear", 2e4, 3.0)
    d = config_from_hf(_llama_json(rope_parameters={"full_attention": {"rope_type": "llama3", "rope_theta": 1e4,
                                                                       **l3, "original_max_position_embeddings": 16}}),
                       "c")
    assert (d.rope_scaling, d.rope_original_max_positions) == ("llama3", 16)
    for bad, what in (({"rope_type": "linear"}, "'factor'"), ({"rope_type": "linear", "factor": "2"}, "'factor'"),
                      ({"rope_type": "linear", "factor": float("nan")}, "'factor'"),
                      ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "'low_freq_factor'"),
                      ({"rope_type": "llama3", **l3, "original_max_position_embeddings": -1},
                       "original_max_position_embeddings"),
                      ({"rope_type": 3}, "not a string")):
        with pytest.raises(ConfigError, match=what):
            config_from_hf(_llama_json(rope_parameters={"rope_theta": 1e4, **bad}), "cfg.json")


def test_rope_freq_factors_field():
    """ModelConfig.rope_freq_factors (GGUF rope_freqs): validated, JSON round trip, divides inv_freq."""
    from nbformer.weights.positions import rope_freq_factors_of, rope_inv_freq_of

    base = dict(arch="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=40, max_positions=64,
                norm="pre", positions="rope", norm_type="rmsnorm", ffn_type="glu", activation="silu")
    ff = [1.0, 2.0, 3.0, 4.0]
    c = ModelConfig(**base, rope_freq_factors=ff)
    back = ModelConfig.from_dict(json.loads(c.to_json()))  # a JSON list comes back as a tuple: still hashable
    assert c.rope_freq_factors == (1.0, 2.0, 3.0, 4.0) and back == c and hash(back) == hash(c)
    assert_close(rope_inv_freq_of(c), rope_inv_freq(8, 1e4) / np.array(ff), atol=0, rtol=1e-15)
    assert_close(rope_freq_factors_of(c), np.array(ff), atol=0, rtol=1e-15)
    l3 = c.replace(rope_freq_factors=(), rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=16)
    assert_close(rope_inv_freq(8, 1e4) / rope_freq_factors_of(l3), rope_inv_freq_of(l3), atol=0, rtol=1e-15)
    for bad, what in (([1.0, 2.0], "3 entries|2 entries"), ([1.0, 0.0, 1.0, 1.0], "positive"),
                      ([1.0, float("nan"), 1.0, 1.0], "positive"), ("abcd", "rope_freq_factors")):
        with pytest.raises(ConfigError, match=what):
            ModelConfig(**base, rope_freq_factors=bad)
    with pytest.raises(ConfigError, match="rope_freq_factors"):
        ModelConfig(**{**base, "positions": "learned"}, rope_freq_factors=ff)


def test_unsupported_rope_scaling_in_a_model_dir(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_json())).save_pretrained(
        tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'yarn'"):
        nbformer.load(tmp_path)


def test_gguf_qk_permutation_round_trip(rng):
    """llama.cpp's converter permutes Q/K rows for interleaved-pair RoPE; unpermute_gguf_qk undoes it, and
    interleaved RoPE on the permuted rows equals rotate-half RoPE on the original ones."""
    from nbformer.weights.hf_llama import unpermute_gguf_qk

    NH, HS, C = 3, 8, 5

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = rng.normal(size=(NH * HS, C))
    g = llama_cpp_permute(w, NH)
    assert np.array_equal(unpermute_gguf_qk(g, NH), w)
    assert np.array_equal(unpermute_gguf_qk(llama_cpp_permute(w[:, 0], NH), NH), w[:, 0])  # biases too
    x, pos = rng.normal(size=C), 11
    inv = rope_inv_freq(HS, 1e4)
    half = ref.rope((w @ x).reshape(1, 1, NH, HS), [[pos]], inv).reshape(-1)
    y = (g @ x).reshape(NH, HS // 2, 2)  # interleaved pairs (2i, 2i+1)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    inter = np.stack([y[..., 0] * c - y[..., 1] * s, y[..., 1] * c + y[..., 0] * s], -1).reshape(-1)
    assert_close(unpermute_gguf_qk(inter, NH), half, atol=1e-12, rtol=1e-12)
