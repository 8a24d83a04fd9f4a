"""Attention backward (FlashAttention-2 style, two deterministic passes) vs float64 references."""
import math

import numpy as np
import pytest
from numba import njit

import reference as ref
from conftest import assert_close
from nbformer.kernels.cpu.attention import attention_forward
from nbformer.kernels.cpu import gemm_amx
from nbformer.kernels.cpu.attention_backward import attention_backward
from nbformer.kernels.cpu.rng import keep

# the AVX-512 / AVX2 path everywhere, the AMX path (attention_backward_amx.py) where the host has it
AMX = [False, pytest.param(True, marks=pytest.mark.skipif(not gemm_amx.available(), reason="no AMX here"))]


@njit(cache=True)
def _keep_mask(B, NH, Tq, Tk, seed, p):
    m = np.zeros((B, NH, Tq, Tk), np.float64)
    for b in range(B):
        for h in range(NH):
            for i in range(Tq):
                for j in range(Tk):
                    if keep(np.uint64(seed), np.uint64(((b * NH + h) * Tq + i) * Tk + j), p):
                        m[b, h, i, j] = 1.0
    return m


def ref_attention_backward(q, k, v, dout, key_mask, causal, scale, drop=None):
    """float64: returns (out, dq, dk, dv) in (B, NH, T, HS) layout; drop = keep-mask / (1-p)."""
    q, k, v, dout = (ref.f64(a) for a in (q, k, v, dout))
    B, NH, Tq, HS = q.shape
    Tk = k.shape[2]
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    allowed = np.ones((B, 1, Tq, Tk), bool) & np.asarray(key_mask, bool)[:, None, None, :]
    if causal:
        allowed &= (np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq))[None, None]
    allowed = np.broadcast_to(allowed, s.shape)
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    has = np.isfinite(m)
    e = np.where(allowed, np.exp(s - np.where(has, m, 0)), 0.0)
    p = np.where(has, e / np.where(e.sum(-1, keepdims=True) > 0, e.sum(-1, keepdims=True), 1), 0.0)
    M = np.ones_like(p) if drop is None else drop
    pt = p * M
    out = np.einsum("bhqk,bhkd->bhqd", pt, v)
    dv = np.einsum("bhqk,bhqd->bhkd", pt, dout)
    dp = np.einsum("bhqd,bhkd->bhqk", dout, v) * M
    D = (p * dp).sum(-1, keepdims=True)
    ds = p * (dp - D)
    dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    return out, dq, dk, dv


def run_pair(rng, B, NH, HS, Tq, Tk, causal, key_mask, fused, p_drop=0.0, seed=5, blocks=(32, 32), amx=False):
    C = NH * HS
    scale = 1.0 / math.sqrt(HS)
    if fused:
        assert Tq == Tk
        qkv = rng.normal(size=(B, Tq, 3 * C)).astype(np.float32)
        q_buf, kv_buf, q_off, k_off, v_off = qkv, qkv, 0, C, 2 * C
    else:
        q_buf = rng.normal(size=(B, Tq, C)).astype(np.float32)
        kv_buf = rng.normal(size=(B, Tk, 2 * C)).astype(np.float32)
        q_off, k_off, v_off = 0, 0, C
    out = np.empty((B, Tq, C), np.float32)
    lse = np.empty((B, NH, Tq), np.float32)
    attention_forward(out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, causal, scale)
    dout = rng.normal(size=(B, Tq, C)).astype(np.float32)
    if p_drop > 0:  # the forward with dropout is the reference's (the kernel's forward is checked elsewhere)
        drop = _keep_mask(B, NH, Tq, Tk, seed, p_drop) / (1 - p_drop)
    else:
        drop = None
    q = ref.split_heads(q_buf[..., q_off:q_off + C], NH)
    k = ref.split_heads(kv_buf[..., k_off:k_off + C], NH)
    v = ref.split_heads(kv_buf[..., v_off:v_off + C], NH)
    o64, dq64, dk64, dv64 = ref_attention_backward(q, k, v, ref.split_heads(dout, NH), key_mask, causal, scale, drop)
    out = ref.merge_heads(o64).astype(np.float32) if p_drop > 0 else out
    dq_buf = np.full_like(q_buf, np.nan)
    dkv_buf = dq_buf if fused else np.full_like(kv_buf, np.nan)
    delta = np.empty((B, NH, Tq), np.float32)
    attention_backward(dq_buf, dkv_buf, delta, dout, out, lse, q_buf, q_off, kv_buf, k_off, v_off, key_mask,
                       NH, HS, causal, scale, dropout_p=p_drop, seed=seed, block_q=blocks[0], block_k=blocks[1],
                       amx=amx)
    for name, got, want in (("dq", dq_buf[..., q_off:q_off + C], dq64), ("dk", dkv_buf[..., k_off:k_off + C], dk64),
                            ("dv", dkv_buf[..., v_off:v_off + C], dv64)):
        want = ref.merge_heads(want)
        assert_close(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0, what=name)
    return dq_buf, dkv_buf


