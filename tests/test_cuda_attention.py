"""CUDA tiled attention forward (nbformer.kernels.cuda.attention) against the float64 reference and
against its CPU twin (nbformer.kernels.cpu.attention) on the same inputs.

Under Numba's simulator (the default here, see conftest.py) every CUDA thread is a Python thread,
~50 ms per block and key tile with 4 threads: shapes and tiles are tiny (TINY = 4x4 tiles, 4
threads), chosen so multi-tile paths, ragged tails, skipped tiles and every mask case still run.
Tests marked GPU-only run realistic shapes when NBFORMER_TEST_GPU=1 on a CUDA machine.
"""
import math

import numpy as np
import pytest

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu import attention as cpu_attention
from nbformer.kernels.cuda import attention as A
from nbformer.kernels.cuda._jit import SIMULATOR, cuda

TINY = (4, 4, 4)     # block_q, block_k, threads (2 x 2 threads, 2 x 2 scores each)
SMALL = (8, 4, 4)    # 4 query rows x 1 key per thread
WIDE = (16, 8, 8)
GPU_ONLY = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: real GPU only "
                                                "(NBFORMER_TEST_GPU=1 on a CUDA machine)")


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def fused_qkv(rng, B, T, NH, HS, spread=1.0):
    C = NH * HS
    return f32(rng.normal(scale=spread, size=(B, T, 3 * C))), 0, C, 2 * C


def run(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, tiles=TINY,
        key_len=None, **kw):
    """Launch on device copies (one shared copy when kv_buf is q_buf); NaN-filled outputs."""
    B, Tq = q_buf.shape[:2]
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    dq = cuda.to_device(q_buf)
    dkv = dq if kv_buf is q_buf else cuda.to_device(kv_buf)
    out = cuda.to_device(np.full((B, Tq, NH * HS), np.nan, np.float32))
    lse = cuda.to_device(np.full((B, NH, Tq), np.nan, np.float32))
    if tiles is not None:
        kw.update(block_q=tiles[0], block_k=tiles[1], threads=tiles[2])
    A.attention_forward(out, lse, dq, q_off, dkv, k_off, v_off, cuda.to_device(mask), NH, HS,
                        causal, scale, key_len=key_len, **kw)
    cuda.synchronize()
    return out.copy_to_host(), lse.copy_to_host()


def prefix(kv_buf, mask, key_len):
    Tk = kv_buf.shape[1] if key_len is None else key_len
    return f32(kv_buf[:, :Tk]), np.ascontiguousarray(mask[:, :Tk])


def reference(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, key_len=None):
    C = NH * HS
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    kv, mask = prefix(kv_buf, mask, key_len)
    q = ref.split_heads(q_buf[:, :, q_off:q_off + C], NH)
    k = ref.split_heads(kv[:, :, k_off:k_off + C], NH)
    v = ref.split_heads(kv[:, :, v_off:v_off + C], NH)
    out, lse = ref.attention(q, k, v, mask, causal, scale)
    return ref.merge_heads(out), lse


def cpu_twin(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, key_len=None,
             **kw):
    B, Tq = q_buf.shape[:2]
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    kv, mask = prefix(kv_buf, mask, key_len)
    out = np.full((B, Tq, NH * HS), np.nan, np.float32)
    lse = np.full((B, NH, Tq), np.nan, np.float32)
    cpu_attention.attention_forward(out, lse, q_buf, q_off, kv, k_off, v_off, mask, NH, HS, causal,
                                    scale, **kw)
    return out, lse


