"""CUDA attention backward (nbformer.kernels.cuda.attention_backward) against the float64 reference
(test_attention_backward_cpu.ref_attention_backward, the one the CPU kernel is tested with) and
against its CPU twin (nbformer.kernels.cpu.attention_backward) on the same inputs, out/lse from the
CPU forward.

Under Numba's simulator (the default here, see conftest.py) every CUDA thread is a Python thread:
tiny shapes, tiles of 4 keys/queries and 4 threads, so multi-tile paths, ragged tails, skipped
tiles and every mask case still run. Gradient tolerance: 1e-4 relative to the largest gradient of
that tensor (DESIGN.md, what the CPU tests assert). GPU-only tests run realistic shapes when
NBFORMER_TEST_GPU=1 on a CUDA machine.
"""
import math

import numpy as np
import pytest

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu.attention import attention_forward as cpu_forward
from nbformer.kernels.cpu.attention_backward import attention_backward as cpu_backward
from nbformer.kernels.cuda import attention_backward as AB
from nbformer.kernels.cuda._jit import SIMULATOR, cuda
from test_attention_backward_cpu import _keep_mask, ref_attention_backward

TINY = (4, 4, 4)     # block_q, block_k, threads
SMALL = (8, 8, 4)
GPU_ONLY = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: real GPU only "
                                                "(NBFORMER_TEST_GPU=1 on a CUDA machine)")
# the simulator runs the SplitMix64 hash on numpy uint64 scalars, which warn on (intended) wraparound
DROPOUT_WARNINGS = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


class Case:
    """One attention problem: inputs, the CPU forward's out/lse, and dout."""

    def __init__(self, rng, B, NH, HS, Tq, Tk, causal, mask, fused, p=0.0, seed=5, scale=None,
                 pad=(0, 0), spread=1.0):
        C = NH * HS
        self.B, self.NH, self.HS, self.Tq, self.Tk, self.C = B, NH, HS, Tq, Tk, C
        self.causal, self.mask, self.fused, self.p, self.seed = causal, mask, fused, p, seed
        self.scale = 1.0 / math.sqrt(HS) if scale is None else scale
        if fused:
            assert Tq == Tk
            self.q_buf = f32(rng.normal(scale=spread, size=(B, Tq, 3 * C + pad[0])))
            self.kv_buf = self.q_buf
            self.q_off, self.k_off, self.v_off = pad[0], pad[0] + C, pad[0] + 2 * C
        else:  # heads at odd column offsets of separate buffers
            self.q_buf = f32(rng.normal(scale=spread, size=(B, Tq, C + pad[0])))
            self.kv_buf = f32(rng.normal(scale=spread, size=(B, Tk, 2 * C + pad[1])))
            self.q_off, self.k_off, self.v_off = pad[0], pad[1], pad[1] + C
        self.out = np.full((B, Tq, C), np.nan, np.float32)
        self.lse = np.full((B, NH, Tq), np.nan, np.float32)
        cpu_forward(self.out, self.lse, self.q_buf, self.q_off, self.kv_buf, self.k_off, self.v_off, mask,
                    NH, HS, causal, self.scale, dropout_p=p, seed=seed)
        self.dout = f32(rng.normal(size=(B, Tq, C)))

    def grads(self, dq_buf, dkv_buf):
        C = self.C
        return (dq_buf[..., self.q_off:self.q_off + C], dkv_buf[..., self.k_off:self.k_off + C],
                dkv_buf[..., self.v_off:self.v_off + C])

    def cuda(self, tiles=TINY, **kw):
        """The CUDA kernel on device copies (NaN-filled gradients, one copy when fused)."""
        d = cuda.to_device
        q = d(self.q_buf)
        kv = q if self.fused else d(self.kv_buf)
        dq = d(np.full_like(self.q_buf, np.nan))
        dkv = dq if self.fused else d(np.full_like(self.kv_buf, np.nan))
        delta = d(np.full((self.B, self.NH, self.Tq), np.nan, np.float32))
        if tiles is not None:
            kw.update(block_q=tiles[0], block_k=tiles[1], threads=tiles[2])
        AB.attention_backward(dq, dkv, delta, d(self.dout), d(self.out), d(self.lse), q, self.q_off, kv,
                              self.k_off, self.v_off, d(self.mask), self.NH, self.HS, self.causal, self.scale,
                              dropout_p=self.p, seed=self.seed, **kw)
        cuda.synchronize()
        dq_h = dq.copy_to_host()
        return dq_h, (dq_h if self.fused else dkv.copy_to_host()), delta.copy_to_host()

    def cpu(self):
        dq = np.full_like(self.q_buf, np.nan)
        dkv = dq if self.fused else np.full_like(self.kv_buf, np.nan)
        delta = np.full((self.B, self.NH, self.Tq), np.nan, np.float32)
        blk = 4 if max(self.Tq, self.Tk) <= 64 else 32  # multi-tile CPU paths on small inputs too
        cpu_backward(dq, dkv, delta, self.dout, self.out, self.lse, self.q_buf, self.q_off, self.kv_buf,
                     self.k_off, self.v_off, self.mask, self.NH, self.HS, self.causal, self.scale,
                     dropout_p=self.p, seed=self.seed, block_q=blk, block_k=blk)
        return dq, dkv, delta

    def reference(self):
        """float64 (dq, dk, dv) in (B, T, C) layout."""
        C, NH = self.C, self.NH
        q = ref.split_heads(self.q_buf[..., self.q_off:self.q_off + C], NH)
        k = ref.split_heads(self.kv_buf[..., self.k_off:self.k_off + C], NH)
        v = ref.split_heads(self.kv_buf[..., self.v_off:self.v_off + C], NH)
        drop = None
        if self.p > 0:
            drop = _keep_mask(self.B, NH, self.Tq, self.Tk, self.seed, self.p) / (1 - self.p)
        _, dq, dk, dv = ref_attention_backward(q, k, v, ref.split_heads(self.dout, NH), self.mask, self.causal,
                                               self.scale, drop)
        return tuple(ref.merge_heads(g) for g in (dq, dk, dv))


