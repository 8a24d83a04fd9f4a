"""CPU tiled attention forward (nbformer.kernels.cpu.attention) against the float64 reference."""
import math

import numba
import numpy as np
import pytest

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu.attention import attention_flops, attention_forward

TINY = (4, 3)  # block_q, block_k: many tiles and ragged tails even on tiny inputs
DEFAULT = (256, 256)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def run(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, tiles=DEFAULT):
    B, Tq = q_buf.shape[:2]
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    out = np.full((B, Tq, NH * HS), np.nan, np.float32)
    lse = np.full((B, NH, Tq), np.nan, np.float32)
    attention_forward(out, lse, q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale,
                      block_q=tiles[0], block_k=tiles[1])
    return out, lse


def reference(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None):
    C = NH * HS
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    q = ref.split_heads(q_buf[:, :, q_off:q_off + C], NH)
    k = ref.split_heads(kv_buf[:, :, k_off:k_off + C], NH)
    v = ref.split_heads(kv_buf[:, :, v_off:v_off + C], NH)
    out, lse = ref.attention(q, k, v, mask, causal, scale)
    return ref.merge_heads(out), lse


def check(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, tiles=DEFAULT):
    out, lse = run(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale, tiles)
    r_out, r_lse = reference(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale)
    tol = 1e-5 * max(1.0, float(np.abs(r_out).max(initial=0.0)))
    assert_close(out, r_out, atol=tol, rtol=0.0, what="out")
    # lse: finite where the reference is finite, exactly -inf where it is -inf
    dead = np.isneginf(r_lse)
    assert np.array_equal(np.isneginf(lse), dead), "lse: -inf rows differ from the reference"
    assert_close(np.where(dead, 0.0, lse), np.where(dead, 0.0, r_lse), atol=2e-6, rtol=1e-5, what="lse")
    assert np.all(out[dead.transpose(0, 2, 1).repeat(HS, axis=2)] == 0.0)
    return out, lse


def fused_qkv(rng, B, T, NH, HS, spread=1.0):
    C = NH * HS
    return f32(rng.normal(scale=spread, size=(B, T, 3 * C))), 0, C, 2 * C


