"""Backward kernels, loss, dropout and optimizer against reference_backward.py (float64), which is
itself checked against central differences; torch autograd / torch.optim spot checks where cheap."""
import math

import numba
import numpy as np
import pytest
import torch

import reference as ref
import reference_backward as rb
from conftest import assert_close
from nbformer.errors import GraphError
from nbformer.kernels.cpu.dropout import dropout_backward, dropout_forward
from nbformer.kernels.cpu.embedding import embedding_backward, embedding_forward
from nbformer.kernels.cpu.layernorm import layernorm_backward, layernorm_forward
from nbformer.kernels.cpu.linear import linear_backward, linear_forward, linear_forward_train
from nbformer.kernels.cpu.loss import (cross_entropy_backward, cross_entropy_forward, cross_entropy_fused,
                                      cross_entropy_mean)
from nbformer.kernels.cpu.optim import (adam_step, clip_grad_norm_, cosine_lr, global_grad_norm, noam_lr,
                                        scale_)

ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
TORCH_ACT = {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
             "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
             "silu": torch.nn.functional.silu}


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def assert_grad(got, want, what="grad", rel=1e-4):
    """Gradient tolerance: rel times the largest reference magnitude of that tensor."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    assert_close(got, want, atol=rel * max(scale, 1e-8), rtol=0, what=what)


def thread_counts(fn):
    """fn() twice with the default thread count and once with 1 thread -> list of results."""
    n = numba.get_num_threads()
    try:
        outs = [fn(), fn()]
        numba.set_num_threads(1)
        outs.append(fn())
    finally:
        numba.set_num_threads(n)
    return outs


def assert_bitwise_same(outs):
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert np.array_equal(np.asarray(a), np.asarray(b)), "results differ between runs / thread counts"


# ================================================================ references vs finite differences
def test_reference_layernorm_backward_matches_finite_differences(rng):
    x, w, b = rng.normal(size=(3, 5)), rng.normal(size=5), rng.normal(size=5)
    R = rng.normal(size=(3, 5))
    f = lambda: float((ref.layernorm(x, w, b, 1e-5)[0] * R).sum())  # noqa: E731
    dx, dw, db = rb.layernorm_backward(R, x, w, 1e-5)
    assert_close(dx, rb.numerical_grad(f, x), atol=1e-7, rtol=1e-6, what="dx")
    assert_close(dw, rb.numerical_grad(f, w), atol=1e-7, rtol=1e-6, what="dw")
    assert_close(db, rb.numerical_grad(f, b), atol=1e-7, rtol=1e-6, what="db")


@pytest.mark.parametrize("act", ACTS)
def test_reference_linear_backward_matches_finite_differences(rng, act):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4)), rng.normal(size=5)
    R = rng.normal(size=(2, 3, 5))
    f = lambda: float((ref.linear(x, w, b, act) * R).sum())  # noqa: E731
    dx, dw, db = rb.linear_backward(R, x, w, b, act)
    assert_close(dx, rb.numerical_grad(f, x), atol=1e-7, rtol=1e-6, what="dx")
    assert_close(dw, rb.numerical_grad(f, w), atol=1e-7, rtol=1e-6, what="dw")
    assert_close(db, rb.numerical_grad(f, b), atol=1e-7, rtol=1e-6, what="db")


def test_reference_embedding_backward_matches_finite_differences(rng):
    wte, wpe, wtt = rng.normal(size=(6, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    ids, pos, typ = np.array([[1, 1, 4], [0, 1, 1]]), np.array([[0, 1, 2], [0, 1, 2]]), np.array([[0, 0, 1], [1, 1, 1]])
    R = rng.normal(size=(2, 3, 3))
    f = lambda: float((ref.embedding(ids, wte, wpe, pos, wtt, typ, 2.5) * R).sum())  # noqa: E731
    dwte, dwpe, dwtt = rb.embedding_backward(R, ids, 6, pos, 4, typ, 2, 2.5)
    for name, got, table in (("dwte", dwte, wte), ("dwpe", dwpe, wpe), ("dwtt", dwtt, wtt)):
        assert_close(got, rb.numerical_grad(f, table), atol=1e-7, rtol=1e-6, what=name)


@pytest.mark.parametrize("eps,ii", [(0.0, -100), (0.2, 2)])
def test_reference_cross_entropy_backward_matches_finite_differences(rng, eps, ii):
    x = rng.normal(size=(4, 5))
    t = np.array([1, 2, 4, 0])
    d = rng.normal(size=4)
    f = lambda: float((rb.cross_entropy(x, t, eps, ii)[0] * d).sum())  # noqa: E731
    assert_close(rb.cross_entropy_backward(x, t, eps, ii, d), rb.numerical_grad(f, x), atol=1e-7, rtol=1e-6)


def test_reference_adam_matches_textbook_torch_form(rng):
    # the textbook form (mhat / (sqrt(vhat) + eps)) equals torch's (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
    p, g, m, v = (rng.normal(size=8) for _ in range(4))
    v = np.abs(v)
    p1, m1, v1 = rb.adam_step(p, g, m, v, 1e-3, 0.9, 0.98, 1e-9, 0.0, 3, False)
    bc1, bc2 = 1 - 0.9 ** 3, 1 - 0.98 ** 3
    want = p - (1e-3 / bc1) * m1 / (np.sqrt(v1) / math.sqrt(bc2) + 1e-9)
    assert_close(p1, want, atol=1e-14, rtol=1e-12)


# ================================================================ layernorm
@pytest.mark.parametrize("N,C", [(1, 1), (1, 16), (7, 80), (33, 384), (130, 16), (257, 80)])
def test_layernorm_backward(rng, N, C):
    x = f32(rng.normal(1.0, 2.0, size=(N, C)))
    w, b, dout = f32(rng.normal(size=C)), f32(rng.normal(size=C)), f32(rng.normal(size=(N, C)))
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm_forward(out, mean, rstd, x, w, b, 1e-5)
    dx, dw, db = np.full_like(x, np.nan), np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
    layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    rdx, rdw, rdb = rb.layernorm_backward(dout, x, w, 1e-5)
    assert_grad(dx, rdx, "dx")
    assert_grad(dw, rdw, "dw")
    assert_grad(db, rdb, "db")


def test_layernorm_backward_3d_matches_torch(rng):
    x = f32(rng.normal(size=(2, 7, 80)))
    w, b, dout = f32(rng.normal(size=80)), f32(rng.normal(size=80)), f32(rng.normal(size=(2, 7, 80)))
    out, mean, rstd = np.empty_like(x), np.empty((2, 7), np.float32), np.empty((2, 7), np.float32)
    layernorm_forward(out, mean, rstd, x, w, b, 1e-5)
    dx, dw, db = np.empty_like(x), np.empty(80, np.float32), np.empty(80, np.float32)
    layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.layer_norm(tx, (80,), tw, tb, 1e-5).backward(torch.tensor(dout, dtype=torch.float64))
    assert_grad(dx, tx.grad.numpy(), "dx")
    assert_grad(dw, tw.grad.numpy(), "dw")
    assert_grad(db, tb.grad.numpy(), "db")


def test_layernorm_backward_deterministic(rng):
    N, C = 300, 48  # 5 row chunks, the last one partial
    x, w, dout = f32(rng.normal(size=(N, C))), f32(rng.normal(size=C)), f32(rng.normal(size=(N, C)))
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm_forward(out, mean, rstd, x, w, w, 1e-5)

    def run():
        dx, dw, db = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
        layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
        return dx, dw, db
    assert_bitwise_same(thread_counts(run))


def test_layernorm_backward_rejects_bad_args(rng):
    x = f32(rng.normal(size=(4, 8)))
    w, m = np.ones(8, np.float32), np.zeros(4, np.float32)
    with pytest.raises(GraphError, match="'dout'"):
        layernorm_backward(np.empty_like(x), np.empty_like(w), np.empty_like(w), x[:, :4].copy(), x, w, m, m)
    with pytest.raises(GraphError, match="'dw'"):
        layernorm_backward(np.empty_like(x), np.empty(8), np.empty_like(w), x, x, w, m, m)
    with pytest.raises(GraphError, match="'dx'"):
        layernorm_backward(np.empty((8, 4), np.float32).T, np.empty_like(w), np.empty_like(w), x, x, w, m, m)


# ================================================================ linear
def _linear_case(rng, N, K, M, act):
    x = f32(rng.normal(size=(N, K)))
    w = f32(rng.normal(size=(M, K)) / np.sqrt(K))
    b, dout = f32(rng.normal(size=M)), f32(rng.normal(size=(N, M)))
    out, pre = np.empty((N, M), np.float32), np.empty((N, M), np.float32)
    linear_forward_train(out, pre, x, w, b, act)
    return x, w, b, dout, out, pre


@pytest.mark.parametrize("act", ACTS)
# (1029, 24, 1031): uneven shape-chosen blocks in both backward GEMMs (gemm.auto_blocks; tn_rows: 516 + 515
# rows with 2 pool threads); (3, 5, 8195): dW in 4 tn_rows blocks (2049 x 3 + 2048 rows with 2 threads)
@pytest.mark.parametrize("N,K,M", [(1, 1, 1), (7, 33, 5), (130, 64, 257), (257, 16, 80), (1029, 24, 1031),
                                   (3, 5, 8195)])
def test_linear_backward(rng, act, N, K, M):
    x, w, b, dout, _, pre = _linear_case(rng, N, K, M, act)
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    dout_before = dout.copy()
    linear_backward(dx, dw, db, dout, x, w, pre, act)
    assert np.array_equal(dout, dout_before), "dout must be left intact"
    rdx, rdw, rdb = rb.linear_backward(dout, x, w, b, act)
    assert_grad(dx, rdx, "dx")
    assert_grad(dw, rdw, "dw")
    assert_grad(db, rdb, "db")


@pytest.mark.parametrize("act", ACTS)
def test_linear_forward_train(rng, act):
    x = f32(rng.normal(size=(3, 11, 24)))
    w, b, r = f32(rng.normal(size=(40, 24)) / 5), f32(rng.normal(size=40)), f32(rng.normal(size=(3, 11, 40)))
    out, pre, want = (np.empty((3, 11, 40), np.float32) for _ in range(3))
    linear_forward_train(out, pre, x, w, b, act, r)
    linear_forward(want, x, w, b, act, r)
    assert np.array_equal(out, want), "linear_forward_train must give linear_forward's bits"
    assert_close(pre, rb.linear_pre(x, w, b), atol=1e-5, rtol=1e-5, what="pre")
    # residual stream updated in place: out aliases residual
    linear_forward_train(r, pre, x, w, b, act, r)
    assert np.array_equal(r, want)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
def test_linear_backward_matches_torch_3d_with_scratch(rng, act):
    B, T, K, M = 2, 7, 16, 24
    x, w, b = f32(rng.normal(size=(B, T, K))), f32(rng.normal(size=(M, K)) / 4), f32(rng.normal(size=M))
    dout = f32(rng.normal(size=(B, T, M)))
    out, pre = np.empty((B, T, M), np.float32), np.empty((B, T, M), np.float32)
    linear_forward_train(out, pre, x, w, b, act)
    dx, dw, db, scratch = np.empty_like(x), np.empty_like(w), np.empty_like(b), np.empty((B * T, M), np.float32)
    linear_backward(dx, dw, db, dout, x, w, pre, act, scratch=scratch)
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    TORCH_ACT[act](torch.nn.functional.linear(tx, tw, tb)).backward(torch.tensor(dout, dtype=torch.float64))
    assert_grad(dx, tx.grad.numpy(), "dx")
    assert_grad(dw, tw.grad.numpy(), "dw")
    assert_grad(db, tb.grad.numpy(), "db")


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_linear_backward_optional_outputs(rng, act):
    x, w, b, dout, _, pre = _linear_case(rng, 33, 8, 12, act)
    rdx, rdw, rdb = rb.linear_backward(dout, x, w, b, act)
    dw = np.empty_like(w)
    linear_backward(None, dw, None, dout, x, w, pre, act)
    assert_grad(dw, rdw, "dw")
    dx, db = np.empty_like(x), np.empty_like(b)
    linear_backward(dx, None, db, dout, x, w, pre, act)
    assert_grad(dx, rdx, "dx")
    assert_grad(db, rdb, "db")


@pytest.mark.parametrize("N,M", [(300, 48), (1029, 1031)])
def test_linear_backward_deterministic(rng, N, M):
    x, w, b, dout, _, pre = _linear_case(rng, N, 32, M, "gelu_tanh")

    def run():
        dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        linear_backward(dx, dw, db, dout, x, w, pre, "gelu_tanh")
        return dx, dw, db
    assert_bitwise_same(thread_counts(run))


def test_linear_backward_rejects_bad_args(rng):
    x, w, b, dout, _, pre = _linear_case(rng, 4, 3, 5, "relu")
    with pytest.raises(GraphError, match="'pre'"):
        linear_backward(None, np.empty_like(w), None, dout, x, w, None, "relu")
    with pytest.raises(GraphError, match="'dw'"):
        linear_backward(None, np.empty((5, 3)), None, dout, x, w, pre, "relu")
    with pytest.raises(GraphError, match="'act'"):
        linear_backward(None, np.empty_like(w), None, dout, x, w, pre, "swish")
    with pytest.raises(GraphError, match="'scratch'"):
        linear_backward(None, np.empty_like(w), None, dout, x, w, pre, "relu", scratch=np.empty(3, np.float32))


# ================================================================ embedding
@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (1, 33), (2, 65), (1, 257)])
@pytest.mark.parametrize("variant", ["tok", "tok+pos+type", "scaled+pos"])
def test_embedding_backward(rng, B, T, variant):
    V, P, C = 50, 300, 20
    ids = rng.integers(0, 12, (B, T))  # repeated ids; ids >= 12 never occur
    pos, typ = rng.integers(0, P, (B, T)), rng.integers(0, 3, (B, T))
    dout = f32(rng.normal(size=(B, T, C)))
    use_pos, use_type = "pos" in variant, "type" in variant
    scale = 4.5 if "scaled" in variant else 1.0
    dwte = np.full((V, C), np.nan, np.float32)
    dwpe = np.full((P, C), np.nan, np.float32) if use_pos else None
    dwtt = np.full((3, C), np.nan, np.float32) if use_type else None
    embedding_backward(dwte, dwpe, dwtt, dout, ids, pos if use_pos else None, typ if use_type else None, scale)
    rwte, rwpe, rwtt = rb.embedding_backward(dout, ids, V, pos, P if use_pos else None, typ,
                                             3 if use_type else None, scale)
    assert_grad(dwte, rwte, "dwte")
    assert not dwte[12:].any(), "rows of ids that never occur must be zero"
    if use_pos:
        assert_grad(dwpe, rwpe, "dwpe")
    if use_type:
        assert_grad(dwtt, rwtt, "dwtt")


def test_embedding_backward_is_adjoint_of_forward(rng):
    # <forward(W), D> == <W, backward(D)> for every table
    B, T, V, P, C = 3, 40, 30, 64, 384
    ids, pos, typ = rng.integers(0, V, (B, T)), rng.integers(0, P, (B, T)), rng.integers(0, 2, (B, T))
    wte, wpe, wtt = f32(rng.normal(size=(V, C))), f32(rng.normal(size=(P, C))), f32(rng.normal(size=(2, C)))
    D = f32(rng.normal(size=(B, T, C)))
    out = np.empty((B, T, C), np.float32)
    embedding_forward(out, ids, wte, pos, wpe, typ, wtt, 2.0)
    g = [np.empty_like(wte), np.empty_like(wpe), np.empty_like(wtt)]
    embedding_backward(*g, D, ids, pos, typ, 2.0)
    lhs = float((out.astype(np.float64) * D).sum())
    rhs = sum(float((t.astype(np.float64) * d).sum()) for t, d in zip((wte, wpe, wtt), g))
    assert abs(lhs - rhs) <= 1e-5 * np.abs(out.astype(np.float64) * D).sum()


def test_embedding_backward_deterministic(rng):
    ids = rng.integers(0, 7, (4, 100))
    typ = np.zeros((4, 100), np.int64)  # one id repeated 400 times
    dout = f32(rng.normal(size=(4, 100, 300)))

    def run():
        a, c = np.empty((7, 300), np.float32), np.empty((2, 300), np.float32)
        embedding_backward(a, None, c, dout, ids, None, typ)
        return a, c
    assert_bitwise_same(thread_counts(run))


def test_embedding_backward_rejects_bad_args(rng):
    dout = f32(rng.normal(size=(1, 3, 4)))
    with pytest.raises(GraphError, match="'ids'"):
        embedding_backward(np.empty((5, 4), np.float32), None, None, dout, np.array([[0, 5, 1]]))
    with pytest.raises(GraphError, match="'pos_ids'"):
        embedding_backward(None, np.empty((5, 4), np.float32), None, dout, np.array([[0, 1, 1]]))
    with pytest.raises(GraphError, match="'dwte'"):
        embedding_backward(np.empty((5, 3), np.float32), None, None, dout, np.array([[0, 1, 1]]))


# ================================================================ cross-entropy
def _ce_case(rng, N, V, ignore_frac, ii=-100):
    logits = f32(rng.normal(0.0, 3.0, size=(N, V)))
    t = rng.integers(0, V, N)
    t[rng.random(N) < ignore_frac] = ii
    return logits, t


@pytest.mark.parametrize("N", [1, 7, 33, 130, 257])
@pytest.mark.parametrize("V", [1, 13, 16, 1003])  # 13, 1003: the row max's 8 lanes and a tail
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(rng, N, V, eps):
    logits, t = _ce_case(rng, N, V, 0.25)
    losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)
    cross_entropy_forward(losses, lse, logits, t, eps, -100)
    rl, rlse = rb.cross_entropy(logits, t, eps, -100)
    assert_close(losses, rl, atol=1e-5, rtol=1e-5, what="losses")
    assert_close(lse, rlse, atol=1e-5, rtol=1e-5, what="lse")
    mean, n = cross_entropy_mean(losses, t, -100)
    rmean, rn = rb.cross_entropy_mean(logits, t, eps, -100)
    assert n == rn and abs(mean - rmean) <= 1e-5 * max(1.0, abs(rmean))
    dlogits = np.full_like(logits, np.nan)
    cross_entropy_backward(dlogits, logits, lse, t, eps, -100, 1.0 / max(n, 1))
    assert_grad(dlogits, rb.cross_entropy_backward(logits, t, eps, -100, 1.0 / max(n, 1)), "dlogits")


def test_cross_entropy_finds_the_row_max_in_every_lane_and_the_tail(rng):
    # one logit of 300 per row, at every position of a 21-class row (8-lane max, 5 left over):
    # a max that missed it would overflow exp (e^300 > float32's range) and give inf / nan
    V = 21
    logits = f32(rng.normal(size=(V, V)))
    logits[np.arange(V), np.arange(V)] = 300.0
    t = rng.integers(0, V, V)
    losses, lse = np.empty(V, np.float32), np.empty(V, np.float32)
    cross_entropy_forward(losses, lse, logits, t, 0.0, -100)
    rl, rlse = rb.cross_entropy(logits, t, 0.0, -100)
    assert np.isfinite(lse).all() and np.isfinite(losses).all()
    assert_close(lse, rlse, atol=1e-4, rtol=1e-6, what="lse")
    assert_close(losses, rl, atol=1e-4, rtol=1e-6, what="losses")


def test_cross_entropy_matches_torch(rng):
    N, V, eps = 33, 100, 0.1
    for ii in (-100, 3):  # also an ignore_index inside [0, V)
        logits, t = _ce_case(rng, N, V, 0.3, ii)
        t[0] = 3
        losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)
        cross_entropy_forward(losses, lse, logits, t, eps, ii)
        tl = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        tt = torch.tensor(t)
        none = torch.nn.functional.cross_entropy(tl, tt, ignore_index=ii, label_smoothing=eps, reduction="none")
        assert_close(losses, none.detach().numpy(), atol=1e-5, rtol=1e-5, what="losses")
        mean_t = torch.nn.functional.cross_entropy(tl, tt, ignore_index=ii, label_smoothing=eps)
        mean_t.backward()
        mean, n = cross_entropy_mean(losses, t, ii)
        assert abs(mean - mean_t.item()) <= 1e-5 * abs(mean_t.item())
        dlogits = np.empty_like(logits)
        cross_entropy_backward(dlogits, logits, lse, t, eps, ii, 1.0 / n)
        assert_grad(dlogits, tl.grad.numpy(), "dlogits")


def test_cross_entropy_row_dloss_and_in_place(rng):
    logits, t = _ce_case(rng, 130, 64, 0.2)
    d = f32(rng.normal(size=130))
    losses, lse = np.empty(130, np.float32), np.empty(130, np.float32)
    cross_entropy_forward(losses, lse, logits, t, 0.05, -100)
    want = rb.cross_entropy_backward(logits, t, 0.05, -100, d)
    dlogits = np.empty_like(logits)
    cross_entropy_backward(dlogits, logits, lse, t, 0.05, -100, d)
    assert_grad(dlogits, want, "dlogits")
    cross_entropy_backward(logits, logits, lse, t, 0.05, -100, d)  # in place
    assert np.array_equal(logits, dlogits)


@pytest.mark.parametrize("V", [67, 1000])
def test_cross_entropy_in_place_gives_the_same_bits_with_ignored_rows_and_ragged_vocab(rng, V):
    """dlogits = logits itself (what the training graph plans): its own loop, the same bits as a
    separate output, ignored rows zeroed."""
    logits, t = _ce_case(rng, 41, V, 0.0)
    t[::5] = -100
    losses, lse = np.empty(41, np.float32), np.empty(41, np.float32)
    cross_entropy_forward(losses, lse, logits, t, 0.1, -100)
    apart = np.empty_like(logits)
    cross_entropy_backward(apart, logits, lse, t, 0.1, -100, 1.0 / 41)
    cross_entropy_backward(logits, logits, lse, t, 0.1, -100, 1.0 / 41)
    np.testing.assert_array_equal(logits, apart)
    assert not logits[::5].any()


@pytest.mark.parametrize("V,eps", [(1, 0.0), (67, 0.1), (1000, 0.0), (8192, 0.2)])
def test_cross_entropy_fused_gives_the_forward_and_backward_bits(rng, V, eps):
    """The training graph's fused loss node: losses, lse and dlogits bit for bit those of
    cross_entropy_forward then cross_entropy_backward, in place and into a separate buffer (logits
    then intact), ignored rows zeroed."""
    N = 37
    logits, t = _ce_case(rng, N, V, 0.0)
    t[::4] = -100
    want_l, want_lse = np.empty(N, np.float32), np.empty(N, np.float32)
    cross_entropy_forward(want_l, want_lse, logits, t, eps, -100)
    want_d = np.empty_like(logits)
    cross_entropy_backward(want_d, logits, want_lse, t, eps, -100, 1.0 / N)
    kept = logits.copy()
    for in_place in (False, True):
        x = logits.copy()
        d = x if in_place else np.full_like(x, np.nan)
        got_l, got_lse = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
        cross_entropy_fused(got_l, got_lse, d, x, t, eps, -100, 1.0 / N)
        np.testing.assert_array_equal(got_l, want_l)
        np.testing.assert_array_equal(got_lse, want_lse)
        np.testing.assert_array_equal(d, want_d)
        if not in_place:
            np.testing.assert_array_equal(x, kept)
    with pytest.raises(GraphError, match="dloss.*scalar"):
        cross_entropy_fused(got_l, got_lse, d, x, t, eps, -100, np.ones(N, np.float32))
    with pytest.raises(GraphError, match="targets"):
        bad = t.copy()
        bad[0] = V
        cross_entropy_fused(got_l, got_lse, d, x, bad, eps, -100, 1.0)


def test_cross_entropy_backward_rejects_a_partly_overlapping_output(rng):
    buf = f32(rng.normal(size=(9, 16)))
    lse = np.zeros(8, np.float32)
    with pytest.raises(GraphError, match="dlogits.*overlaps"):
        cross_entropy_backward(buf[1:], buf[:-1], lse, np.zeros(8, np.int64))


def test_cross_entropy_large_vocab(rng):
    N, V = 7, 50257
    logits, t = _ce_case(rng, N, V, 0.0)
    losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)
    cross_entropy_forward(losses, lse, logits, t, 0.1, -100)
    rl, rlse = rb.cross_entropy(logits, t, 0.1, -100)
    assert_close(losses, rl, atol=1e-5, rtol=1e-5, what="losses")
    assert_close(lse, rlse, atol=1e-5, rtol=1e-5, what="lse")
    dlogits = np.empty_like(logits)
    cross_entropy_backward(dlogits, logits, lse, t, 0.1, -100, 1.0 / N)
    assert_grad(dlogits, rb.cross_entropy_backward(logits, t, 0.1, -100, 1.0 / N), "dlogits")


def test_cross_entropy_all_rows_ignored(rng):
    logits = f32(rng.normal(size=(5, 9)))
    t = np.full(5, -100)
    losses, lse = np.full(5, np.nan, np.float32), np.empty(5, np.float32)
    cross_entropy_forward(losses, lse, logits, t, 0.1, -100)
    assert not losses.any()
    mean, n = cross_entropy_mean(losses, t, -100)
    assert (mean, n) == (0.0, 0)
    dlogits = np.full_like(logits, np.nan)
    cross_entropy_backward(dlogits, logits, lse, t, 0.1, -100, 1.0 / max(n, 1))
    assert not dlogits.any()


def test_cross_entropy_deterministic(rng):
    logits, t = _ce_case(rng, 64, 3000, 0.1)

    def run():
        losses, lse, d = np.empty(64, np.float32), np.empty(64, np.float32), np.empty_like(logits)
        cross_entropy_forward(losses, lse, logits, t, 0.1, -100)
        cross_entropy_backward(d, logits, lse, t, 0.1, -100, 1 / 64)
        return losses, lse, d, cross_entropy_mean(losses, t)[0]
    assert_bitwise_same(thread_counts(run))


def test_cross_entropy_rejects_bad_targets(rng):
    logits = f32(rng.normal(size=(3, 4)))
    losses, lse = np.empty(3, np.float32), np.empty(3, np.float32)
    for bad in (np.array([0, 4, 1]), np.array([0, -1, 1]), np.array([0.0, 1.0, 2.0]), np.array([0, 1])):
        with pytest.raises(GraphError, match="'targets'"):
            cross_entropy_forward(losses, lse, logits, bad, 0.0, -100)
        with pytest.raises(GraphError, match="'targets'"):
            cross_entropy_backward(np.empty_like(logits), logits, lse, bad, 0.0, -100, 1.0)
    with pytest.raises(GraphError, match="'lse'"):
        cross_entropy_forward(losses, np.empty(4, np.float32), logits, np.array([0, 1, 2]))


# ================================================================ dropout
def test_dropout_zero_p_is_identity(rng):
    x = f32(rng.normal(size=(3, 5, 7)))
    out = np.empty_like(x)
    dropout_forward(out, x, 0.0, seed=1, offset=0)
    assert np.array_equal(out, x)
    dropout_backward(out, x, 0.0, 1, 0)
    assert np.array_equal(out, x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics_and_reference(p):
    n = 200_000
    x = np.ones(n, np.float32)
    out = np.empty_like(x)
    dropout_forward(out, x, p, seed=123, offset=77)
    kept = out != 0
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert np.allclose(out[kept], np.float32(1 / (1 - p)))
    assert_close(out, rb.dropout(x, p, 123, 77), atol=0, rtol=1e-6)  # same counter hash as NumPy


def test_dropout_backward_regenerates_forward_mask(rng):
    x, dout = f32(rng.normal(size=(4, 33, 16))), f32(rng.normal(size=(4, 33, 16)))
    out, dx = np.empty_like(x), np.empty_like(x)
    dropout_forward(out, x, 0.3, 42, 1000)
    dropout_backward(dx, dout, 0.3, 42, 1000)
    assert np.array_equal(out != 0, dx != 0)
    assert_close(dx, rb.dropout(dout, 0.3, 42, 1000), atol=0, rtol=1e-6)


def test_dropout_offsets_seeds_and_aliasing(rng):
    x = np.ones(4096, np.float32)
    a, b, c, d = (np.empty_like(x) for _ in range(4))
    dropout_forward(a, x, 0.5, 7, 0)
    dropout_forward(b, x, 0.5, 7, 0)
    dropout_forward(c, x, 0.5, 7, 4096)
    dropout_forward(d, x, 0.5, 8, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # offset shifts the counter: element i at offset o+1 equals element i+1 at offset o
    e = np.empty_like(x)
    dropout_forward(e, x, 0.5, 7, 1)
    assert np.array_equal(e[:-1], a[1:])
    y = f32(rng.normal(size=4096))
    want = np.empty_like(y)
    dropout_forward(want, y, 0.5, 7, 0)
    dropout_forward(y, y, 0.5, 7, 0)  # in place
    assert np.array_equal(y, want)
    outs = thread_counts(lambda: (dropout_forward(b, x, 0.5, 7, 0), b.copy())[1:])
    assert_bitwise_same(outs)


def test_dropout_rejects_bad_args():
    x = np.ones(8, np.float32)
    with pytest.raises(GraphError, match="'p'"):
        dropout_forward(np.empty_like(x), x, 1.0, 0, 0)
    with pytest.raises(GraphError, match="'seed'"):
        dropout_forward(np.empty_like(x), x, 0.5, -1, 0)
    with pytest.raises(GraphError, match="'out'"):
        dropout_forward(np.empty(9, np.float32), x, 0.5, 0, 0)


# ================================================================ optimizer
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_torch_10_steps(rng, decoupled, wd):
    n, lr, betas, eps = 1000, 1e-2, (0.9, 0.98), 1e-9
    p0 = f32(rng.normal(size=n))
    grads = [f32(rng.normal(size=n)) for _ in range(10)]
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    tp = torch.nn.Parameter(torch.tensor(p0))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    rp, rm, rv = p0.astype(np.float64), np.zeros(n), np.zeros(n)
    for step, g in enumerate(grads, 1):
        adam_step(p, g, m, v, lr, betas[0], betas[1], eps, wd, step, decoupled)
        tp.grad = torch.tensor(g)
        opt.step()
        rp, rm, rv = rb.adam_step(rp, g, rm, rv, lr, betas[0], betas[1], eps, wd, step, decoupled)
    # same float32 operation sequence as torch (its fmas included); torch's CPU sqrt is 1 ulp off on
    # some inputs, so params differ by a few ulps: 1e-6 relative to the tensor's largest element
    st = opt.state[tp]
    for what, got, want in (("params", p, tp.detach().numpy()), ("m", m, st["exp_avg"].numpy()),
                            ("v", v, st["exp_avg_sq"].numpy())):
        assert_close(got, want, atol=1e-6 * np.abs(want).max(), rtol=1e-6, what=what + " vs torch")
    assert_close(p, rp, atol=1e-5 * np.abs(rp).max(), rtol=1e-5, what="params vs float64 reference")


def test_adam_rejects_bad_args():
    a = np.zeros(4, np.float32)
    with pytest.raises(GraphError, match="'v'"):
        adam_step(a, a.copy(), a.copy(), np.zeros(5, np.float32), 1e-3, step=1)
    with pytest.raises(GraphError, match="'step'"):
        adam_step(a, a.copy(), a.copy(), a.copy(), 1e-3, step=0)
    with pytest.raises(GraphError, match="'grads'"):
        adam_step(a, np.zeros(4), a.copy(), a.copy(), 1e-3)


def test_global_grad_norm_and_clipping(rng):
    gs = [f32(rng.normal(size=s)) for s in ((300_001,), (7, 33), (1,))]
    norm = global_grad_norm(gs)
    assert abs(norm - rb.global_grad_norm(gs)) <= 1e-12 * norm
    assert global_grad_norm(gs[1]) == pytest.approx(rb.global_grad_norm(gs[1]), rel=1e-12)
    assert_bitwise_same(thread_counts(lambda: (global_grad_norm(gs),)))
    g = gs[0].copy()  # the vectorised sum keeps IEEE semantics: a non-finite gradient shows in the norm
    g[123_457] = np.nan
    assert np.isnan(global_grad_norm([g, gs[1]]))
    g[123_457] = np.inf
    assert global_grad_norm([g, gs[1]]) == np.inf
    ts = [torch.tensor(g, requires_grad=True) for g in gs]
    for t, g in zip(ts, gs):
        t.grad = torch.tensor(g)
    tnorm = torch.nn.utils.clip_grad_norm_(ts, 1.0).item()
    got = clip_grad_norm_(gs, 1.0)
    assert got == pytest.approx(tnorm, rel=1e-5)  # torch sums in float32; ours matches float64 to 1e-12
    for t, g in zip(ts, gs):
        assert_close(g, t.grad.numpy(), atol=1e-9, rtol=1e-5)
    assert global_grad_norm(gs) == pytest.approx(1.0, rel=1e-5)
    h = np.ones(5, np.float32)
    scale_(h, 0.5)
    assert np.array_equal(h, np.full(5, 0.5, np.float32))


def test_schedules():
    d, w = 512, 4000
    assert noam_lr(1, d, w) == pytest.approx(d ** -0.5 * w ** -1.5)
    assert noam_lr(w, d, w) == pytest.approx(d ** -0.5 * w ** -0.5)
    assert noam_lr(w, d, w) == max(noam_lr(s, d, w) for s in (1, w // 2, w - 1, w, w + 1, 4 * w))
    assert noam_lr(16000, d, w, factor=2.0) == pytest.approx(2.0 * d ** -0.5 * 16000 ** -0.5)
    assert cosine_lr(0, 1e-3, 100, 1000) == 0.0
    assert cosine_lr(50, 1e-3, 100, 1000) == pytest.approx(5e-4)
    assert cosine_lr(100, 1e-3, 100, 1000) == pytest.approx(1e-3)
    assert cosine_lr(550, 1e-3, 100, 1000, 1e-4) == pytest.approx(5.5e-4)
    assert cosine_lr(1000, 1e-3, 100, 1000, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(5000, 1e-3, 100, 1000, 1e-4) == pytest.approx(1e-4)
    for s in range(0, 1200, 37):
        assert cosine_lr(s, 1e-3, 100, 1000, 1e-4) == pytest.approx(rb.cosine_lr(s, 1e-3, 100, 1000, 1e-4))
    assert cosine_lr(0, 1e-3, 0, 10) == pytest.approx(1e-3)