def close(got, want, what):
    tol = 1e-4 * max(1.0, float(np.abs(want).max(initial=0.0)))
    assert_close(got, want, atol=tol, rtol=0.0, what=what)


def check(case, tiles=TINY, twin=True, **kw):
    """CUDA gradients vs float64 and vs the CPU kernel; also that nothing outside the gradient
    columns was written (NaN fill survives there) and that delta matches the CPU's bits."""
    dq_buf, dkv_buf, delta = case.cuda(tiles, **kw)
    got = case.grads(dq_buf, dkv_buf)
    for name, g in zip(("dq", "dk", "dv"), got):
        assert np.isfinite(g).all(), f"{name} has NaN/inf (or was not written fully)"
    for name, g, w in zip(("dq", "dk", "dv"), got, case.reference()):
        close(g, w, f"{name} vs float64 reference")
    if twin:
        c_dq, c_dkv, c_delta = case.cpu()
        for name, g, w in zip(("dq", "dk", "dv"), got, case.grads(c_dq, c_dkv)):
            close(g, w, f"{name} vs CPU kernel")
        assert np.array_equal(delta, c_delta), "delta differs from the CPU kernel's bits"
        # columns outside the gradient ranges are left alone by both kernels
        assert np.array_equal(np.isnan(dq_buf), np.isnan(c_dq))
        assert np.array_equal(np.isnan(dkv_buf), np.isnan(c_dkv))
    return got


def padded_mask(B, T, kind):
    mask = np.ones((B, T), np.uint8)
    if kind == "right" and B > 1:
        mask[-1, 1:] = 0            # a row padded down to a single token
    elif kind == "left" and B > 1:
        mask[0, : T // 2] = 0
    return mask


# ---------------------------------------------------------------- self-attention, fused qkv buffer
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T,B,NH,HS,tiles", [(1, 2, 3, 4, TINY), (7, 2, 3, 8, TINY), (33, 2, 1, 8, SMALL),
                                              (33, 1, 2, 4, TINY)],
                         ids=["T1", "T7", "T33", "T33-tiny"])
