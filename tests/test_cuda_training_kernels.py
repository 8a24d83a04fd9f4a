"""Training-side CUDA kernels (rng, dropout, cross-entropy, Adam / grad norm, embedding backward,
zero_row) against the float64 references and against their CPU twins on the same inputs.

Without a GPU they run under Numba's CUDA simulator (tests/conftest.py): tiny shapes, tiny blocks
and grid caps so that multi-block, grid-stride and tail paths still run. Realistic shapes are
GPU-only parametrizations (NBFORMER_TEST_GPU=1).
"""
import math

import numpy as np
import pytest
from numba import cuda

import reference_backward as rb
from conftest import assert_close
from nbformer import ops
from nbformer.errors import GraphError
from nbformer.kernels.cpu import dropout as cpu_do
from nbformer.kernels.cpu import embedding as cpu_emb
from nbformer.kernels.cpu import loss as cpu_loss
from nbformer.kernels.cpu import optim as cpu_opt
from nbformer.kernels.cuda import dropout as do
from nbformer.kernels.cuda import elementwise as ew
from nbformer.kernels.cuda import embedding as emb
from nbformer.kernels.cuda import loss
from nbformer.kernels.cuda import optim
from nbformer.kernels.cuda import rng as crng
from nbformer.kernels.cuda._jit import SIMULATOR

gpu_only = pytest.mark.skipif(SIMULATOR, reason="realistic shapes: real GPU only (NBFORMER_TEST_GPU=1)")

FLAT = {"threads": 8, "max_blocks": 3} if SIMULATOR else {}  # grid-stride kernels
ROWS = {"threads": 16} if SIMULATOR else {}  # cross-entropy forward: rows x lanes per block
NORM = {"threads": 8, "chunk": 64, "max_blocks": 3} if SIMULATOR else {}


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


