"""The attention backward's fused tile kernel (nbformer/kernels/cpu/attention_backward_tile.py): S and dP
products, P and dS in registers. Against a float64 reference at ragged shapes, strided and offset
operands; bit for bit against the two products + element-wise pass it replaced (so the backward's bits
did not move), the AVX2 and AVX-512 block sets against each other, and its exp2 against attention._exp2."""
import numpy as np
import pytest
from numba import njit

from nbformer.kernels.cpu import attention_backward_tile as tile
from nbformer.kernels.cpu.attention import _exp2
from nbformer.kernels.cpu.attention_backward import _FM
from nbformer.kernels.cpu.microkernel import rank_update

_LOG2E_F = np.float32(1.4426950408889634)
_ZERO = np.float32(0.0)


def _runner(fn, fastmath=False):
    @njit(fastmath=fastmath)
    def run(P, dS, c_off, ldc, M, N, Q, G, q_off, a_t, a_r, KT, VT, ldb, nt, lse, delta, l_off, allow, scale):
        fn(P, dS, c_off, ldc, M, N, Q, G, q_off, a_t, a_r, KT, VT, ldb, nt, lse, delta, l_off, allow, scale)
    return run


# Numba's fastmath pass rewrites the flags of everything in the caller's module, the kernel's IR
# included: called from a fastmath function (as attention_backward._pair is) it must give the same bits.
_RUN = {"avx512": _runner(tile._pds_tile16), "avx2": _runner(tile._pds_tile8),
        "avx512 from fastmath": _runner(tile._pds_tile16, _FM), "avx2 from fastmath": _runner(tile._pds_tile8, _FM)}


@njit(fastmath=_FM, error_model="numpy")  # the flags of attention_backward._pair (FMA contraction in _exp2)
def _unfused(P, dS, c_off, ldc, M, N, Q, G, q_off, a_t, a_r, KT, VT, ldb, nt, lse, delta, l_off, allow, scale):
    # what attention_backward._pair did before the fused kernel: two rank updates, then per element
    Z = np.int64(0)
    rank_update(P, c_off, ldc, M, N, Q, q_off, a_t, a_r, KT, Z, ldb, nt, Z)
    rank_update(dS, c_off, ldc, M, N, G, q_off, a_t, a_r, VT, Z, ldb, nt, Z)
    lf, df = lse.reshape(lse.size), delta.reshape(delta.size)
    for r in range(M):
        L2 = lf[l_off + r] * _LOG2E_F
        Di = df[l_off + r]
        for c in range(N):
            k = c_off + r * ldc + c
            p = _exp2(min(P[k] - L2, _ZERO)) * allow[c]
            P[k] = p
            dS[k] = p * (dS[k] - Di) * scale


def _case(rng, M, N, nt, transposed):
    ldc, ldb = N + 5, N + 3
    if transposed:  # Q[t, r] stored as (nt, M + 2)
        a_t, a_r, size = M + 2, 1, max(nt, 1) * (M + 2) + 4
    else:  # Q[r, t] stored as (M, nt + 3)
        a_t, a_r, size = 1, nt + 3, M * (nt + 3) + 4
    f32 = np.float32
    return dict(
        P=rng.normal(size=M * ldc + 9).astype(f32), dS=rng.normal(size=M * ldc + 9).astype(f32), c_off=4, ldc=ldc,
        M=M, N=N, Q=rng.normal(size=size).astype(f32), G=rng.normal(size=size).astype(f32), q_off=2, a_t=a_t,
        a_r=a_r, KT=(0.3 * rng.normal(size=max(nt, 1) * ldb)).astype(f32),
        VT=rng.normal(size=max(nt, 1) * ldb).astype(f32), ldb=ldb, nt=nt,
        lse=(rng.normal(size=(2, 1, M + 3)) + 2).astype(f32), delta=rng.normal(size=(2, 1, M + 3)).astype(f32),
        l_off=M + 3 + 1, allow=(rng.random(N) > 0.25).astype(f32), scale=np.float32(0.125))


_ORDER = ("P", "dS", "c_off", "ldc", "M", "N", "Q", "G", "q_off", "a_t", "a_r", "KT", "VT", "ldb", "nt", "lse",
          "delta", "l_off", "allow", "scale")


def _call(fn, c):
    P, dS = c["P"].copy(), c["dS"].copy()
    fn(P, dS, *(c[k] for k in _ORDER[2:]))
    return P, dS