def test_self_attention_fused_qkv(rng, T, B, NH, HS, tiles, causal):
    """dq_buf is dkv_buf (one fused gradient buffer); a batch row padded down to one token."""
    case = Case(rng, B, NH, HS, T, T, causal, padded_mask(B, T, "right"), fused=True, pad=(3, 0))
    check(case, tiles)


@pytest.mark.parametrize("HS,NH", [(5, 3), (12, 2)])
def test_head_sizes_and_offsets(rng, HS, NH):
    """Odd head sizes (not a multiple of the accumulator's thread columns), odd head counts, heads at
    odd column offsets of separate q and kv buffers, peaky scores, a non-default scale."""
    for causal in (False, True):
        case = Case(rng, 1, NH, HS, 9, 9, causal, np.ones((1, 9), np.uint8), fused=False, pad=(3, 5),
                    spread=2.0, scale=0.3)
        check(case, TINY)


# ---------------------------------------------------------------- padding
def padding_masks(T):
    mask = np.ones((5, T), np.uint8)
    mask[1, 1:] = 0          # right padding down to a single real token
    mask[2, :6] = 0          # left padding (causal: the first rows see nothing)
    mask[3, 4:8] = 0         # a fully masked key tile in the middle (block_k = 4) ...
    mask[3, [1, 9]] = 0      # ... and holes
    mask[4, :] = 0           # every key masked: gradients 0
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding(rng, causal):
    T = 13
    case = Case(rng, 5, 1, 4, T, T, causal, padding_masks(T), fused=True)
    dq, dk, dv = check(case, TINY)
    assert np.all(dq[4] == 0) and np.all(dk[4] == 0) and np.all(dv[4] == 0)
    assert np.all(dk[3, 4:8] == 0) and np.all(dv[3, 4:8] == 0)  # the skipped key tile: zeros written
    assert np.all(dk[1, 1:] == 0) and np.all(dv[1, 1:] == 0)
    if causal:
        assert np.all(dq[2, :6] == 0)  # rows that see no key


def test_huge_scores_on_padded_keys_do_not_leak(rng):
    """A padded key whose score would overflow exp must not turn gradients into NaN."""
    B, NH, HS, T = 1, 1, 8, 9
    C = NH * HS
    mask = np.ones((B, T), np.uint8)
    mask[0, 4] = 0
    case = Case(rng, B, NH, HS, T, T, False, mask, fused=True)
    case.q_buf[0, 4, C:2 * C] = 1e4 * np.sign(case.q_buf[0, :, :C].sum(0))  # key 4: enormous scores
    cpu_forward(case.out, case.lse, case.q_buf, 0, case.q_buf, C, 2 * C, mask, NH, HS, False, case.scale)
    dq, dk, dv = check(case, TINY)
    assert np.all(dk[0, 4] == 0) and np.all(dv[0, 4] == 0)


# ---------------------------------------------------------------- cross-attention
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Tq,Tk", [(5, 13), (13, 5), (1, 9), (4, 9)])
def test_cross_attention(rng, Tq, Tk, causal):
    """Tq != Tk, bottom-right causal alignment (Tq > Tk: the first rows see no key), left padding."""
    case = Case(rng, 2, 2, 4, Tq, Tk, causal, padded_mask(2, Tk, "left"), fused=False, pad=(1, 3))
    dq, _, _ = check(case, TINY)
    if causal and Tq > Tk:
        assert np.all(dq[:, : Tq - Tk] == 0)


