"""CUDA kernels (all but sampling, see test_cuda_sampling.py) against the float64 reference and
against their CPU twins on the same inputs.

Without a GPU they run under Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1
unless NBFORMER_TEST_GPU=1): one Python thread per CUDA thread, one block at a time, so the shapes
are tiny and the launchers get tiny threads-per-block / grid caps (multi-block, grid-stride and
tail paths still run). The realistic shapes are GPU-only parametrizations.
"""
import sys

import numpy as np
import pytest
from numba import cuda

import reference as ref
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu import elementwise as cpu_ew
from nbformer.kernels.cpu import embedding as cpu_emb
from nbformer.kernels.cpu import kv_cache as cpu_kv
from nbformer.kernels.cpu import layernorm as cpu_ln
from nbformer.kernels.cpu import pooling as cpu_pool
from nbformer.kernels.cpu import softmax as cpu_sm
from nbformer.kernels.cuda import elementwise as ew
from nbformer.kernels.cuda import embedding as emb
from nbformer.kernels.cuda import kv_cache as kv
from nbformer.kernels.cuda import layernorm as ln
from nbformer.kernels.cuda import pooling as pool
from nbformer.kernels.cuda import softmax as sm
from nbformer.kernels.cuda._jit import SIMULATOR

gpu_only = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: real GPU only (NBFORMER_TEST_GPU=1)")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN / -inf rows