def assert_grad(got, want, what="grad", rel=1e-4):
    """Gradient tolerance (as in test_backward_kernels_cpu.py): rel times the tensor's largest reference."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    assert_close(got, want, atol=rel * max(scale, 1e-8), rtol=0, what=what)


# ================================================================ rng
@cuda.jit
def _uniform_kernel(out, seed, counters):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = crng.uniform(seed, counters[i])


def test_rng_uniform_is_the_cpu_hash():
    counters = np.array([0, 1, 2, 77, 2**32 - 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64)
    for seed in (0, 123, 2**63 + 11, 2**64 - 1):
        out = cuda.device_array(counters.size, np.float32)
        _uniform_kernel[2, 8](out, np.uint64(seed), dev(counters))
        assert np.array_equal(host(out), rb.uniform(seed, counters).astype(np.float32)), f"seed {seed}"


# ================================================================ dropout
@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 5, 9)])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("offset", [0, 1000, 2**64 - 40])  # the last one wraps the uint64 counter
def test_dropout_matches_cpu_bitwise(rng, shape, p, offset):
    x, dout = f32(rng.normal(size=shape)), f32(rng.normal(size=shape))
    seed = 2**63 + 42
    out, dx = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
    do.dropout_forward(out, dev(x), p, seed, offset, **FLAT)
    do.dropout_backward(dx, dev(dout), p, seed, offset, **FLAT)
    cout, cdx = np.empty_like(x), np.empty_like(x)
    cpu_do.dropout_forward(cout, x, p, seed, offset)
    cpu_do.dropout_backward(cdx, dout, p, seed, offset)
    assert np.array_equal(host(out), cout), "forward differs from the CPU"
    assert np.array_equal(host(dx), cdx), "backward differs from the CPU"
    assert np.array_equal(host(out) != 0, host(dx) != 0)
    if offset < 2**63:  # the float64 reference's counter arithmetic does not wrap
        assert_close(host(out), rb.dropout(x, p, seed, offset), atol=0, rtol=1e-6)


def test_dropout_zero_p_offsets_aliasing_and_determinism(rng):
    n = 300
    x = np.ones(n, np.float32)
    xd = dev(x)
    a, b, c, e = (cuda.device_array(n, np.float32) for _ in range(4))
    do.dropout_forward(a, xd, 0.5, 7, 0, **FLAT)
    do.dropout_forward(b, xd, 0.5, 7, 0, threads=32, max_blocks=1)  # another grid: the same mask
    do.dropout_forward(c, xd, 0.5, 8, 0, **FLAT)
    do.dropout_forward(e, xd, 0.5, 7, 1, **FLAT)
    assert np.array_equal(host(a), host(b))
    assert not np.array_equal(host(a), host(c))
    assert np.array_equal(host(e)[:-1], host(a)[1:])  # offset shifts the counter
    y = f32(rng.normal(size=n))
    yd = dev(y)
    want = cuda.device_array(n, np.float32)
    do.dropout_forward(want, yd, 0.3, 9, 5, **FLAT)
    do.dropout_forward(yd, yd, 0.3, 9, 5, **FLAT)  # in place
    assert np.array_equal(host(yd), host(want))
    z = cuda.device_array(n, np.float32)
    do.dropout_forward(z, dev(y), 0.0, 1, 0, **FLAT)
    assert np.array_equal(host(z), y)
    do.dropout_backward(z, dev(x), 0.0, 1, 0, **FLAT)
    assert np.array_equal(host(z), x)


def test_dropout_rejects_bad_args():
    x = dev(np.ones(8, np.float32))
    with pytest.raises(GraphError, match="'p'"):
        do.dropout_forward(cuda.device_array(8, np.float32), x, 1.0, 0, 0)
    with pytest.raises(GraphError, match="'seed'"):
        do.dropout_forward(cuda.device_array(8, np.float32), x, 0.5, -1, 0)
    with pytest.raises(GraphError, match="'offset'"):
        do.dropout_forward(cuda.device_array(8, np.float32), x, 0.5, 0, 2**64)
    with pytest.raises(GraphError, match="'out'"):
        do.dropout_forward(cuda.device_array(9, np.float32), x, 0.5, 0, 0)
    with pytest.raises(GraphError, match="'x'"):
        do.dropout_forward(cuda.device_array(8, np.float32), np.ones(8, np.float32), 0.5, 0, 0)
    with pytest.raises(GraphError, match="'dout'"):
        do.dropout_backward(cuda.device_array(8, np.float32), dev(np.ones(8)), 0.5, 0, 0)


# ================================================================ cross-entropy
def _ce_case(rng, N, V, ignore_frac, ii=-100):
    logits = f32(rng.normal(0.0, 3.0, size=(N, V)))
    t = rng.integers(0, V, N)
    t[rng.random(N) < ignore_frac] = ii
    return logits, t


def _ce(logits, t, eps, ii=-100, dloss=None, device_targets=True, **kw):
    N = logits.shape[0]
    losses, lse = cuda.device_array(N, np.float32), cuda.device_array(N, np.float32)
    xd = dev(logits)
    td = dev(t.astype(np.int64)) if device_targets else t
    loss.cross_entropy_forward(losses, lse, xd, td, eps, ii, **{**ROWS, **kw})
    d = cuda.device_array(logits.shape, np.float32)
    loss.cross_entropy_backward(d, xd, lse, td, eps, ii, 1.0 if dloss is None else dloss, **FLAT)
    return host(losses), host(lse), host(d)


def _ce_cpu(logits, t, eps, ii=-100, dloss=1.0):
    N = logits.shape[0]
    losses, lse, d = np.empty(N, np.float32), np.empty(N, np.float32), np.empty_like(logits)
    cpu_loss.cross_entropy_forward(losses, lse, logits, t, eps, ii)
    cpu_loss.cross_entropy_backward(d, logits, lse, t, eps, ii, dloss)
    return losses, lse, d


@pytest.mark.parametrize("N,V", [(1, 1), (7, 13), (20, 100)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(rng, N, V, eps):
    logits, t = _ce_case(rng, N, V, 0.25)
    n = int((t != -100).sum())
    dl = 1.0 / max(n, 1)
    losses, lse, d = _ce(logits, t, eps, dloss=dl, device_targets=N != 7)
    rl, rlse = rb.cross_entropy(logits, t, eps, -100)
    assert_close(losses, rl, atol=1e-5, rtol=1e-5, what="losses")
    assert_close(lse, rlse, atol=1e-5, rtol=1e-5, what="lse")
    assert_grad(d, rb.cross_entropy_backward(logits, t, eps, -100, dl), "dlogits")
    cl, clse, cd = _ce_cpu(logits, t, eps, dloss=dl)
    assert_close(losses, cl, atol=1e-6, rtol=1e-6, what="losses vs CPU")
    assert_close(lse, clse, atol=1e-6, rtol=1e-6, what="lse vs CPU")
    assert_close(d, cd, atol=1e-7, rtol=1e-5, what="dlogits vs CPU")
    mean, nv = loss.cross_entropy_mean(dev(losses), dev(t.astype(np.int64)))
    assert nv == n and mean == cpu_loss.cross_entropy_mean(losses, t)[0]


def test_cross_entropy_fused_is_the_forward_then_the_backward(rng):
    """The training graph's fused loss node on the device: the two kernels' results, in place."""
    logits, t = _ce_case(rng, 9, 40, 0.25)
    want = _ce(logits, t, 0.1, dloss=0.25)
    N = logits.shape[0]
    losses, lse = cuda.device_array(N, np.float32), cuda.device_array(N, np.float32)
    xd = dev(logits)
    loss.cross_entropy_fused(losses, lse, xd, xd, t, 0.1, -100, 0.25)
    for got, w, what in zip((host(losses), host(lse), host(xd)), want, ("losses", "lse", "dlogits")):
        np.testing.assert_array_equal(got, w, err_msg=what)


@pytest.mark.parametrize("lanes", [1, 4, 16])
def test_cross_entropy_lane_layouts_and_determinism(rng, lanes):
    logits, t = _ce_case(rng, 9, 37, 0.2)
    runs = [_ce(logits, t, 0.1, lanes=lanes, max_blocks=2) for _ in range(2)]
    for a, b in zip(*runs):
        assert np.array_equal(a, b), "results differ between runs"
    rl, rlse = rb.cross_entropy(logits, t, 0.1, -100)
    assert_close(runs[0][0], rl, atol=1e-5, rtol=1e-5, what="losses")
    assert_close(runs[0][1], rlse, atol=1e-5, rtol=1e-5, what="lse")


def test_cross_entropy_ignore_index_in_range_row_dloss_and_in_place(rng):
    N, V, ii = 11, 10, 3
    logits, t = _ce_case(rng, N, V, 0.3, ii)
    t[0] = ii
    d = f32(rng.normal(size=N))
    losses, lse, dl = _ce(logits, t, 0.05, ii, dloss=dev(d))
    rl, _ = rb.cross_entropy(logits, t, 0.05, ii)
    assert_close(losses, rl, atol=1e-5, rtol=1e-5, what="losses")
    assert_grad(dl, rb.cross_entropy_backward(logits, t, 0.05, ii, d), "dlogits")
    assert not dl[t == ii].any() and not losses[t == ii].any()
    # a host dloss array, and in place (dlogits is logits)
    xd, td = dev(logits), dev(t)
    lsed = dev(lse)
    loss.cross_entropy_backward(xd, xd, lsed, td, 0.05, ii, d, **FLAT)
    assert np.array_equal(host(xd), dl)


def test_cross_entropy_all_ignored_and_masked_classes(rng):
    logits = f32(rng.normal(size=(5, 9)))
    t = np.full(5, -100)
    losses, lse, d = _ce(logits, t, 0.1)
    assert not losses.any() and not d.any()
    assert loss.cross_entropy_mean(dev(losses), t) == (0.0, 0)
    # -inf logits (masked classes): finite loss without smoothing, zero gradient there, like the CPU
    logits[:, 5:] = -np.inf
    t = np.array([0, 1, 2, 3, 4])
    losses, lse, d = _ce(logits, t, 0.0)
    cl, clse, cd = _ce_cpu(logits, t, 0.0)
    assert np.isfinite(losses).all() and not d[:, 5:].any()
    assert_close(losses, cl, atol=1e-6, rtol=1e-6, what="losses vs CPU")
    assert_close(d, cd, atol=1e-7, rtol=1e-5, what="dlogits vs CPU")


def test_cross_entropy_rejects_bad_args(rng):
    logits = dev(f32(rng.normal(size=(3, 4))))
    losses, lse = cuda.device_array(3, np.float32), cuda.device_array(3, np.float32)
    dl = cuda.device_array((3, 4), np.float32)
    for bad in (np.array([0, 4, 1]), np.array([0, -1, 1]), np.array([0.0, 1.0, 2.0]), np.array([0, 1]),
                dev(np.array([0, 1, 2], np.int32)), dev(np.array([0, 1]))):
        with pytest.raises(GraphError, match="'targets'"):
            loss.cross_entropy_forward(losses, lse, logits, bad, 0.0, -100)
        with pytest.raises(GraphError, match="'targets'"):
            loss.cross_entropy_backward(dl, logits, lse, bad, 0.0, -100, 1.0)
    t = np.array([0, 1, 2])
    with pytest.raises(GraphError, match="'lse'"):
        loss.cross_entropy_forward(losses, cuda.device_array(4, np.float32), logits, t)
    with pytest.raises(GraphError, match="'logits'"):
        loss.cross_entropy_forward(losses, lse, np.zeros((3, 4), np.float32), t)
    with pytest.raises(GraphError, match="'label_smoothing'"):
        loss.cross_entropy_forward(losses, lse, logits, t, 1.5)
    with pytest.raises(GraphError, match="'dlogits'"):
        loss.cross_entropy_backward(cuda.device_array((3, 5), np.float32), logits, lse, t)
    with pytest.raises(GraphError, match="'dloss'"):
        loss.cross_entropy_backward(dl, logits, lse, t, dloss=cuda.device_array(4, np.float32))
    with pytest.raises(GraphError, match="lanes"):
        loss.cross_entropy_forward(losses, lse, logits, t, threads=16, lanes=3)
    with pytest.raises(GraphError, match="threads"):
        loss.cross_entropy_forward(losses, lse, logits, t, threads=12)


# ================================================================ optimizer
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_cpu_5_steps(rng, decoupled, wd):
    n, lr, b1, b2, eps = 301, 1e-2, 0.9, 0.98, 1e-9
    p0 = f32(rng.normal(size=n))
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    pd, md, vd = dev(p0), dev(m), dev(v)
    rp, rm, rv = p0.astype(np.float64), np.zeros(n), np.zeros(n)
    for step in range(1, 6):
        g = f32(rng.normal(size=n))
        cpu_opt.adam_step(p, g, m, v, lr, b1, b2, eps, wd, step, decoupled)
        optim.adam_step(pd, dev(g), md, vd, lr, b1, b2, eps, wd, step, decoupled, **FLAT)
        rp, rm, rv = rb.adam_step(rp, g, rm, rv, lr, b1, b2, eps, wd, step, decoupled)
    for what, got, want in (("params", host(pd), p), ("m", host(md), m), ("v", host(vd), v)):
        assert_close(got, want, atol=1e-6 * np.abs(want).max(), rtol=1e-6, what=what + " vs CPU")
        if SIMULATOR:  # the same float32 operations; on a GPU expected too (no fastmath, IEEE sqrt/div)
            assert np.array_equal(got, want), what + " not bit-identical to the CPU"
    assert_close(host(pd), rp, atol=1e-5 * np.abs(rp).max(), rtol=1e-5, what="params vs float64 reference")


def test_adam_rejects_bad_args():
    a = dev(np.zeros(4, np.float32))
    z = lambda k=4: cuda.device_array(k, np.float32)  # noqa: E731
    with pytest.raises(GraphError, match="'v'"):
        optim.adam_step(a, z(), z(), z(5), 1e-3, step=1)
    with pytest.raises(GraphError, match="'step'"):
        optim.adam_step(a, z(), z(), z(), 1e-3, step=0)
    with pytest.raises(GraphError, match="'grads'"):
        optim.adam_step(a, cuda.device_array(4, np.float64), z(), z(), 1e-3)
    with pytest.raises(GraphError, match="'params'"):
        optim.adam_step(np.zeros(4, np.float32), z(), z(), z(), 1e-3)


def test_global_grad_norm_deterministic_and_close_to_cpu(rng):
    gs = [f32(rng.normal(size=s)) for s in ((1001,), (7, 33), (1,), (0,))]
    gd = [dev(g) for g in gs]
    norm = optim.global_grad_norm(gd, **NORM)
    want = rb.global_grad_norm(gs)
    assert abs(norm - want) <= 1e-12 * want
    assert abs(norm - cpu_opt.global_grad_norm(gs)) <= 1e-12 * want
    assert isinstance(norm, float)
    # the same bits on every run and for any grid (the chunks are fixed)
    for mb in (1, 2, 64):
        assert optim.global_grad_norm(gd, **{**NORM, "max_blocks": mb}) == norm
    assert optim.global_grad_norm(gd[1], **NORM) == pytest.approx(rb.global_grad_norm(gs[1]), rel=1e-12)
    assert optim.global_grad_norm([gd[3]]) == 0.0 and optim.global_grad_norm([]) == 0.0
    scratch = cuda.device_array(64, np.float64)
    assert optim.global_grad_norm(gd, partials=scratch, **NORM) == norm


def test_clip_and_scale_match_cpu(rng):
    gs = [f32(rng.normal(size=s)) for s in ((500,), (3, 7))]
    gd = [dev(g) for g in gs]
    old = dict(optim.TUNABLES["global_grad_norm"])
    optim.TUNABLES["global_grad_norm"].update(NORM)  # clip_grad_norm_ takes the TUNABLES
    try:
        got = optim.clip_grad_norm_(gd, 1.0)
    finally:
        optim.TUNABLES["global_grad_norm"] = old
    want = cpu_opt.clip_grad_norm_(gs, 1.0)
    assert got == pytest.approx(want, rel=1e-12)
    for a, b in zip(gd, gs):
        assert_close(host(a), b, atol=1e-9, rtol=1e-6, what="clipped grads vs CPU")
    h, hc = dev(np.arange(11, dtype=np.float32)), np.arange(11, dtype=np.float32)
    optim.scale_(h, 0.37, **FLAT)
    cpu_opt.scale_(hc, 0.37)
    assert np.array_equal(host(h), hc)
    assert optim.noam_lr is cpu_opt.noam_lr and optim.cosine_lr is cpu_opt.cosine_lr


def test_grad_norm_and_scale_reject_bad_args():
    good = dev(np.ones(4, np.float32))
    with pytest.raises(GraphError, match=r"'grads\[1\]'"):
        optim.global_grad_norm([good, dev(np.ones(4))])
    with pytest.raises(GraphError, match=r"'grads\[0\]'"):
        optim.scale_([np.ones(4, np.float32)], 2.0)
    with pytest.raises(GraphError, match="threads"):
        optim.global_grad_norm(good, threads=6)
    with pytest.raises(GraphError, match="'partials'"):
        optim.global_grad_norm(good, chunk=1, partials=cuda.device_array(4, np.float64))


# ================================================================ embedding backward, zero_row
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (1, 33)])
@pytest.mark.parametrize("variant", ["tok", "tok+pos+type", "scaled+pos"])
def test_embedding_backward(rng, B, T, variant):
    V, P, TT, C = 20, 40, 3, 5
    ids = rng.integers(0, 6, (B, T))  # repeated ids; ids >= 6 never occur
    pos, typ = rng.integers(0, P, (B, T)), rng.integers(0, TT, (B, T))
    dout = f32(rng.normal(size=(B, T, C)))
    use_pos, use_type = "pos" in variant, "type" in variant
    scale = 4.5 if "scaled" in variant else 1.0
    nan = lambda r: np.full((r, C), np.nan, np.float32)  # noqa: E731  every row must be written
    g = [dev(nan(V)), dev(nan(P)) if use_pos else None, dev(nan(TT)) if use_type else None]
    # ids on the device (copied back for the plan), the position / type ids as host arrays
    emb.embedding_backward(*g, dev(dout), dev(ids), pos if use_pos else None, typ if use_type else None, scale,
                           **FLAT)
    c = [nan(V), nan(P) if use_pos else None, nan(TT) if use_type else None]
    cpu_emb.embedding_backward(*c, dout, ids, pos if use_pos else None, typ if use_type else None, scale)
    r = rb.embedding_backward(dout, ids, V, pos, P if use_pos else None, typ, TT if use_type else None, scale)
    for name, got, cpu, want in zip(("dwte", "dwpe", "dwtt"), g, c, r):
        if got is None:
            continue
        got = host(got)
        assert_grad(got, want, name)
        assert np.array_equal(got, cpu), f"{name} not bit-identical to the CPU"
    assert not host(g[0])[6:].any(), "rows of ids that never occur must be zero"


def test_embedding_backward_deterministic_and_adjoint(rng):
    B, T, V, C = 2, 30, 4, 6
    ids = rng.integers(0, V, (B, T))
    typ = np.zeros((B, T), np.int64)  # one id repeated B*T times
    dout = f32(rng.normal(size=(B, T, C)))

    def run(**kw):
        a, t = cuda.device_array((V, C), np.float32), cuda.device_array((2, C), np.float32)
        emb.embedding_backward(a, None, t, dev(dout), ids, None, dev(typ), 2.0, **kw)
        return host(a), host(t)
    r1, r2, r3 = run(**FLAT), run(**FLAT), run(threads=32, max_blocks=1)
    for x, y, z in zip(r1, r2, r3):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    # <forward(W), D> == <W, backward(D)>
    wte, wtt = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(2, C)))
    out = cuda.device_array((B, T, C), np.float32)
    emb.embedding_forward(out, dev(ids), dev(wte), type_ids=dev(typ), wtt=dev(wtt), scale=2.0, **FLAT)
    prod = host(out).astype(np.float64) * dout
    rhs = float((wte * r1[0].astype(np.float64)).sum() + (wtt * r1[1].astype(np.float64)).sum())
    assert abs(prod.sum() - rhs) <= 1e-5 * np.abs(prod).sum()


def test_embedding_backward_rejects_bad_args(rng):
    dout = dev(f32(rng.normal(size=(1, 3, 4))))
    tab = lambda r=5, c=4: cuda.device_array((r, c), np.float32)  # noqa: E731
    with pytest.raises(GraphError, match="'ids'"):
        emb.embedding_backward(tab(), None, None, dout, np.array([[0, 5, 1]]))
    with pytest.raises(GraphError, match="'ids'"):
        emb.embedding_backward(tab(), None, None, dout, dev(np.array([[0, 1, 1]], np.int32)))
    with pytest.raises(GraphError, match="'ids'"):
        emb.embedding_backward(tab(), None, None, dout, np.array([[0.0, 1.0, 1.0]]))
    with pytest.raises(GraphError, match="'pos_ids'"):
        emb.embedding_backward(None, tab(), None, dout, np.array([[0, 1, 1]]))
    with pytest.raises(GraphError, match="'dwte'"):
        emb.embedding_backward(tab(5, 3), None, None, dout, np.array([[0, 1, 1]]))
    with pytest.raises(GraphError, match="'dwte'"):
        emb.embedding_backward(np.zeros((5, 4), np.float32), None, None, dout, np.array([[0, 1, 1]]))
    with pytest.raises(GraphError, match="'dout'"):
        emb.embedding_backward(tab(), None, None, np.zeros((1, 3, 4), np.float32), np.array([[0, 1, 1]]))


def test_zero_row_and_padding_idx_rule(rng):
    t = f32(rng.normal(size=(4, 11)))
    td = dev(t)
    ew.zero_row(td, 2, threads=4, max_blocks=2)
    want = t.copy()
    want[2] = 0
    assert np.array_equal(host(td), want)
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(GraphError, match="'row'"):
            ew.zero_row(td, bad)
    with pytest.raises(GraphError, match="'table'"):
        ew.zero_row(t, 0)
    # the registered op applies nn.Embedding(padding_idx=...) through zero_row, on the device
    ids = np.array([[1, 2, 2, 0]])
    dout = f32(rng.normal(size=(1, 4, 3)))
    dwte = cuda.device_array((5, 3), np.float32)
    ops.get("embedding", "cuda", "backward")(dout=dev(dout), ids=dev(ids), dwte=dwte, scale=1.0, padding_idx=2)
    g = host(dwte)
    assert not g[2].any() and not g[3:].any() and np.array_equal(g[1], dout[0, 0])


def test_training_ops_are_registered_for_cuda():
    for name, direction in (("dropout", "forward"), ("dropout", "backward"), ("cross_entropy", "forward"),
                            ("cross_entropy", "backward"), ("embedding", "backward"), ("adam", "forward"),
                            ("grad_norm", "forward"), ("scale", "forward")):
        assert ops.has(name, "cuda", direction), (name, direction)


# ================================================================ realistic shapes (GPU only)
@gpu_only
@pytest.mark.parametrize("N,V", [(512, 50257), (4096, 8000), (300, 30522)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gpu_cross_entropy(rng, N, V, eps):
    logits, t = _ce_case(rng, N, V, 0.1)
    dl = 1.0 / int((t != -100).sum())
    losses, lse, d = _ce(logits, t, eps, dloss=dl)
    cl, clse, cd = _ce_cpu(logits, t, eps, dloss=dl)
    assert_close(losses, cl, atol=1e-5, rtol=1e-5, what="losses vs CPU")
    assert_close(lse, clse, atol=1e-5, rtol=1e-5, what="lse vs CPU")
    assert_grad(d, cd, "dlogits vs CPU", rel=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(_ce(logits, t, eps, dloss=dl), (losses, lse, d)))


@gpu_only
def test_gpu_dropout_adam_norm_embedding(rng):
    n = 5_000_003
    x = f32(rng.normal(size=n))
    out = cuda.device_array(n, np.float32)
    do.dropout_forward(out, dev(x), 0.1, 2**40 + 3, 123456789)
    cout = np.empty_like(x)
    cpu_do.dropout_forward(cout, x, 0.1, 2**40 + 3, 123456789)
    assert np.array_equal(host(out), cout)
    p, m, v = x.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    pd, md, vd = dev(p), dev(m), dev(v)
    for step in range(1, 6):
        g = f32(rng.normal(size=n))
        cpu_opt.adam_step(p, g, m, v, 3e-4, 0.9, 0.999, 1e-8, 0.01, step, True)
        optim.adam_step(pd, dev(g), md, vd, 3e-4, 0.9, 0.999, 1e-8, 0.01, step, True)
    assert_close(host(pd), p, atol=1e-6 * np.abs(p).max(), rtol=1e-6, what="params vs CPU")
    norm = optim.global_grad_norm([pd, md])
    assert norm == optim.global_grad_norm([pd, md])
    assert abs(norm - cpu_opt.global_grad_norm([p, m])) <= 1e-6 * norm
    B, T, V, C = 8, 512, 50257, 768
    ids = rng.integers(0, V, (B, T))
    ids[:, :100] = 50256  # a heavily repeated id
    dout = f32(rng.normal(size=(B, T, C)))
    dwte = cuda.device_array((V, C), np.float32)
    emb.embedding_backward(dwte, None, None, dev(dout), dev(ids), scale=math.sqrt(C))
    cw = np.empty((V, C), np.float32)
    cpu_emb.embedding_backward(cw, None, None, dout, ids, scale=math.sqrt(C))
    assert np.array_equal(host(dwte), cw)