def test_no_keys_writes_zero_dq(rng):
    """Tk = 0: dq = 0 and delta written (the CPU kernel returns without writing anything here)."""
    B, NH, HS, Tq = 1, 2, 4, 3
    C = NH * HS
    d = cuda.to_device
    dq = d(np.full((B, Tq, C), np.nan, np.float32))
    delta = d(np.full((B, NH, Tq), np.nan, np.float32))
    z = np.zeros((B, Tq, C), np.float32)
    AB.attention_backward(dq, d(np.zeros((B, 0, 2 * C), np.float32)), delta, d(z), d(z),
                          d(np.full((B, NH, Tq), -np.inf, np.float32)), d(z), 0,
                          d(np.zeros((B, 0, 2 * C), np.float32)), 0, C, d(np.zeros((B, 0), np.uint8)), NH, HS,
                          True, 0.5)
    assert np.all(dq.copy_to_host() == 0) and np.all(delta.copy_to_host() == 0)


# ---------------------------------------------------------------- dropout
@DROPOUT_WARNINGS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_cpu(rng, causal):
    """dropout_p 0.1 with a seed: the CPU forward's out (dropped), the same regenerated mask as the
    CPU backward and the float64 reference with rng.keep's mask."""
    B, T = 2, 11
    case = Case(rng, B, 3, 4, T, T, causal, padded_mask(B, T, "right"), fused=True, p=0.1, seed=987654321)
    check(case, TINY)
    a = case.grads(*case.cuda()[:2])
    case.p = 0.0
    b = case.grads(*case.cuda()[:2])
    assert not np.allclose(a[2], b[2], atol=1e-3), "dropout changed nothing"


@DROPOUT_WARNINGS
def test_dropout_drops_exactly_the_cpu_elements(rng):
    """q = 0 (uniform P = 1/Tk), dO[i] = one-hot(i): dV[j, i] = keep(b, h, i, j) / (Tk (1 - p)), so the
    dropped elements are read off dV and compared, element by element, with rng.keep's mask."""
    B, NH, HS, T, p, seed = 2, 3, 8, 7, 0.1, 2024
    case = Case(rng, B, NH, HS, T, T, False, np.ones((B, T), np.uint8), fused=True, p=p, seed=seed)
    case.q_buf[..., :case.C] = 0.0
    case.dout = np.zeros_like(case.dout)
    for h in range(NH):
        for i in range(T):
            case.dout[:, i, h * HS + i] = 1.0
    cpu_forward(case.out, case.lse, case.q_buf, 0, case.q_buf, case.C, 2 * case.C, case.mask, NH, HS, False,
                case.scale, dropout_p=p, seed=seed)
    _, _, dv = case.grads(*case.cuda()[:2])
    dv = ref.split_heads(dv, NH)  # (B, NH, Tk, HS): dv[b, h, j, i]
    kept = dv[..., :T].transpose(0, 1, 3, 2) * T * (1 - p)  # (B, NH, Tq, Tk)
    assert np.all((np.abs(kept - 1) < 1e-3) | (kept == 0))
    want = _keep_mask(B, NH, T, T, seed, p)
    assert 0 < (want == 0).sum() < want.size
    assert np.array_equal(kept > 0.5, want > 0.5)


# ---------------------------------------------------------------- determinism, tiles, end to end
def test_deterministic(rng):
    case = Case(rng, 2, 2, 8, 13, 13, True, padding_masks(13)[2:4], fused=True)
    a = case.cuda(TINY)
    b = case.cuda(TINY)
    for x, y in zip(a, b):
        assert np.array_equal(x, y, equal_nan=True)
    c = case.grads(*case.cuda(SMALL)[:2])  # other tiles: another summation order, same values
    for x, y in zip(case.grads(*a[:2]), c):
        close(x, y, "tiles (4,4,4) vs (8,8,4)")


def test_default_tiles(rng):
    """No tile keyword: TUNABLES (simulator-small here) through default_tiles."""
    case = Case(rng, 1, 1, 8, 6, 6, True, np.ones((1, 6), np.uint8), fused=True)
    check(case, tiles=None)