# tiny launches under the simulator; the TUNABLES defaults on a GPU
ROW = {"threads": 4} if SIMULATOR else {}  # one block per row, tree reductions
FLAT = {"threads": 8, "max_blocks": 2} if SIMULATOR else {}  # grid-stride kernels


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator():
    """The simulator's block manager polls its threads: a short GIL switch interval makes each
    syncthreads() hand-off ~10x cheaper (restored after this module)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


# ---------------------------------------------------------------- embedding
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (1, 33)])
@pytest.mark.parametrize("variant", ["tok", "tok+pos+type", "scaled+pos"])
def test_embedding(rng, B, T, variant):
    V, P, C = 11, 40, 5  # C not a multiple of the block
    wte, wpe, wtt = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(P, C))), f32(rng.normal(size=(3, C)))
    ids, pos, typ = rng.integers(0, V, (B, T)), rng.integers(0, P, (B, T)), rng.integers(0, 3, (B, T))
    use_pos, use_type = "pos" in variant, "type" in variant
    scale = 4.0 if "scaled" in variant else 1.0
    args = (wte, pos if use_pos else None, wpe if use_pos else None, typ if use_type else None,
            wtt if use_type else None)
    out = cuda.device_array((B, T, C), np.float32)
    emb.embedding_forward(out, dev(ids), dev(args[0]), *(None if a is None else dev(a) for a in args[1:]),
                          scale=scale, **FLAT)
    want = ref.embedding(ids, wte, args[2], pos, args[4], typ, scale)
    assert_close(host(out), want, atol=1e-6, rtol=1e-6)
    cpu = np.empty((B, T, C), np.float32)
    cpu_emb.embedding_forward(cpu, ids, *args, scale)
    assert_close(host(out), cpu, atol=1e-6, rtol=1e-6, what="vs CPU")


def test_embedding_checks_shapes_and_dtypes(rng):
    wte = dev(f32(rng.normal(size=(10, 4))))
    out = cuda.device_array((1, 3, 4), np.float32)
    with pytest.raises(GraphError, match="'ids'"):
        emb.embedding_forward(out, dev(np.array([[1, 2, 3]], np.int32)), wte)  # int64 expected
    with pytest.raises(GraphError, match="'ids'"):
        emb.embedding_forward(out, dev(np.array([[1, 2]])), wte)
    with pytest.raises(GraphError, match="'ids'.*device"):
        emb.embedding_forward(out, np.array([[1, 2, 3]]), wte)
    with pytest.raises(GraphError, match="'wpe'"):
        emb.embedding_forward(out, dev(np.array([[1, 2, 3]])), wte, dev(np.array([[0, 1, 2]])),
                              dev(f32(np.zeros((5, 3)))))
    with pytest.raises(GraphError, match="'pos_ids'"):
        emb.embedding_forward(out, dev(np.array([[1, 2, 3]])), wte, None, dev(f32(np.zeros((5, 4)))))


# ---------------------------------------------------------------- layernorm
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 37), (2, 3, 9)])
def test_layernorm(rng, shape):
    C = shape[-1]
    x = f32(rng.normal(3.0, 2.0, size=shape))
    w, b = f32(rng.normal(size=C)), f32(rng.normal(size=C))
    out, mean, rstd = (cuda.device_array(shape, np.float32), cuda.device_array(shape[:-1], np.float32),
                       cuda.device_array(shape[:-1], np.float32))
    ln.layernorm_forward(out, mean, rstd, dev(x), dev(w), dev(b), 1e-5, **ROW)
    o, m, r = ref.layernorm(x, w, b, 1e-5)
    assert_close(host(out), o, atol=1e-5, rtol=1e-5, what="out")
    assert_close(host(mean), m, atol=1e-6, rtol=1e-6, what="mean")
    assert_close(host(rstd), r, atol=1e-6, rtol=1e-6, what="rstd")
    co, cm, cr = np.empty_like(x), np.empty(shape[:-1], np.float32), np.empty(shape[:-1], np.float32)
    cpu_ln.layernorm_forward(co, cm, cr, x, w, b, 1e-5)
    assert_close(host(out), co, atol=1e-6, rtol=1e-6, what="out vs CPU")
    assert_close(host(mean), cm, atol=0, rtol=2.5e-7, what="mean vs CPU")  # <= 1 float32 ulp
    assert_close(host(rstd), cr, atol=0, rtol=2.5e-7, what="rstd vs CPU")


def test_layernorm_in_an_arena_view_and_deterministic(rng):
    N, C = 6, 13
    x = f32(rng.normal(size=(N, C)))
    w, b = f32(rng.normal(size=C)), f32(rng.normal(size=C))
    arena = cuda.device_array(3 * N * C + 2 * N, np.float32)  # out, x, mean, rstd views of one buffer
    out, xd = arena[: N * C].reshape(N, C), arena[N * C: 2 * N * C].reshape(N, C)
    mean, rstd = arena[2 * N * C: 2 * N * C + N], arena[2 * N * C + N: 2 * N * C + 2 * N]
    xd.copy_to_device(x)
    wd, bd = dev(w), dev(b)
    ln.layernorm_forward(out, mean, rstd, xd, wd, bd, 1e-5, threads=8 if SIMULATOR else None)
    first = host(out).copy()
    ln.layernorm_forward(out, mean, rstd, xd, wd, bd, 1e-5, threads=8 if SIMULATOR else None)
    assert np.array_equal(host(out).view(np.uint32), first.view(np.uint32))
    assert_close(first, ref.layernorm(x, w, b, 1e-5)[0], atol=1e-5, rtol=1e-5)


def test_layernorm_rejects_bad_arguments(rng):
    x = dev(f32(rng.normal(size=(3, 8))))
    w, b = dev(f32(np.ones(8))), dev(f32(np.zeros(8)))
    out, m, r = cuda.device_array((3, 8), np.float32), *(cuda.device_array(3, np.float32) for _ in "mr")
    with pytest.raises(GraphError, match="'w'"):
        ln.layernorm_forward(out, m, r, x, dev(f32(np.ones(7))), b, 1e-5)
    with pytest.raises(GraphError, match="'mean'"):
        ln.layernorm_forward(out, cuda.device_array(4, np.float32), r, x, w, b, 1e-5)
    with pytest.raises(GraphError, match="'x'.*float32"):
        ln.layernorm_forward(out, m, r, dev(np.zeros((3, 8))), w, b, 1e-5)
    with pytest.raises(GraphError, match="'x'.*contiguous"):
        big = dev(f32(np.zeros((3, 16))))
        ln.layernorm_forward(out, m, r, big[:, :8], w, b, 1e-5)
    with pytest.raises(GraphError, match="'out'.*device"):
        ln.layernorm_forward(np.zeros((3, 8), np.float32), m, r, x, w, b, 1e-5)
    with pytest.raises(GraphError, match="power of two"):
        ln.layernorm_forward(out, m, r, x, w, b, 1e-5, threads=6)


# ---------------------------------------------------------------- softmax
@pytest.mark.parametrize("N,V", [(1, 1), (7, 5), (3, 33)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(rng, N, V, log):
    x = f32(rng.normal(0.0, 3.0, size=(N, V)))
    if V > 1:
        x[0, ::2] = -np.inf  # a partly masked row
    out = cuda.device_array((N, V), np.float32)
    (sm.log_softmax_forward if log else sm.softmax_forward)(out, dev(x), **ROW)
    want = (ref.log_softmax if log else ref.softmax)(x)
    assert_close(host(out), want, atol=1e-6, rtol=1e-5)
    cpu = np.empty_like(x)
    (cpu_sm.log_softmax_forward if log else cpu_sm.softmax_forward)(cpu, x)
    assert_close(host(out), cpu, atol=1e-7, rtol=1e-6, what="vs CPU")


def test_softmax_all_masked_row_is_nan_and_in_place_is_fine(rng):
    x = f32(rng.normal(size=(3, 6)))
    x[1] = -np.inf
    for fn, cpu_fn, want in ((sm.softmax_forward, cpu_sm.softmax_forward, ref.softmax),
                             (sm.log_softmax_forward, cpu_sm.log_softmax_forward, ref.log_softmax)):
        buf = dev(x)
        fn(buf, buf, **ROW)  # in place: out aliases x
        got = host(buf)
        cpu = np.empty_like(x)
        cpu_fn(cpu, x)
        assert np.isnan(got[1]).all() and np.isnan(cpu[1]).all()
        rows = [0, 2]
        assert_close(got[rows], want(x[rows]), atol=1e-6, rtol=1e-5)


def test_softmax_deterministic_and_checked(rng):
    x = dev(f32(rng.normal(size=(2, 19))))
    a, b = cuda.device_array((2, 19), np.float32), cuda.device_array((2, 19), np.float32)
    sm.softmax_forward(a, x, **ROW)
    sm.softmax_forward(b, x, **ROW)
    assert np.array_equal(host(a).view(np.uint32), host(b).view(np.uint32))
    with pytest.raises(GraphError, match="'out'"):
        sm.softmax_forward(cuda.device_array((2, 18), np.float32), x)
    with pytest.raises(GraphError, match="'x'.*device"):
        sm.log_softmax_forward(a, np.zeros((2, 19), np.float32))


# ---------------------------------------------------------------- pooling
def _mask(B, T, rng):
    m = np.zeros((B, T), np.uint8)
    m[0] = 1  # full row
    m[1, :1] = 1  # padded down to one token
    # row 2: all padding
    if B > 3:
        m[3] = rng.integers(0, 2, T)  # holes
        m[3, 0] = 1
    return m


@pytest.mark.parametrize("T", [1, 7, 33])
def test_pool_all_modes(rng, T):
    B, C = 4, 5
    x = f32(rng.normal(size=(B, T, C)))
    mask = _mask(B, T, rng)
    xd, md = dev(x), dev(mask)
    real = mask.any(1)
    for mode in cpu_pool.MODES:
        out = cuda.device_array((B, C), np.float32)
        pool.pool(out, xd, md, mode, **FLAT)
        got = host(out)
        cpu = np.empty((B, C), np.float32)
        cpu_pool.pool(cpu, x, mask, mode)
        assert np.array_equal(got, cpu), f"{mode}: not the CPU's bits (same float64 sums in the same order)"
        # the reference agrees on rows with tokens (an all-padding row pools to 0 / token 0, as the CPU)
        assert_close(got[real], ref.pool(x, mask, mode)[real], atol=1e-6, rtol=1e-6, what=mode)
        if mode in ("mean", "max", "mean_sqrt_len"):
            assert np.all(got[~real] == 0.0)


def test_pool_rejects_bad_arguments(rng):
    x, mask = dev(f32(rng.normal(size=(2, 3, 4)))), dev(np.ones((2, 3), np.uint8))
    out = cuda.device_array((2, 4), np.float32)
    with pytest.raises(GraphError, match="mode"):
        pool.pool(out, x, mask, "sum")
    with pytest.raises(GraphError, match="'mask'"):
        pool.pool(out, x, dev(np.ones((2, 3), np.int64)), "mean")
    with pytest.raises(GraphError, match="'out'"):
        pool.pool(cuda.device_array((2, 5), np.float32), x, mask, "mean")


@pytest.mark.parametrize("shape", [(1, 1), (4, 37)])
def test_l2_normalize(rng, shape):
    x = f32(rng.normal(size=shape))
    x[-1] = 0.0  # a zero row stays zero (eps 1e-12)
    d = dev(x)
    pool.l2_normalize(d, **ROW)
    got = host(d)
    want = ref.f64(x) / np.maximum(np.linalg.norm(ref.f64(x), axis=-1, keepdims=True), 1e-12)
    assert_close(got, want, atol=1e-6, rtol=1e-6)
    cpu = x.copy()
    cpu_pool.l2_normalize(cpu)
    assert_close(got, cpu, atol=1e-7, rtol=1e-6, what="vs CPU")
    d2 = dev(x)
    pool.l2_normalize(d2, **ROW)
    assert np.array_equal(host(d2).view(np.uint32), got.view(np.uint32))


# ---------------------------------------------------------------- kv cache
def test_kv_write_matches_cpu(rng):
    B, Tmax, C = 2, 9, 3
    cache0 = f32(rng.normal(size=(B, Tmax, 2 * C)))
    cache_d, cache_c = dev(cache0), cache0.copy()
    for pos, Tq in ((0, 4), (4, 1), (5, 4)):
        qkv = f32(rng.normal(size=(B, Tq, 3 * C)))
        kv.kv_write(cache_d, dev(qkv), C, pos, **FLAT)
        cpu_kv.kv_write(cache_c, qkv, C, pos)
        assert np.array_equal(host(cache_d), cache_c)
    assert np.array_equal(cache_c[:, 5:9], qkv[:, :, C:])


def test_kv_write_rejects_overflow_and_bad_arrays(rng):
    cache = cuda.device_array((2, 4, 6), np.float32)
    qkv = dev(f32(np.zeros((2, 3, 9))))
    with pytest.raises(GraphError, match="overflows"):
        kv.kv_write(cache, qkv, 3, 2)
    with pytest.raises(GraphError, match="overflows"):
        kv.kv_write(cache, qkv, 3, -1)
    with pytest.raises(GraphError, match="does not fit"):
        kv.kv_write(cache, qkv, 4, 0)
    with pytest.raises(GraphError, match="does not fit"):
        kv.kv_write(cache, dev(f32(np.zeros((1, 3, 9)))), 3, 0)
    with pytest.raises(GraphError, match="'qkv'.*device"):
        kv.kv_write(cache, np.zeros((2, 3, 9), np.float32), 3, 0)
    with pytest.raises(GraphError, match="'cache'.*float32"):
        kv.kv_write(cuda.device_array((2, 4, 6), np.float64), qkv, 3, 0)


@pytest.mark.parametrize("rows_on_device", [False, True])
def test_reorder_rows_matches_cpu(rng, rows_on_device):
    B, Tmax, W = 3, 5, 4
    cache0 = f32(rng.normal(size=(B, Tmax, W)))
    rows = np.array([2, 0, 0])
    d = dev(cache0)
    kv.reorder_rows(d, cuda.device_array_like(d), dev(rows) if rows_on_device else rows, 3, **FLAT)
    cpu = cache0.copy()
    cpu_kv.reorder_rows(cpu, np.empty_like(cpu), rows, 3)
    assert np.array_equal(host(d), cpu)
    assert np.array_equal(cpu[:, 3:], cache0[:, 3:])  # positions past length untouched


def test_reorder_rows_rejects_bad_rows():
    d = cuda.device_array((3, 5, 4), np.float32)
    s = cuda.device_array((3, 5, 4), np.float32)
    with pytest.raises(GraphError, match="rows"):
        kv.reorder_rows(d, s, np.array([0, 1, 3]), 2)
    with pytest.raises(GraphError, match="rows"):
        kv.reorder_rows(d, s, dev(np.array([0, -1, 2])), 2)
    with pytest.raises(GraphError, match="rows"):
        kv.reorder_rows(d, s, np.array([0, 1]), 2)
    with pytest.raises(GraphError, match="length"):
        kv.reorder_rows(d, s, np.array([0, 1, 2]), 6)
    with pytest.raises(GraphError, match="'scratch'"):
        kv.reorder_rows(d, cuda.device_array((3, 4, 4), np.float32), np.array([0, 1, 2]), 2)


# ---------------------------------------------------------------- elementwise
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5, 2)])
def test_add_forward_and_aliasing(rng, shape):
    a, b = f32(rng.normal(size=shape)), f32(rng.normal(size=shape))
    out = cuda.device_array(shape, np.float32)
    ad, bd = dev(a), dev(b)
    ew.add_forward(out, ad, bd, **FLAT)
    assert np.array_equal(host(out), a + b)
    ew.add_forward(ad, ad, bd, **FLAT)  # out aliases a
    assert np.array_equal(host(ad), a + b)
    cpu = np.empty_like(a)
    cpu_ew.add_forward(cpu, a, b)
    assert np.array_equal(host(out), cpu)


def test_take_rows_and_copy(rng):
    B, T, C = 3, 7, 5
    x = f32(rng.normal(size=(B, T, C)))
    idx = np.array([0, 6, 3])
    out = cuda.device_array((B, C), np.float32)
    ew.take_rows(out, dev(x), dev(idx), **FLAT)
    cpu = np.empty((B, C), np.float32)
    cpu_ew.take_rows(cpu, x, idx)
    assert np.array_equal(host(out), cpu) and np.array_equal(cpu, x[np.arange(B), idx])
    y = cuda.device_array((B, C), np.float32)
    ew.copy(y, out, **FLAT)
    assert np.array_equal(host(y), cpu)


def test_elementwise_rejects_bad_arguments():
    a = cuda.device_array((2, 3), np.float32)
    with pytest.raises(GraphError, match="'b'"):
        ew.add_forward(a, a, cuda.device_array((3, 2), np.float32))
    with pytest.raises(GraphError, match="'a'.*device"):
        ew.add_forward(a, np.zeros((2, 3), np.float32), a)
    with pytest.raises(GraphError, match="'idx'"):
        ew.take_rows(cuda.device_array((2, 3), np.float32), cuda.device_array((2, 4, 3), np.float32),
                     cuda.device_array(2, np.int32))
    with pytest.raises(GraphError, match="'x'"):
        ew.take_rows(cuda.device_array((2, 3), np.float32), cuda.device_array((2, 4, 5), np.float32),
                     cuda.device_array(2, np.int64))
    with pytest.raises(GraphError, match="threads"):
        ew.add_forward(a, a, a, threads=2048)


# ---------------------------------------------------------------- realistic shapes (GPU only)
@gpu_only
@pytest.mark.parametrize("N,C", [(8192, 768)])
def test_gpu_layernorm(rng, N, C):
    x = f32(rng.normal(1.0, 2.0, size=(N, C)))
    w, b = f32(rng.normal(size=C)), f32(rng.normal(size=C))
    out = cuda.device_array((N, C), np.float32)
    mean, rstd = cuda.device_array(N, np.float32), cuda.device_array(N, np.float32)
    xd, wd, bd = dev(x), dev(w), dev(b)
    ln.layernorm_forward(out, mean, rstd, xd, wd, bd, 1e-5)
    o, m, r = ref.layernorm(x, w, b, 1e-5)
    assert_close(host(out), o, atol=1e-5, rtol=1e-5)
    assert_close(host(rstd), r, atol=1e-6, rtol=1e-6)
    co, cm, cr = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    cpu_ln.layernorm_forward(co, cm, cr, x, w, b, 1e-5)
    assert_close(host(out), co, atol=1e-6, rtol=1e-6, what="vs CPU")
    first = host(out)
    ln.layernorm_forward(out, mean, rstd, xd, wd, bd, 1e-5)
    assert np.array_equal(host(out).view(np.uint32), first.view(np.uint32))


@gpu_only
@pytest.mark.parametrize("N,V", [(8, 50257)])
@pytest.mark.parametrize("log", [False, True])
def test_gpu_softmax(rng, N, V, log):
    x = f32(rng.normal(0.0, 4.0, size=(N, V)))
    x[1, V // 50:] = -np.inf
    out = cuda.device_array(x.shape, np.float32)
    (sm.log_softmax_forward if log else sm.softmax_forward)(out, dev(x))
    assert_close(host(out), (ref.log_softmax if log else ref.softmax)(x), atol=1e-6, rtol=1e-5)
    cpu = np.empty_like(x)
    (cpu_sm.log_softmax_forward if log else cpu_sm.softmax_forward)(cpu, x)
    assert_close(host(out), cpu, atol=1e-7, rtol=1e-6, what="vs CPU")


@gpu_only
@pytest.mark.parametrize("B,T,C,V", [(32, 128, 768, 30522)])
def test_gpu_embedding_pool_normalize(rng, B, T, C, V):
    wte, wpe = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(T, C)))
    ids, pos = rng.integers(0, V, (B, T)), np.broadcast_to(np.arange(T), (B, T)).copy()
    out = cuda.device_array((B, T, C), np.float32)
    emb.embedding_forward(out, dev(ids), dev(wte), dev(pos), dev(wpe))
    x = host(out)
    assert_close(x, ref.embedding(ids, wte, wpe, pos), atol=1e-6, rtol=1e-6)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, B)[:, None]).astype(np.uint8)
    mask[-1] = 0  # an all-padding row
    for mode in cpu_pool.MODES:
        p = cuda.device_array((B, C), np.float32)
        pool.pool(p, out, dev(mask), mode)
        cpu = np.empty((B, C), np.float32)
        cpu_pool.pool(cpu, x, mask, mode)
        assert np.array_equal(host(p), cpu), mode
    pool.l2_normalize(p)
    cpu_pool.l2_normalize(cpu)
    assert_close(host(p), cpu, atol=1e-7, rtol=1e-6, what="l2")


@gpu_only
@pytest.mark.parametrize("B,Tmax,C", [(8, 1024, 768)])
def test_gpu_kv_and_elementwise(rng, B, Tmax, C):
    cache = dev(np.zeros((B, Tmax, 2 * C), np.float32))
    Tq = min(64, Tmax // 2)
    qkv = f32(rng.normal(size=(B, Tq, 3 * C)))
    kv.kv_write(cache, dev(qkv), C, Tq // 2)
    assert np.array_equal(host(cache)[:, Tq // 2: Tq // 2 + Tq], qkv[:, :, C:])
    rows = rng.integers(0, B, B)
    before = host(cache)
    kv.reorder_rows(cache, cuda.device_array_like(cache), rows, Tq)
    assert np.array_equal(host(cache)[:, :Tq], before[rows, :Tq])
    a, b = f32(rng.normal(size=(B, Tq, C))), f32(rng.normal(size=(B, Tq, C)))
    o = cuda.device_array(a.shape, np.float32)
    ew.add_forward(o, dev(a), dev(b))
    assert np.array_equal(host(o), a + b)
    t = cuda.device_array((B, C), np.float32)
    idx = rng.integers(0, Tq, B)
    ew.take_rows(t, o, dev(idx))
    assert np.array_equal(host(t), (a + b)[np.arange(B), idx])