# ---------------------------------------------------------------- self-attention, one fused buffer
@pytest.mark.parametrize("tiles", [DEFAULT, TINY], ids=["default_tiles", "tiny_tiles"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T,HS,NH", [(1, 16, 1), (7, 32, 2), (33, 64, 3), (130, 80, 2), (257, 64, 1)])
def test_self_attention(rng, T, HS, NH, causal, tiles):
    buf, qo, ko, vo = fused_qkv(rng, 2, T, NH, HS)
    mask = np.ones((2, T), np.uint8)
    check(buf, qo, buf, ko, vo, mask, NH, HS, causal, tiles=tiles)


@pytest.mark.parametrize("HS", [16, 20, 24, 32, 64, 80])  # 20, 24: 8-wide and scalar column edges
@pytest.mark.parametrize("tiles", [DEFAULT, (8, 16), TINY])
def test_head_sizes(rng, HS, tiles):
    buf, qo, ko, vo = fused_qkv(rng, 1, 33, 2, HS, spread=2.0)  # peaky softmax: rescaling matters
    mask = np.ones((1, 33), np.uint8)
    for causal in (False, True):
        check(buf, qo, buf, ko, vo, mask, 2, HS, causal, tiles=tiles)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(rng, scale):
    buf, qo, ko, vo = fused_qkv(rng, 1, 20, 2, 16)
    check(buf, qo, buf, ko, vo, np.ones((1, 20), np.uint8), 2, 16, True, scale=scale, tiles=TINY)


def test_default_blocks(rng):
    """The launcher as the op registry calls it: no block arguments."""
    B, T, NH, HS = 2, 300, 2, 32
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    mask[1, 250:] = 0
    out = np.empty((B, T, NH * HS), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, buf, qo, buf, ko, vo, mask, NH, HS, True, HS ** -0.5)
    r_out, r_lse = reference(buf, qo, buf, ko, vo, mask, NH, HS, True)
    assert_close(out, r_out, atol=1e-5, rtol=0.0, what="out")
    assert_close(lse, r_lse, atol=2e-6, rtol=1e-5, what="lse")


# ---------------------------------------------------------------- padding
def padding_masks(T):
    mask = np.ones((5, T), np.uint8)
    mask[1, 1:] = 0          # right padding down to a single real token
    mask[2, :20] = 0         # left padding
    mask[3, 8:16] = 0        # a fully masked key block in the middle (block_k = 8)
    mask[3, [2, 5, 30]] = 0  # and holes
    mask[4, :] = 0           # every key masked: out 0, lse -inf
    return mask


@pytest.mark.parametrize("tiles", [DEFAULT, (8, 8), TINY])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding(rng, causal, tiles):
    T, NH, HS = 33, 2, 16
    buf, qo, ko, vo = fused_qkv(rng, 5, T, NH, HS)
    mask = padding_masks(T)
    out, lse = check(buf, qo, buf, ko, vo, mask, NH, HS, causal, tiles=tiles)
    assert np.all(out[4] == 0.0) and np.all(np.isneginf(lse[4]))
    if causal:  # left padding + causal: the first 20 query rows of batch row 2 see nothing
        assert np.all(np.isneginf(lse[2, :, :20])) and np.all(np.isfinite(lse[2, :, 20:]))


def test_single_row_all_masked(rng):
    buf, qo, ko, vo = fused_qkv(rng, 1, 9, 1, 16)
    out, lse = run(buf, qo, buf, ko, vo, np.zeros((1, 9), np.uint8), 1, 16, False, tiles=TINY)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_nan_propagates(rng):
    """NaN inputs give NaN outputs (not silently dropped, not mistaken for empty rows)."""
    B, T, NH, HS = 1, 9, 1, 16
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    buf[0, 4, qo] = np.nan  # one query row
    buf[0, 6, vo + 3] = np.nan  # one value entry, seen by every row
    out, lse = run(buf, qo, buf, ko, vo, np.ones((B, T), np.uint8), NH, HS, False, tiles=TINY)
    assert np.isnan(out[0, 4]).all() and np.isnan(lse[0, 0, 4])
    assert np.isnan(out[0, :, 3]).all() and np.isfinite(np.delete(lse[0, 0], 4)).all()


# ---------------------------------------------------------------- cross-attention, decode
@pytest.mark.parametrize("tiles", [DEFAULT, TINY])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Tq,Tk", [(5, 33), (1, 17), (1, 1), (9, 4), (40, 7)])
def test_cross_attention(rng, Tq, Tk, causal, tiles):
    B, NH, HS = 2, 3, 16
    C = NH * HS
    q = f32(rng.normal(size=(B, Tq, C)))
    kv = f32(rng.normal(size=(B, Tk, 2 * C)))
    mask = np.ones((B, Tk), np.uint8)
    mask[1, : Tk // 3] = 0
    out, lse = check(q, 0, kv, 0, C, mask, NH, HS, causal, tiles=tiles)
    if causal and Tq > Tk:  # bottom-right alignment: the first Tq - Tk queries see no key
        assert np.all(np.isneginf(lse[:, :, : Tq - Tk]))


def test_decode_steps_match_full_causal(rng):
    """Tq = 1 against a cache prefix equals the matching row of the full causal pass."""
    B, T, NH, HS = 2, 21, 2, 16
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    full, full_lse = run(buf, qo, buf, ko, vo, mask, NH, HS, True, tiles=TINY)
    for t in (0, 7, T - 1):
        step, step_lse = run(buf[:, t:t + 1], qo, buf[:, : t + 1], ko, vo, mask[:, : t + 1], NH, HS, True,
                             tiles=TINY)
        assert_close(step[:, 0], full[:, t], atol=1e-6, rtol=1e-5, what=f"decode step {t}")
        assert_close(step_lse[:, :, 0], full_lse[:, :, t], atol=1e-6, rtol=1e-5, what=f"lse step {t}")


# ---------------------------------------------------------------- buffer layouts
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_views(rng, causal):
    """kv from a larger cache (view along axis 1), q from a strided view of the fused buffer."""
    B, Tmax, NH, HS = 2, 50, 2, 32
    C = NH * HS
    cache = f32(rng.normal(size=(B, Tmax, 2 * C)))
    big_q = f32(rng.normal(size=(B, 2 * Tmax, C + 8)))
    kv = cache[:, :37]
    q = big_q[:, ::2][:, 30:37]  # (B, 7, C + 8), strided along axis 1, head data at offset 8
    assert not kv.flags.c_contiguous and not q.flags.c_contiguous
    mask = np.ones((B, 37), np.uint8)
    mask[0, 30:] = 0
    for tiles in (DEFAULT, TINY):
        check(q, 8, kv, 0, C, mask, NH, HS, causal, tiles=tiles)


@pytest.mark.parametrize("layout", ["last_axis_strided", "reversed_rows", "one_row_odd_stride"])
def test_odd_kv_layouts(rng, layout):
    """kv layouts BLAS cannot read in place are copied by the launcher, still correct."""
    B, NH, HS = 2, 2, 16
    C = NH * HS
    Tk = 1 if layout == "one_row_odd_stride" else 11
    base = f32(rng.normal(size=(B, 2 * Tk, 4 * C)))
    if layout == "last_axis_strided":
        kv = base[:, :Tk, ::2]
    elif layout == "reversed_rows":
        kv = base[:, ::-1][:, :Tk, : 2 * C]
    else:
        kv = np.lib.stride_tricks.as_strided(base, (B, 1, 2 * C), (base.strides[0], 4, 4))
    q = f32(rng.normal(size=(B, 3, C)))
    check(q, 0, kv, 0, C, np.ones((B, Tk), np.uint8), NH, HS, True, tiles=TINY)


def test_unaligned_inputs(rng):
    B, T, NH, HS = 1, 10, 2, 16
    C = NH * HS
    raw = bytearray(B * T * 3 * C * 4 + 1)
    buf = np.frombuffer(raw, dtype=np.float32, offset=1, count=B * T * 3 * C).reshape(B, T, 3 * C)
    assert not buf.flags.aligned
    buf[...] = rng.normal(size=buf.shape)
    check(buf, 0, buf, C, 2 * C, np.ones((B, T), np.uint8), NH, HS, False, tiles=TINY)


def test_read_only_inputs(rng):
    B, T, NH, HS = 1, 12, 2, 16
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    buf.flags.writeable = False
    mask.flags.writeable = False
    check(buf, qo, buf, ko, vo, mask, NH, HS, True, tiles=TINY)


def test_separate_buffers_equal_fused(rng):
    B, T, NH, HS = 2, 19, 2, 16
    C = NH * HS
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    a, la = run(buf, qo, buf, ko, vo, mask, NH, HS, True, tiles=TINY)
    b, lb = run(f32(buf[:, :, :C]), 0, f32(buf[:, :, C:]), 0, C, mask, NH, HS, True, tiles=TINY)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


# ---------------------------------------------------------------- determinism
def test_deterministic_across_runs_and_threads(rng):
    B, T, NH, HS = 2, 130, 3, 32
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = padding_masks(T)[:B]
    results = []
    n0 = numba.get_num_threads()
    try:
        for n in sorted({1, n0}):
            numba.set_num_threads(n)
            for _ in range(2):
                results.append(run(buf, qo, buf, ko, vo, mask, NH, HS, True, tiles=(16, 8)))
    finally:
        numba.set_num_threads(n0)
    for out, lse in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(lse, results[0][1])


# ---------------------------------------------------------------- validation and helpers
def _args(B=2, Tq=5, Tk=6, NH=2, HS=8):
    C = NH * HS
    return dict(out=np.zeros((B, Tq, C), np.float32), lse=np.zeros((B, NH, Tq), np.float32),
                q_buf=np.zeros((B, Tq, C), np.float32), q_off=0, kv_buf=np.zeros((B, Tk, 2 * C), np.float32),
                k_off=0, v_off=C, key_mask=np.ones((B, Tk), np.uint8), n_heads=NH, head_size=HS,
                causal=False, scale=0.3)


@pytest.mark.parametrize("change,needle", [
    (dict(out=np.zeros((2, 5, 16), np.float64)), "out"),
    (dict(out=np.zeros((2, 5, 17), np.float32)), "out"),
    (dict(out=np.zeros((2, 16, 5), np.float32).transpose(0, 2, 1)), "out"),
    (dict(lse=np.zeros((2, 5, 2), np.float32)), "lse"),
    (dict(q_buf=np.zeros((2, 5, 16), np.float16)), "q_buf"),
    (dict(q_buf=np.zeros((2, 5), np.float32)), "q_buf"),
    (dict(q_off=4), "q_off"),
    (dict(kv_buf=np.zeros((2, 6, 24), np.float32)), "v_off"),
    (dict(kv_buf=np.zeros((3, 6, 32), np.float32)), "kv_buf"),
    (dict(k_off=-1), "k_off"),
    (dict(key_mask=np.ones((2, 6), np.int64)), "key_mask"),
    (dict(key_mask=np.ones((2, 5), np.uint8)), "key_mask"),
    (dict(n_heads=0), "n_heads"),
    (dict(out=np.ndarray((2, 5, 16), np.float32, buffer=bytearray(2 * 5 * 16 * 4 + 1), offset=1)), "out"),
])
def test_validation(change, needle):
    args = _args()
    args.update(change)
    with pytest.raises(GraphError, match=needle):
        attention_forward(**args)


def test_validation_block_sizes():
    with pytest.raises(GraphError, match="block_q"):
        attention_forward(**_args(), block_q=0)


def test_flops():
    assert attention_flops(1, 12, 1024, 1024, 64, False) == 4 * 12 * 1024 * 1024 * 64
    assert attention_flops(1, 12, 1024, 1024, 64, True) == 2 * 12 * 1024 * 1024 * 64


# ---------------------------------------------------------------- decode path (Tq <= MAX_QUERIES)
def _gqa_reference(q, kv, mask, NH, NKV, HS, causal, scale, key_len):
    """float64: query head h reads kv head h // (NH // NKV); keys [0, key_len) of kv."""
    g = NH // NKV
    kv64, m = kv[:, :key_len].astype(np.float64), mask[:, :key_len]
    k = np.repeat(ref.split_heads(kv64[:, :, :NKV * HS], NKV), g, axis=1)
    v = np.repeat(ref.split_heads(kv64[:, :, NKV * HS:2 * NKV * HS], NKV), g, axis=1)
    out, lse = ref.attention(ref.split_heads(q.astype(np.float64), NH), k, v, m, causal, scale)
    return ref.merge_heads(out), lse


@pytest.mark.parametrize("B,Tq,NH,NKV,HS,key_len,cap", [
    (1, 1, 9, 3, 64, 100, 145),   # SmolLM2's heads, a cache prefix
    (2, 3, 6, 2, 33, 17, 17),     # odd head size, whole cache
    (3, 4, 5, 5, 8, 1, 9),        # one key, MHA
    (2, 2, 4, 1, 16, 70, 80),     # MQA
    (1, 1, 2, 2, 64, 1000, 1001),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_decode_path_matches_reference_and_tiled(rng, monkeypatch, B, Tq, NH, NKV, HS, key_len, cap, causal):
    import nbformer.kernels.cpu.attention as A
    from nbformer.kernels.cpu.attention_decode import MAX_QUERIES

    assert Tq <= MAX_QUERIES
    scale = HS ** -0.5
    q = f32(rng.normal(size=(B, Tq, NH * HS)))
    kv = f32(rng.normal(size=(B, cap, 2 * NKV * HS)))
    mask = (rng.random((B, cap)) > 0.2).astype(np.uint8)
    mask[:, key_len - 1] = 1
    if B == 3:
        mask[2] = 0  # a row that sees no key: out 0, lse -inf
    outs = {}
    for route in ("decode", "tiled"):
        if route == "tiled":
            monkeypatch.setattr(A, "_decode_max_queries", lambda: 0)
        out = np.full((B, Tq, NH * HS), np.nan, np.float32)
        lse = np.full((B, NH, Tq), np.nan, np.float32)
        attention_forward(out, lse, q, 0, kv, 0, NKV * HS, mask, NH, HS, causal, scale, key_len=key_len,
                          n_kv_heads=NKV)
        outs[route] = out, lse
    r_out, r_lse = _gqa_reference(q, kv, mask, NH, NKV, HS, causal, scale, key_len)
    out, lse = outs["decode"]
    assert_close(out, r_out, atol=1e-5 * max(1.0, float(np.abs(r_out).max())), rtol=0.0, what="out")
    dead = np.isneginf(r_lse)
    assert np.array_equal(np.isneginf(lse), dead)
    assert_close(np.where(dead, 0, lse), np.where(dead, 0, r_lse), atol=2e-6, rtol=1e-5, what="lse")
    assert_close(out, outs["tiled"][0], atol=1e-6, rtol=1e-5, what="decode vs tiled")
    # the bits do not depend on the thread count (items own disjoint outputs)
    again = np.full_like(out, np.nan), np.full_like(lse, np.nan)
    monkeypatch.undo()
    attention_forward(again[0], again[1], q, 0, kv, 0, NKV * HS, mask, NH, HS, causal, scale, key_len=key_len,
                      n_kv_heads=NKV, threads=1)
    assert np.array_equal(again[0], out) and np.array_equal(again[1], lse, equal_nan=True)


def test_decode_path_strided_cache_view_and_nan(rng):
    """A non-contiguous kv (a strided view) is copied, not misread; NaN in a value row shows."""
    B, NH, HS = 1, 2, 8
    base = f32(rng.normal(size=(B, 12, 2 * 2 * NH * HS)))
    kv = base[:, :, ::2]  # every other float: not addressable as rows
    q = f32(rng.normal(size=(B, 1, NH * HS)))
    mask = np.ones((B, 12), np.uint8)
    out, lse = run(q, 0, kv, 0, NH * HS, mask, NH, HS, True)
    r_out, _ = reference(q, 0, np.ascontiguousarray(kv), 0, NH * HS, mask, NH, HS, True)
    assert_close(out, r_out, atol=1e-5, rtol=0.0, what="strided kv")
    kv2 = np.ascontiguousarray(kv)
    kv2[0, 5, NH * HS + 3] = np.nan
    out, lse = run(q, 0, kv2, 0, NH * HS, mask, NH, HS, True)
    assert np.isnan(out[0, 0, 3]) and np.isfinite(out[0, 0, HS:]).all()