def test_with_the_cuda_forward(rng):
    """out/lse from the CUDA forward, the whole attention on the device."""
    from nbformer.kernels.cuda.attention import attention_forward as cuda_forward

    B, NH, HS, T = 2, 2, 4, 9
    case = Case(rng, B, NH, HS, T, T, True, padded_mask(B, T, "left"), fused=True)
    C = NH * HS
    d_qkv, d_mask = cuda.to_device(case.q_buf), cuda.to_device(case.mask)
    d_out = cuda.to_device(np.full_like(case.out, np.nan))
    d_lse = cuda.to_device(np.full_like(case.lse, np.nan))
    cuda_forward(d_out, d_lse, d_qkv, 0, d_qkv, C, 2 * C, d_mask, NH, HS, True, case.scale, block_q=4,
                 block_k=4, threads=4)
    case.out, case.lse = d_out.copy_to_host(), d_lse.copy_to_host()
    for name, g, w in zip(("dq", "dk", "dv"), case.grads(*case.cuda()[:2]), case.reference()):
        close(g, w, f"{name} (CUDA forward + backward) vs float64 reference")


# ---------------------------------------------------------------- validation and helpers
def _args(B=2, Tq=5, Tk=6, NH=2, HS=4):
    C = NH * HS
    d = cuda.to_device
    return dict(dq_buf=d(np.zeros((B, Tq, C), np.float32)), dkv_buf=d(np.zeros((B, Tk, 2 * C), np.float32)),
                delta=d(np.zeros((B, NH, Tq), np.float32)), dout=d(np.zeros((B, Tq, C), np.float32)),
                out=d(np.zeros((B, Tq, C), np.float32)), lse=d(np.zeros((B, NH, Tq), np.float32)),
                q_buf=d(np.zeros((B, Tq, C), np.float32)), q_off=0,
                kv_buf=d(np.zeros((B, Tk, 2 * C), np.float32)), k_off=0, v_off=C,
                key_mask=d(np.ones((B, Tk), np.uint8)), n_heads=NH, head_size=HS, causal=False, scale=0.5,
                block_q=4, block_k=4, threads=4)


def _dev(shape, dtype=np.float32):
    return cuda.to_device(np.zeros(shape, dtype))


def _views(big, first, second):
    """Two overlapping views (batch rows 0-1 and 1-2) of one device buffer."""
    return {first: big[0:2], second: big[1:3]}


