"""The attention kernels' register-blocked micro-kernels (nbformer/kernels/cpu/microkernel.py):
a float64 reference at ragged shapes, strided and transposed operands, and the same bits from the
AVX2 (6 x 16) and AVX-512 (12 x 32) blocks (LLVM lowers the 16-wide vectors on any x86 host)."""
import numpy as np
import pytest
from numba import njit

from nbformer.kernels.cpu import microkernel as mk


def _runner(fn):
    @njit
    def run(C, c_off, ldc, M, N, A, a_off, a_t, a_r, B, b_off, ldb, nt, accumulate):
        fn(C, c_off, ldc, M, N, A, a_off, a_t, a_r, B, b_off, ldb, nt, accumulate)
    return run


_RUN = {"avx2": _runner(mk._rank_update), "avx512": _runner(mk._rank_update16)}


def _case(rng, M, N, nt, transposed):
    ldc, ldb = N + 5, N + 3
    if transposed:  # A[t, r] stored as (nt, M + 2): a_t = M + 2, a_r = 1
        a_t, a_r, a_size = M + 2, 1, max(nt, 1) * (M + 2) + 4
    else:  # A[r, t] stored as (M, nt + 3): a_t = 1, a_r = nt + 3
        a_t, a_r, a_size = 1, nt + 3, M * (nt + 3) + 4
    A = rng.normal(size=a_size).astype(np.float32)
    B = rng.normal(size=max(nt, 1) * ldb + 7).astype(np.float32)
    C0 = rng.normal(size=M * ldc + 9).astype(np.float32)
    return dict(A=A, B=B, C0=C0, ldc=ldc, ldb=ldb, a_t=a_t, a_r=a_r, a_off=2, b_off=3, c_off=4)


def _reference(c, M, N, nt, accumulate):
    out = c["C0"].astype(np.float64).copy()
    for r in range(M):
        for j in range(N):
            s = float(out[c["c_off"] + r * c["ldc"] + j]) if accumulate else 0.0
            for t in range(nt):
                s += float(c["A"][c["a_off"] + t * c["a_t"] + r * c["a_r"]]) * float(c["B"][c["b_off"] + t * c["ldb"] + j])
            out[c["c_off"] + r * c["ldc"] + j] = s
    return out


@pytest.mark.parametrize("M,N", [(1, 1), (5, 7), (12, 32), (13, 33), (25, 64), (6, 17), (4, 48)])
@pytest.mark.parametrize("nt", [0, 1, 19])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("accumulate", [0, 1])
def test_micro_kernels_match_the_reference_and_each_other(rng, M, N, nt, transposed, accumulate):
    c = _case(rng, M, N, nt, transposed)
    want = _reference(c, M, N, nt, accumulate)
    got = {}
    for name, run in _RUN.items():
        C = c["C0"].copy()
        run(C, c["c_off"], c["ldc"], M, N, c["A"], c["a_off"], c["a_t"], c["a_r"], c["B"], c["b_off"], c["ldb"], nt,
            accumulate)
        np.testing.assert_allclose(C, want, rtol=1e-5, atol=1e-5, err_msg=name)
        untouched = np.ones(C.size, bool)  # nothing outside the M x N block of C is written
        for r in range(M):
            untouched[c["c_off"] + r * c["ldc"]:c["c_off"] + r * c["ldc"] + N] = False
        np.testing.assert_array_equal(C[untouched], c["C0"][untouched], err_msg=name)
        got[name] = C
    np.testing.assert_array_equal(got["avx2"], got["avx512"])


def test_rank_update_is_the_hosts_kernel():
    assert mk.rank_update is (mk._rank_update16 if mk._host_has_avx512() else mk._rank_update)