def padded_mask(B, Tk, kind):
    mask = np.ones((B, Tk), np.uint8)
    if kind == "right" and B > 1:
        mask[-1, 1:] = 0  # a row padded down to a single token
    if kind == "left" and B > 1:
        mask[0, : Tk // 2] = 0
    if kind == "hole" and Tk > 8:
        mask[:, 3:8] = 0  # a fully masked key block with tiny tiles
    return mask


@pytest.mark.parametrize("T", [1, 7, 33, 130])
@pytest.mark.parametrize("HS,NH", [(16, 3), (32, 1), (64, 2), (80, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("amx", AMX)
def test_self_attention_backward(rng, T, HS, NH, causal, amx):
    B = 2
    run_pair(rng, B, NH, HS, T, T, causal, padded_mask(B, T, "right"), fused=True, amx=amx)


@pytest.mark.parametrize("kind", ["left", "hole", "all"])
@pytest.mark.parametrize("blocks", [(4, 3), (32, 32)])
@pytest.mark.parametrize("amx", AMX)
def test_padding_and_tiny_tiles(rng, kind, blocks, amx):
    B, T = 3, 19
    mask = padded_mask(B, T, kind) if kind != "all" else np.ones((B, T), np.uint8)
    if kind == "all":
        mask[1] = 0  # a batch row with no key at all: its gradients are 0
    dq, _ = run_pair(rng, B, 2, 16, T, T, True, mask, fused=True, blocks=blocks, amx=amx)
    if kind == "all":
        assert not np.isnan(dq).any() and np.all(dq[1] == 0)


@pytest.mark.parametrize("Tq,Tk,causal", [(5, 33, False), (5, 33, True), (1, 17, True), (257, 9, False),
                                         (40, 9, True)])  # (40, 9): the first 31 queries see no key
@pytest.mark.parametrize("amx", AMX)
def test_cross_attention_backward(rng, Tq, Tk, causal, amx):
    run_pair(rng, 2, 2, 32, Tq, Tk, causal, padded_mask(2, Tk, "left"), fused=False, blocks=(8, 5), amx=amx)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("amx", AMX)
def test_dropout_mask_is_regenerated(rng, p, amx):
    run_pair(rng, 2, 2, 16, 21, 21, True, padded_mask(2, 21, "right"), fused=True, p_drop=p, blocks=(8, 4), amx=amx)


def test_finite_differences_of_the_reference(rng):
    """The analytic float64 reference agrees with central differences of the float64 forward."""
    B, NH, T, HS = 1, 2, 5, 3
    q, k, v = (rng.normal(size=(B, NH, T, HS)) for _ in range(3))
    dout = rng.normal(size=(B, NH, T, HS))
    mask = np.array([[1, 1, 0, 1, 1]], np.uint8)
    _, dq, dk, dv = ref_attention_backward(q, k, v, dout, mask, True, 0.7)

    def loss(q_, k_, v_):
        return float((ref.attention(q_, k_, v_, mask, True, 0.7)[0] * dout).sum())

    for which, grad in ((0, dq), (1, dk), (2, dv)):
        args = [q.copy(), k.copy(), v.copy()]
        num = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            for sign in (1, -1):
                a = [x.copy() for x in args]
                a[which][idx] += sign * 1e-6
                num[idx] += sign * loss(*a) / 2e-6
        assert_close(grad, num, atol=1e-6, rtol=1e-5, what=f"grad {which}")


@pytest.mark.parametrize("amx", AMX)
def test_deterministic(rng, amx):
    import numba

    a = run_pair(np.random.default_rng(3), 2, 2, 32, 70, 70, True, padded_mask(2, 70, "right"), fused=True, amx=amx)[0]
    numba.set_num_threads(1)
    try:
        b = run_pair(np.random.default_rng(3), 2, 2, 32, 70, 70, True, padded_mask(2, 70, "right"), fused=True,
                     amx=amx)[0]
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("blocks", [(256, 256), (8, 5)])
def test_forward_dropout_uses_the_same_mask(rng, blocks):
    """attention_forward with dropout equals the float64 reference with rng.keep's mask."""
    B, NH, HS, T = 2, 2, 16, 37
    C = NH * HS
    qkv = rng.normal(size=(B, T, 3 * C)).astype(np.float32)
    mask = padded_mask(B, T, "right")
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, True, HS ** -0.5, block_q=blocks[0],
                      block_k=blocks[1], dropout_p=0.3, seed=77)
    drop = _keep_mask(B, NH, T, T, 77, 0.3) / 0.7
    q, k, v = (ref.split_heads(qkv[..., i * C:(i + 1) * C], NH) for i in range(3))
    o64, _, _, _ = ref_attention_backward(q, k, v, np.zeros_like(q), mask, True, HS ** -0.5, drop)
    assert_close(out, ref.merge_heads(o64), atol=2e-6, rtol=1e-5)
    _, lse64 = ref.attention(q, k, v, mask, True, HS ** -0.5)  # lse ignores dropout
    assert_close(lse, lse64, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("amx", AMX)
def test_huge_scores_on_padded_keys_do_not_leak(rng, amx):
    """A padded key whose score would overflow exp must not turn gradients into NaN."""
    B, NH, HS, T = 1, 1, 16, 9
    C = NH * HS
    qkv = rng.normal(size=(B, T, 3 * C)).astype(np.float32)
    qkv[0, 4, C:2 * C] = 1e4 * np.sign(qkv[0, :, :C].sum(0))  # key 4: enormous scores, but padded
    mask = np.ones((B, T), np.uint8)
    mask[0, 4] = 0
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, False, HS ** -0.5)
    dout = rng.normal(size=out.shape).astype(np.float32)
    d = np.full_like(qkv, np.nan)
    attention_backward(d, d, np.empty_like(lse), dout, out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, False,
                       HS ** -0.5, amx=amx)
    assert np.isfinite(d).all() and np.all(d[0, 4, C:] == 0)


@pytest.mark.parametrize("causal,p_drop,NKV", [(True, 0.0, 3), (False, 0.0, 1), (True, 0.3, 3), (False, 0.2, 6)])
@pytest.mark.parametrize("amx", AMX)
def test_schedules_tiles_and_threads_give_the_same_bits(rng, causal, p_drop, NKV, amx):
    """One pass or two, any block_q / block_k, any thread count: every sum runs in one fixed order, so
    the gradients are identical bit for bit (GQA groups, dropout, padding and a ragged T included);
    and they match the float64 reference (kv heads repeated over their group)."""
    import numba

    B, NH, HS, T = 2, 6, 16, 45
    A, KV = NH * HS, NKV * HS
    qkv = rng.normal(size=(B, T, A + 2 * KV)).astype(np.float32)
    mask = padded_mask(B, T, "left")
    mask[1, 20:27] = 0
    scale = HS ** -0.5
    out = np.empty((B, T, A), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, causal, scale, dropout_p=p_drop, seed=9,
                      n_kv_heads=NKV)
    dout = rng.normal(size=out.shape).astype(np.float32)
    results = []
    for passes, blocks, threads in ((1, (64, 64), None), (2, (64, 64), None), (1, (7, 5), None), (2, (16, 9), None),
                                    (1, (32, 32), 1), (2, (5, 64), 1), (None, (13, 11), None)):
        d = np.full_like(qkv, np.nan)
        old = numba.get_num_threads()
        numba.set_num_threads(threads or old)
        try:
            attention_backward(d, d, np.empty_like(lse), dout, out, lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, causal,
                               scale, dropout_p=p_drop, seed=9, block_q=blocks[0], block_k=blocks[1], n_kv_heads=NKV,
                               passes=passes, amx=amx)
        finally:
            numba.set_num_threads(old)
        results.append(d)
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    g = NH // NKV
    q = ref.split_heads(qkv[..., :A], NH)
    k = np.repeat(ref.split_heads(qkv[..., A:A + KV], NKV), g, axis=1)
    v = np.repeat(ref.split_heads(qkv[..., A + KV:], NKV), g, axis=1)
    drop = _keep_mask(B, NH, T, T, 9, p_drop) / (1 - p_drop) if p_drop > 0 else None
    o64, dq, dk, dv = ref_attention_backward(q, k, v, ref.split_heads(dout, NH), mask, causal, scale, drop)
    if p_drop > 0:  # D = rowsum(dO * O) must see the reference's dropped output; rerun on it
        out = ref.merge_heads(o64).astype(np.float32)
        d = np.full_like(qkv, np.nan)
        attention_backward(d, d, np.empty_like(lse), dout, out, lse, qkv, 0, qkv, A, A + KV, mask, NH, HS, causal,
                           scale, dropout_p=p_drop, seed=9, n_kv_heads=NKV, amx=amx)
        results[0] = d
    d = results[0]
    B_, H_, T_, D_ = dk.shape
    dk = dk.reshape(B_, NKV, g, T_, D_).sum(2)
    dv = dv.reshape(B_, NKV, g, T_, D_).sum(2)
    for name, got, want in (("dq", d[..., :A], dq), ("dk", d[..., A:A + KV], dk), ("dv", d[..., A + KV:], dv)):
        want = ref.merge_heads(want)
        assert_close(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0, what=name)


@pytest.mark.parametrize("causal,NKV", [(False, 2), (True, 2), (True, 1)])
@pytest.mark.parametrize("amx", AMX)
def test_long_sequence_query_chunks(rng, causal, NKV, amx):
    """T above the one-pass query chunk (512 rows by default; also 200 and 16 here), grouped-query attention
    included: chunked one pass == two passes, bit for bit, and both match the float64 reference."""
    B, NH, HS, T = 1, 2, 16, 1100
    C, KV = NH * HS, NKV * HS
    qkv = rng.normal(size=(B, T, C + 2 * KV)).astype(np.float32)
    mask = np.ones((B, T), np.uint8)
    mask[0, 500:530] = 0
    scale = HS ** -0.5
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, C, C + KV, mask, NH, HS, causal, scale, n_kv_heads=NKV)
    dout = rng.normal(size=out.shape).astype(np.float32)
    results = []
    for passes, blocks, chunk in ((1, (64, 64), 512), (1, (100, 48), 256), (1, (16, 16), 1), (2, (64, 64), 512)):
        d = np.full_like(qkv, np.nan)
        attention_backward(d, d, np.empty_like(lse), dout, out, lse, qkv, 0, qkv, C, C + KV, mask, NH, HS, causal,
                           scale, block_q=blocks[0], block_k=blocks[1], passes=passes, query_chunk=chunk,
                           n_kv_heads=NKV, amx=amx)
        results.append(d)
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    g = NH // NKV
    q = ref.split_heads(qkv[..., :C], NH)
    k = np.repeat(ref.split_heads(qkv[..., C:C + KV], NKV), g, axis=1)
    v = np.repeat(ref.split_heads(qkv[..., C + KV:], NKV), g, axis=1)
    _, dq, dk, dv = ref_attention_backward(q, k, v, ref.split_heads(dout, NH), mask, causal, scale)
    dk = dk.reshape(B, NKV, g, T, HS).sum(2)
    dv = dv.reshape(B, NKV, g, T, HS).sum(2)
    for name, got, want in (("dq", results[0][..., :C], dq), ("dk", results[0][..., C:C + KV], dk),
                            ("dv", results[0][..., C + KV:], dv)):
        want = ref.merge_heads(want)
        assert_close(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0, what=name)


def _small_case(rng, HS, T=40, NH=1, causal=True):
    C = NH * HS
    qkv = rng.normal(size=(1, T, 3 * C)).astype(np.float32)
    mask = np.ones((1, T), np.uint8)
    out = np.empty((1, T, C), np.float32)
    lse = np.empty((1, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, causal, HS ** -0.5)
    dout = rng.normal(size=out.shape).astype(np.float32)

    def run(**kw):
        d = np.full_like(qkv, np.nan)
        attention_backward(d, d, np.empty_like(lse), dout, out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, causal,
                           HS ** -0.5, **kw)
        return d

    return run


@pytest.mark.skipif(not gemm_amx.available(), reason="no AMX here")
def test_amx_is_the_default_for_big_enough_heads_and_sequences(rng):
    """amx=None takes the tile products to AMX where the head has >= 32 dims (smaller heads would pad
    every product to 32) and Tq * Tk reaches AMX_MIN_AREA (AMX_MIN_AREA_CAUSAL causal); the two
    paths agree to fp32 accuracy."""
    from nbformer.kernels.cpu import attention_backward as ab

    assert ab.AMX_MIN_AREA <= 400 * 400 < ab.AMX_MIN_AREA_CAUSAL
    for HS, T, causal, on_amx in ((64, 400, False, True), (64, 400, True, False), (64, 40, False, False),
                                  (16, 400, False, False)):
        run = _small_case(rng, HS, T, causal=causal)
        auto, amx, avx = run(), run(amx=True), run(amx=False)
        assert np.array_equal(auto, amx if on_amx else avx), (HS, T, causal)
        assert not np.array_equal(amx, avx)
        np.testing.assert_allclose(amx, avx, atol=2e-6 * np.abs(avx).max(), rtol=0)


def test_amx_without_it_is_a_clear_error(rng, monkeypatch):
    from nbformer.errors import GraphError

    run = _small_case(rng, 32)
    monkeypatch.setattr(gemm_amx, "available", lambda: False)
    with pytest.raises(GraphError, match="amx=True"):
        run(amx=True)
    assert np.isfinite(run()).all()  # the default then is the AVX path