@pytest.mark.parametrize("change,needle", [
    (lambda a: dict(dq_buf=np.zeros((2, 5, 8), np.float32)), "dq_buf must be a CUDA device array"),
    (lambda a: dict(q_buf=[1.0]), "q_buf must be a CUDA device array"),
    (lambda a: dict(dout=_dev((2, 5, 8), np.float64)), "dout"),
    (lambda a: dict(out=_dev((2, 5, 9))), "out must have shape"),
    (lambda a: dict(lse=_dev((2, 3, 5))), "lse must have shape"),
    (lambda a: dict(delta=_dev((2, 2, 6))), "delta must have shape"),
    (lambda a: dict(dkv_buf=_dev((2, 6, 15))), "dkv_buf must have shape"),
    (lambda a: dict(dq_buf=_dev((2, 5, 16))[:, :, :8]), "dq_buf must be C-contiguous"),
    (lambda a: dict(kv_buf=_dev((3, 6, 16))), "kv_buf batch"),
    (lambda a: dict(key_mask=_dev((2, 6), np.int64)), "key_mask"),
    (lambda a: dict(key_mask=_dev((2, 5), np.uint8)), "key_mask"),
    (lambda a: dict(q_off=1), "q_off"),
    (lambda a: dict(v_off=9), "v_off"),
    (lambda a: dict(k_off=-1), "k_off"),
    (lambda a: dict(v_off=4), "overlap"),
    (lambda a: dict(n_heads=0), "n_heads"),
    (lambda a: dict(head_size=2.5), "head_size"),
    (lambda a: dict(dropout_p=1.0), "dropout_p"),
    (lambda a: dict(dropout_p=-0.1), "dropout_p"),
    (lambda a: dict(block_q=0), "block_q"),
    (lambda a: dict(threads=2048), "threads"),
    (lambda a: dict(block_q=4, block_k=4, threads=3), "threads=3"),
    (lambda a: dict(block_q=128, block_k=128, threads=256), "shared memory"),
    (lambda a: dict(block_q=32, block_k=32, threads=1), "floats per thread"),
    (lambda a: dict(dq_buf=a["q_buf"]), "dq_buf overlaps q_buf"),
    (lambda a: dict(dkv_buf=a["kv_buf"]), "dkv_buf overlaps kv_buf"),
    (lambda a: dict(delta=a["lse"]), "delta overlaps lse"),
    (lambda a: _views(_dev((4, 5, 8)), "q_buf", "dq_buf"), "dq_buf overlaps q_buf"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_validation(change, needle):
    args = _args()
    args.update(change(args))
    with pytest.raises(GraphError, match=needle):
        AB.attention_backward(**args)


def test_fused_gradient_buffer_validation():
    """dq_buf is dkv_buf: the q columns must not overlap the k/v columns; partly overlapping
    gradient buffers are refused."""
    B, T, NH, HS = 2, 4, 1, 4
    d = cuda.to_device
    qkv, g = d(np.zeros((B, T, 12), np.float32)), d(np.zeros((B, T, 12), np.float32))
    rest = (d(np.zeros((B, NH, T), np.float32)), d(np.zeros((B, T, 4), np.float32)),
            d(np.zeros((B, T, 4), np.float32)), d(np.zeros((B, NH, T), np.float32)), qkv)
    mask = d(np.ones((B, T), np.uint8))
    with pytest.raises(GraphError, match="q_off=2 overlaps"):
        AB.attention_backward(g, g, *rest, 2, qkv, 4, 8, mask, NH, HS, False, 0.5)
    big = _dev((3, T, 12))
    with pytest.raises(GraphError, match="not the same array"):
        AB.attention_backward(big[0:2], big[1:3], *rest, 0, qkv, 4, 8, mask, NH, HS, False, 0.5)
    AB.attention_backward(g, g, *rest, 0, qkv, 4, 8, mask, NH, HS, False, 0.5)  # the valid call


def test_tunables_and_variants():
    assert set(AB.TUNABLES) == {"block_q", "block_k", "threads"}
    for cand in AB.CANDIDATES:  # every sweep candidate is valid at HS 64
        g = AB.check_variant(*cand, 64)
        assert max(g["smem_dq"], g["smem_dkdv"]) <= AB.SHARED_LIMIT
    for hs in (64, 80, 128, 256):  # wide heads fall back to tiles that fit
        AB.check_variant(*AB.default_tiles(hs), hs)
    assert AB.get_variants(*TINY, 8) is AB.get_variants(*TINY, 8)  # cached per variant
    assert AB.attention_backward_flops(1, 12, 1024, 1024, 64, True) == 5 * 12 * 1024 * 1024 * 64


# ---------------------------------------------------------------- real GPU, realistic shapes
@GPU_ONLY
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_gpt2_shape(rng, causal):
    B, NH, HS, T = 1, 12, 64, 1024
    case = Case(rng, B, NH, HS, T, T, causal, np.ones((B, T), np.uint8), fused=True)
    check(case, tiles=None)


@GPU_ONLY
@DROPOUT_WARNINGS
@pytest.mark.parametrize("tiles", AB.CANDIDATES[:4], ids=lambda t: "x".join(map(str, t)))
def test_gpu_candidates_padding_dropout(rng, tiles):
    B, NH, HS, T = 2, 4, 64, 200
    case = Case(rng, B, NH, HS, T, T, True, padded_mask(B, T, "right"), fused=True, p=0.1, seed=11)
    check(case, tiles)