def compare(out, lse, r_out, r_lse, HS, what, atol_lse=2e-6):
    tol = 1e-5 * max(1.0, float(np.abs(r_out).max(initial=0.0)))
    assert_close(out, r_out, atol=tol, rtol=0.0, what=f"out vs {what}")
    dead = np.isneginf(r_lse)  # rows that see no key: lse exactly -inf, out exactly 0
    assert np.array_equal(np.isneginf(lse), dead), f"lse: -inf rows differ from {what}"
    assert_close(np.where(dead, 0.0, lse), np.where(dead, 0.0, r_lse), atol=atol_lse, rtol=1e-5,
                 what=f"lse vs {what}")
    assert np.all(out[dead.transpose(0, 2, 1).repeat(HS, axis=2)] == 0.0)


def check(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale=None, tiles=TINY,
          key_len=None, twin=True, **kw):
    """CUDA result vs the float64 reference and vs the CPU kernel; returns the CUDA result."""
    out, lse = run(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale, tiles, key_len,
                   **kw)
    assert np.isfinite(out).all(), "out has NaN/inf (or was not written fully)"
    assert not np.isnan(lse).any(), "lse has NaN (or was not written fully)"
    compare(out, lse, *reference(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale,
                                 key_len), HS, "float64 reference")
    if twin:
        compare(out, lse, *cpu_twin(q_buf, q_off, kv_buf, k_off, v_off, mask, NH, HS, causal, scale,
                                    key_len), HS, "CPU kernel")
    return out, lse


# ---------------------------------------------------------------- self-attention, fused qkv buffer
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T,NH,HS,tiles", [(1, 3, 4, TINY), (7, 3, 8, TINY), (33, 3, 8, TINY),
                                            (33, 1, 12, WIDE)],
                         ids=["T1", "T7", "T33", "T33-wide-tiles"])
def test_self_attention_fused_qkv(rng, T, NH, HS, tiles, causal):
    buf, qo, ko, vo = fused_qkv(rng, 1, T, NH, HS)
    check(buf, qo, buf, ko, vo, np.ones((1, T), np.uint8), NH, HS, causal, tiles=tiles)


@pytest.mark.parametrize("HS,hs_max", [(4, 16), (12, 12), (12, 16), (6, 6), (10, 16)])
def test_head_sizes(rng, HS, hs_max):
    """Head sizes below hs_max, not a multiple of the thread columns or of 4 (the 16-byte tile
    reads); peaky scores (the online rescaling matters); separate q and kv buffers with the
    heads at odd column offsets."""
    B, T, NH = 1, 9, 2
    C = NH * HS
    q = f32(rng.normal(scale=2.0, size=(B, T, C + 3)))
    kv = f32(rng.normal(scale=2.0, size=(B, T, 2 * C + 5)))
    mask = np.ones((B, T), np.uint8)
    for causal in (False, True):
        check(q, 3, kv, 5, C + 5, mask, NH, HS, causal, tiles=TINY, hs_max=hs_max)


def test_scale_and_default_tiles(rng):
    """No tile arguments (TUNABLES: 128 threads, one key tile here) and a non-default scale."""
    buf, qo, ko, vo = fused_qkv(rng, 1, 12, 1, 8)
    mask = np.ones((1, 12), np.uint8)
    mask[0, 10:] = 0
    check(buf, qo, buf, ko, vo, mask, 1, 8, True, scale=0.7, tiles=None)


# ---------------------------------------------------------------- padding
def padding_masks(T):
    mask = np.ones((5, T), np.uint8)
    mask[1, 1:] = 0          # right padding down to a single real token
    mask[2, :6] = 0          # left padding
    mask[3, 4:8] = 0         # a fully masked key tile in the middle (block_k = 4) ...
    mask[3, [1, 9]] = 0      # ... and holes
    mask[4, :] = 0           # every key masked: out 0, lse -inf
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding(rng, causal):
    T, NH, HS = 13, 1, 8
    buf, qo, ko, vo = fused_qkv(rng, 5, T, NH, HS)
    out, lse = check(buf, qo, buf, ko, vo, padding_masks(T), NH, HS, causal, tiles=SMALL)
    assert np.all(out[4] == 0.0) and np.all(np.isneginf(lse[4]))
    assert np.all(np.isfinite(lse[1]))  # the single real token is seen by every row
    if causal:  # left padding + causal: the first 6 query rows of batch row 2 see nothing
        assert np.all(np.isneginf(lse[2, :, :6])) and np.all(np.isfinite(lse[2, :, 6:]))