def _reference(c):
    M, N, nt = c["M"], c["N"], c["nt"]
    Q, G = c["Q"].astype(np.float64), c["G"].astype(np.float64)
    rows = c["q_off"] + np.arange(M)[:, None] * c["a_r"] + np.arange(nt)[None, :] * c["a_t"]  # (M, nt)
    KT = c["KT"].astype(np.float64)[:nt * c["ldb"]].reshape(nt, c["ldb"])[:, :N] if nt else np.zeros((0, N))
    VT = c["VT"].astype(np.float64)[:nt * c["ldb"]].reshape(nt, c["ldb"])[:, :N] if nt else np.zeros((0, N))
    s, dp = Q[rows] @ KT, G[rows] @ VT
    L = c["lse"].reshape(-1)[c["l_off"]:c["l_off"] + M].astype(np.float64)[:, None]
    D = c["delta"].reshape(-1)[c["l_off"]:c["l_off"] + M].astype(np.float64)[:, None]
    p = np.exp2(np.minimum(s - L * np.log2(np.e), 0.0)) * c["allow"]
    return p, p * (dp - D) * float(c["scale"])


def _block(a, c):
    return a[c["c_off"]:c["c_off"] + c["M"] * c["ldc"]].reshape(c["M"], c["ldc"])[:, :c["N"]]


def _outside(c):
    mask = np.ones(c["P"].size, bool)
    for r in range(c["M"]):
        mask[c["c_off"] + r * c["ldc"]:c["c_off"] + r * c["ldc"] + c["N"]] = False
    return mask


@pytest.mark.parametrize("M,N", [(1, 1), (5, 7), (6, 32), (13, 49), (64, 64), (2, 17), (7, 33), (12, 48)])
@pytest.mark.parametrize("nt", [0, 1, 19, 64])
@pytest.mark.parametrize("transposed", [False, True])
def test_tile_matches_the_reference_the_unfused_path_and_both_block_sets(rng, M, N, nt, transposed):
    c = _case(rng, M, N, nt, transposed)
    want_p, want_ds = _reference(c)
    unfused = _call(_unfused, c)
    outside = _outside(c)
    for name, run in _RUN.items():
        P, dS = _call(run, c)
        np.testing.assert_allclose(_block(P, c), want_p, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(_block(dS, c), want_ds, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_array_equal(P[outside], c["P"][outside], err_msg=f"{name}: wrote outside the block")
        np.testing.assert_array_equal(dS[outside], c["dS"][outside], err_msg=f"{name}: wrote outside the block")
        # the same bits as the products + element-wise pass, and as the other ISA's blocks
        np.testing.assert_array_equal(P, unfused[0], err_msg=name)
        np.testing.assert_array_equal(dS, unfused[1], err_msg=name)


def test_host_dispatch():
    from nbformer.kernels.cpu.microkernel import _host_has_avx512
    assert tile.pds_tile is (tile._pds_tile16 if _host_has_avx512() else tile._pds_tile8)


@njit(fastmath=_FM, error_model="numpy")
def _exp2_scalar(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _exp2(min(x[i], _ZERO))
    return out


def test_exp2_is_attention_exp2_and_nan_propagates():
    # nt = 0: S = 0, so P = exp2(min(-lse * log2(e), 0)); lse chosen to sweep the exponent's argument
    x = np.concatenate([np.linspace(-120, 0, 4001), [-80.0, -79.999, -100.0, -1e-30, 0.0, 3.0, -np.inf, np.nan]])
    x = x.astype(np.float32)
    M = x.size
    lse = (-x / _LOG2E_F).astype(np.float32).reshape(1, 1, M)
    arg = np.float32(0.0) - lse.reshape(-1) * _LOG2E_F  # what the kernel feeds exp2, in float32
    for name, run in _RUN.items():
        P, dS = np.zeros(M, np.float32), np.zeros(M, np.float32)
        run(P, dS, 0, 1, M, 1, np.zeros(1, np.float32), np.zeros(1, np.float32), 0, 1, 1, np.zeros(1, np.float32),
            np.zeros(1, np.float32), 1, 0, lse, np.ones((1, 1, M), np.float32), 0, np.ones(1, np.float32),
            np.float32(1.0))
        np.testing.assert_array_equal(P, _exp2_scalar(arg), err_msg=name)
        finite = np.isfinite(arg) & (arg > -80)
        np.testing.assert_allclose(P[finite], np.exp2(np.minimum(arg[finite].astype(np.float64), 0)), rtol=3e-7)
        assert (P[arg < -80] == 0).all() and P[x == 3.0][0] == 1.0
        assert np.isnan(P[np.isnan(arg)]).all() and np.isnan(dS[np.isnan(arg)]).all(), name


def test_nan_inputs_give_nan_and_padding_keys_zero(rng):
    c = _case(rng, 13, 40, 19, False)
    c["Q"][c["q_off"] + 3 * c["a_r"] + 5] = np.nan  # row 3 of S is NaN
    c["allow"][:] = 1.0
    c["allow"][7] = 0.0
    for name, run in _RUN.items():
        P, dS = _call(run, c)
        Pb, dSb = _block(P, c), _block(dS, c)
        assert np.isnan(Pb[3]).all() and np.isnan(dSb[3]).all(), name
        others = np.delete(np.arange(13), 3)
        assert np.isfinite(Pb[others]).all() and (Pb[others, 7] == 0).all() and (dSb[others, 7] == 0).all(), name