def test_all_masked_and_empty_prefix(rng):
    buf, qo, ko, vo = fused_qkv(rng, 1, 6, 2, 4)
    out, lse = run(buf, qo, buf, ko, vo, np.zeros((1, 6), np.uint8), 2, 4, False)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))
    out, lse = run(buf, qo, buf, ko, vo, np.ones((1, 6), np.uint8), 2, 4, True, key_len=0)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_nan_propagates(rng):
    """NaN inputs give NaN outputs (not silently dropped, not mistaken for empty rows)."""
    B, T, NH, HS = 1, 6, 1, 4
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    buf[0, 2, qo] = np.nan   # one query row
    buf[0, 5, vo + 3] = np.nan  # one value entry, seen by every row
    out, lse = run(buf, qo, buf, ko, vo, np.ones((B, T), np.uint8), NH, HS, False)
    assert np.isnan(out[0, 2]).all() and np.isnan(lse[0, 0, 2])
    assert np.isnan(out[0, :, 3]).all() and np.isfinite(np.delete(lse[0, 0], 2)).all()


# ---------------------------------------------------------------- cross-attention, KV-cache prefix
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Tq,Tk", [(5, 13), (9, 4), (1, 6)])
def test_cross_attention(rng, Tq, Tk, causal):
    B, NH, HS = 2, 1, 8
    C = NH * HS
    q = f32(rng.normal(size=(B, Tq, C)))
    kv = f32(rng.normal(size=(B, Tk, 2 * C)))
    mask = np.ones((B, Tk), np.uint8)
    mask[1, : Tk // 3] = 0
    out, lse = check(q, 0, kv, 0, C, mask, NH, HS, causal)
    if causal and Tq > Tk:  # bottom-right alignment: the first Tq - Tk queries see no key
        assert np.all(np.isneginf(lse[:, :, : Tq - Tk]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_kv_cache_prefix(rng, Tq, causal):
    """key_len < kv_buf rows: the rows past key_len (NaN here, mask 1) are never read."""
    B, Tmax, key_len, NH, HS = 2, 16, 11, 1, 8
    C = NH * HS
    q = f32(rng.normal(size=(B, Tq, C)))
    cache = f32(rng.normal(size=(B, Tmax, 2 * C)))
    cache[:, key_len:] = np.nan
    mask = np.ones((B, Tmax), np.uint8)
    mask[1, :2] = 0
    check(q, 0, cache, 0, C, mask, NH, HS, causal, key_len=key_len)


def test_decode_steps_match_full_causal(rng):
    """Tq = 1 against a cache prefix (key_len = t + 1) equals row t of the full causal pass."""
    B, T, NH, HS = 1, 9, 2, 4
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    full, full_lse = run(buf, qo, buf, ko, vo, mask, NH, HS, True)
    for t in (0, 4, T - 1):
        step, step_lse = run(f32(buf[:, t:t + 1]), qo, buf, ko, vo, mask, NH, HS, True,
                             key_len=t + 1)
        assert_close(step[:, 0], full[:, t], atol=1e-6, rtol=1e-5, what=f"decode step {t}")
        assert_close(step_lse[:, :, 0], full_lse[:, :, t], atol=1e-6, rtol=1e-5,
                     what=f"lse step {t}")


# ---------------------------------------------------------------- determinism, dropout
def test_deterministic(rng):
    B, T, NH, HS = 2, 13, 1, 8
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = padding_masks(T)[2:4]
    a = run(buf, qo, buf, ko, vo, mask, NH, HS, True)
    b = run(buf, qo, buf, ko, vo, mask, NH, HS, True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # same values from a separate q buffer and kv buffer as from the fused one
    C = NH * HS
    c = run(f32(buf[:, :, :C]), 0, f32(buf[:, :, C:]), 0, C, mask, NH, HS, True)
    assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # simulator: numpy uint64
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_cpu(rng, causal):
    """Same seed, same counter-based mask as the CPU kernel; lse is that of the undropped scores."""
    B, T, NH, HS = 1, 7, 2, 4
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    mask[0, 5] = 0
    p, seed = 0.3, 1234567
    out, lse = run(buf, qo, buf, ko, vo, mask, NH, HS, causal, dropout_p=p, seed=seed)
    c_out, c_lse = cpu_twin(buf, qo, buf, ko, vo, mask, NH, HS, causal, dropout_p=p, seed=seed)
    compare(out, lse, c_out, c_lse, HS, "CPU kernel with dropout")
    r_out, r_lse = reference(buf, qo, buf, ko, vo, mask, NH, HS, causal)
    compare(np.zeros_like(out), lse, np.zeros_like(out), r_lse, HS, "reference lse")
    assert not np.allclose(out, r_out, atol=1e-3), "dropout changed nothing"


# ---------------------------------------------------------------- validation and helpers
def _args(B=2, Tq=5, Tk=6, NH=2, HS=8):
    C = NH * HS
    d = cuda.to_device
    return dict(out=d(np.zeros((B, Tq, C), np.float32)), lse=d(np.zeros((B, NH, Tq), np.float32)),
                q_buf=d(np.zeros((B, Tq, C), np.float32)), q_off=0,
                kv_buf=d(np.zeros((B, Tk, 2 * C), np.float32)), k_off=0, v_off=C,
                key_mask=d(np.ones((B, Tk), np.uint8)), n_heads=NH, head_size=HS, causal=False,
                scale=0.3)


def _dev(shape, dtype=np.float32):
    return cuda.to_device(np.zeros(shape, dtype))


@pytest.mark.parametrize("change,needle", [
    (lambda: dict(out=np.zeros((2, 5, 16), np.float32)), "out must be a CUDA device array"),
    (lambda: dict(q_buf=[1.0, 2.0]), "q_buf must be a CUDA device array"),
    (lambda: dict(out=_dev((2, 5, 16), np.float64)), "out"),
    (lambda: dict(out=_dev((2, 5, 17))), "out"),
    (lambda: dict(out=_dev((2, 5, 32))[:, :, :16]), "out must be C-contiguous"),
    (lambda: dict(kv_buf=_dev((2, 12, 32))[:, ::2]), "kv_buf must be C-contiguous"),
    (lambda: dict(lse=_dev((2, 5, 2))), "lse"),
    (lambda: dict(q_buf=_dev((2, 5, 16), np.float16)), "q_buf"),
    (lambda: dict(q_buf=_dev((2, 5))), "q_buf"),
    (lambda: dict(q_off=4), "q_off"),
    (lambda: dict(kv_buf=_dev((2, 6, 24))), "v_off"),
    (lambda: dict(kv_buf=_dev((3, 6, 32))), "kv_buf"),
    (lambda: dict(k_off=-1), "k_off"),
    (lambda: dict(key_mask=_dev((2, 6), np.int64)), "key_mask"),
    (lambda: dict(key_mask=_dev((2, 5), np.uint8)), "key_mask"),
    (lambda: dict(n_heads=0), "n_heads"),
    (lambda: dict(key_len=7), "key_len"),
    (lambda: dict(key_len=-1), "key_len"),
    (lambda: dict(dropout_p=1.0), "dropout_p"),
    (lambda: dict(block_q=0), "block_q"),
    (lambda: dict(block_q=128, block_k=128, threads=256), "shared memory"),
    (lambda: dict(threads=2048), "threads"),
    (lambda: dict(block_q=4, block_k=4, threads=3), "threads=3"),
    (lambda: dict(block_q=4, block_k=6, threads=2), "multiple of 4"),
    (lambda: dict(hs_max=4), "hs_max"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_validation(change, needle):
    args = _args()
    args.update(change())
    with pytest.raises(GraphError, match=needle):
        A.attention_forward(**args)


def test_tunables_and_variants():
    assert set(A.TUNABLES) == {"block_q", "block_k", "threads", "hs_max"}
    for cand in A.CANDIDATES:  # every sweep candidate is a valid variant at HS 64
        g = A.check_variant(*cand, 64)
        assert g["shared_bytes"] <= A.SHARED_LIMIT
    assert A.default_tiles(64) == (A.TUNABLES["block_q"], A.TUNABLES["block_k"],
                                   A.TUNABLES["threads"])
    for hs in (80, 96, 128, 256):  # wide heads fall back to tiles that fit
        A.check_variant(*A.default_tiles(hs), hs)
    assert A.get_variant(*TINY, 8) is A.get_variant(*TINY, 8)  # cached per variant


def test_flops():
    assert A.attention_flops(1, 12, 1024, 1024, 64, False) == 4 * 12 * 1024 * 1024 * 64
    assert A.attention_flops(1, 12, 1024, 1024, 64, True) == 2 * 12 * 1024 * 1024 * 64


# ---------------------------------------------------------------- real GPU, realistic shapes
@GPU_ONLY
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_gpt2_shape(rng, causal):
    B, T, NH, HS = 1, 1024, 12, 64
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    check(buf, qo, buf, ko, vo, np.ones((B, T), np.uint8), NH, HS, causal, tiles=None)


GPU_TILES = [A.CANDIDATES[0], (64, 32, 256), (32, 64, 128), (96, 16, 192)]  # the bench checks all


@GPU_ONLY
@pytest.mark.parametrize("tiles", GPU_TILES, ids=[f"{q}x{k}x{t}" for q, k, t in GPU_TILES])
def test_gpu_tiles_padding_prefix(rng, tiles):
    """Tile candidates at a ragged size, with padding and a KV-cache prefix (key_len < rows)."""
    B, Tq, Tmax, key_len, NH, HS = 2, 201, 300, 257, 2, 64
    C = NH * HS
    q = f32(rng.normal(size=(B, Tq, C)))
    cache = f32(rng.normal(size=(B, Tmax, 2 * C)))
    cache[:, key_len:] = np.nan
    mask = np.ones((B, Tmax), np.uint8)
    mask[1, 200:] = 0
    mask[1, 40:90] = 0
    for causal in (False, True):
        check(q, 0, cache, 0, C, mask, NH, HS, causal, tiles=tiles, key_len=key_len)


@GPU_ONLY
@pytest.mark.parametrize("HS", [80, 128])
def test_gpu_head_sizes_default_tiles(rng, HS):
    B, T, NH = 2, 333, 4
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS, spread=2.0)
    mask = np.ones((B, T), np.uint8)
    mask[0, 300:] = 0
    for causal in (False, True):
        check(buf, qo, buf, ko, vo, mask, NH, HS, causal, tiles=None)


@GPU_ONLY
def test_gpu_dropout_matches_cpu(rng):
    """The device port of rng.keep gives the CPU's mask bit for bit (uint64 hash on the GPU)."""
    B, T, NH, HS = 1, 300, 2, 64
    buf, qo, ko, vo = fused_qkv(rng, B, T, NH, HS)
    mask = np.ones((B, T), np.uint8)
    for causal in (False, True):
        out, lse = run(buf, qo, buf, ko, vo, mask, NH, HS, causal, tiles=None, dropout_p=0.1,
                       seed=99)
        c_out, c_lse = cpu_twin(buf, qo, buf, ko, vo, mask, NH, HS, causal, dropout_p=0.1, seed=99)
        compare(out, lse, c_out, c_lse, HS, "CPU kernel with dropout")
