"""Fused softmax + cross-entropy with label smoothing and an ignore index (torch semantics).

Per row i with target t (eps = label_smoothing, V classes, lse = logsumexp(logits[i])):
    loss_i = (1 - eps) * (lse - logits[i, t]) + eps * (lse - mean_j logits[i, j]),  0 if t == ignore_index
    dlogits[i] = dloss_i * (softmax(logits[i]) - (1 - eps) * onehot(t) - eps / V), 0 if ignored
torch's reduction='mean' is sum(loss_i) / n_valid: cross_entropy_mean.
Row sums are float64 (the exp sum: of float32 partial sums over 256 classes); rows are independent,
so every result is bit-identical for any thread count.
"""
import math

import numpy as np
from numba import njit, prange

from ...errors import GraphError
from .attention import _exp2
from .checks import check_array as _check
from .gemm import check_threads, num_threads
from .precompile import BOOL, F1, F2, F64, I64, R1, R2, RI1, kernel


_FM = {"contract", "afn", "reassoc", "nsz", "arcp"}  # no nnan/ninf: -inf logits stay meaningful
_LOG2E = np.float32(1.4426950408889634)
_SPAN = 256  # terms of the exp sum added in float32 (16-wide vectors) before the float64 sum: a float64
# accumulator halved the vector width and made the forward 1.6x slower (2.9 vs 1.8 ms, 1024 x 8192)


@njit(inline="always", fastmath=_FM)
def _row_max(row):
    # max over a float32 row in 8 independent lanes: a single running max is a chain of dependent
    # compare-selects that LLVM does not vectorise (4.5 ms for 1024 x 8192 logits on 2 threads vs 0.8)
    V = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= V:
        m0, m1, m2, m3 = max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]), max(m3, row[j + 3])
        m4, m5, m6, m7 = max(m4, row[j + 4]), max(m5, row[j + 5]), max(m6, row[j + 6]), max(m7, row[j + 7])
        j += 8
    while j < V:
        m0 = max(m0, row[j])
        j += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _forward_row(losses, lse, row, i, t, eps, ignore_index):
    # losses[i], lse[i] of one row of logits, target t. exp through the attention kernel's vectorisable
    # exp2 (arguments <= 0; rel. error ~1e-7); the loops vectorise with a fixed lane order
    V = row.shape[0]
    m = _row_max(row)
    s = 0.0
    j = 0
    while j < V:  # float32 sums of 256 terms (<= 1 each: relative error < 2^-16), added in float64
        p = np.float32(0.0)
        if j + _SPAN <= V:  # (a constant trip count: the loop vectorises)
            for jj in range(j, j + _SPAN):
                p += _exp2((row[jj] - m) * _LOG2E)
        else:
            for jj in range(j, V):
                p += _exp2((row[jj] - m) * _LOG2E)
        s += p
        j += _SPAN
    sx = 0.0
    if eps != 0.0:
        for j in range(V):
            sx += row[j]
    l = np.float64(m) + math.log(s)
    lse[i] = l
    if t == ignore_index:
        losses[i] = 0.0
    else:
        loss = (1.0 - eps) * (l - row[t])
        if eps != 0.0:  # skipped when 0 so that -inf logits (masked classes) keep a finite loss
            loss += eps * (l - sx / V)
        losses[i] = loss


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _backward_row(out, row, l, t, d, eps, ignore_index, in_place):
    # out = d * (softmax(row) - (1 - eps) onehot(t) - eps / V) from the row's float32 lse l; 0 where
    # ignored. in_place: out is row itself, read and written through out alone: through two arrays
    # that are one, LLVM's overlap check fails at run time and the loop ran scalar (13.5 vs 3.0 ms
    # for 1024 x 8192 logits). Both loops do the same operations on each element: the same bits.
    V = out.shape[0]
    smooth = np.float32(eps / V)
    if t == ignore_index:
        for j in range(V):
            out[j] = 0.0
    else:
        xt = row[t]  # read before the row is overwritten (in-place use)
        if in_place:
            for j in range(V):
                out[j] = d * (_exp2((out[j] - l) * _LOG2E) - smooth)  # float32 throughout
        else:
            for j in range(V):
                out[j] = d * (_exp2((row[j] - l) * _LOG2E) - smooth)
        out[t] = d * (_exp2((xt - l) * _LOG2E) - smooth - np.float32(1.0 - eps))


@kernel((F1, F1, R2, RI1, F64, I64), cost=1.5)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _cross_entropy_forward(losses, lse, logits, targets, eps, ignore_index):
    # logits (N, V); targets (N,) int64, range-checked by the launcher; losses, lse (N,)
    for i in prange(logits.shape[0]):
        _forward_row(losses, lse, logits[i], i, targets[i], eps, ignore_index)


@kernel((F2, R2, R1, RI1, F64, I64, F64, R1, BOOL, BOOL), cost=1.6)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _cross_entropy_backward(dlogits, logits, lse, targets, eps, ignore_index, dscale, drow, use_row, in_place):
    # in_place: dlogits is logits itself (the training graph overwrites the logits with their gradient)
    for i in prange(logits.shape[0]):
        d = np.float32(drow[i] if use_row else dscale)
        _backward_row(dlogits[i], logits[i], lse[i], targets[i], d, eps, ignore_index, in_place)


@kernel((F1, F1, F2, R2, RI1, F64, I64, F64, BOOL), cost=1.6)
@njit(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
def _cross_entropy_fused(losses, lse, dlogits, logits, targets, eps, ignore_index, dscale, in_place):
    # _cross_entropy_forward, then _cross_entropy_backward with a scalar dloss, row by row: the row is
    # read from memory once and its gradient written while it is still in L1 (the two kernels read
    # the N x V logits three times); the same bits as the two
    for i in prange(logits.shape[0]):
        row, t = logits[i], targets[i]
        _forward_row(losses, lse, row, i, t, eps, ignore_index)
        _backward_row(dlogits[i], row, lse[i], t, np.float32(dscale), eps, ignore_index, in_place)


@kernel((R1, RI1, I64), cost=0.5)
@njit(cache=True)
def _masked_mean(losses, targets, ignore_index):
    s = 0.0
    n = 0
    for i in range(losses.shape[0]):  # sequential float64 sum: deterministic
        if targets[i] != ignore_index:
            s += losses[i]
            n += 1
    return s, n


def _targets(op, targets, lead, V, ignore_index):
    """targets (...) integers in [0, V) or == ignore_index -> flat contiguous int64."""
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise GraphError(f"{op}: 'targets' must hold integers, got {t.dtype}")
    if tuple(t.shape) != tuple(lead):
        raise GraphError(f"{op}: 'targets' has shape {t.shape}, expected {tuple(lead)}")
    t = np.ascontiguousarray(t, dtype=np.int64).reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise GraphError(f"{op}: 'targets' holds {int(t[i])} at flat position {i}, expected a class in "
                         f"[0, {V}) or ignore_index={ignore_index}")
    return t


def _smoothing(op, label_smoothing):
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise GraphError(f"{op}: 'label_smoothing' is {eps}, expected a value in [0, 1]")
    return eps


def _check_logits(op, logits):
    _check(op, "logits", logits, None)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise GraphError(f"{op}: 'logits' has shape {logits.shape}, expected (..., V) with V >= 1")
    return logits.shape[-1], logits.shape[:-1]


def _check_gradient(op, dlogits, logits):
    """(dlogits, logits) as (N, V) views and whether they are one array (checked: the same array or
    not overlapping at all)."""
    _check(op, "dlogits", dlogits, logits.shape)
    V = logits.shape[-1]
    d2, x2 = dlogits.reshape(-1, V), logits.reshape(-1, V)
    in_place = d2.ctypes.data == x2.ctypes.data
    if not in_place and np.may_share_memory(d2, x2):
        raise GraphError(f"{op}: 'dlogits' overlaps 'logits' without being the same array: pass logits itself "
                         f"(in place) or a separate buffer")
    return d2, x2, in_place


def _check_forward(op, losses, lse, logits, targets, label_smoothing, ignore_index):
    """The forward's arguments checked: (V, eps, flat int64 targets)."""
    V, lead = _check_logits(op, logits)
    _check(op, "losses", losses, lead)
    _check(op, "lse", lse, lead)
    return V, _smoothing(op, label_smoothing), _targets(op, targets, lead, V, int(ignore_index))


def cross_entropy_forward(losses, lse, logits, targets, label_smoothing=0.0, ignore_index=-100, *, threads=None):
    """logits (..., V) float32, targets (...) int -> losses (...) per row (0 where ignored) and
    lse (...) = logsumexp of each row (saved for backward). torch reduction='none' semantics.
    threads: Numba threads for this call (None: unchanged); rows are independent, so never a bit."""
    op = "cross_entropy_forward"
    V, eps, t = _check_forward(op, losses, lse, logits, targets, label_smoothing, ignore_index)
    threads = check_threads(op, threads)
    with num_threads(threads):
        _cross_entropy_forward(losses.reshape(-1), lse.reshape(-1), logits.reshape(-1, V), t, eps, int(ignore_index))


def cross_entropy_backward(dlogits, logits, lse, targets, label_smoothing=0.0, ignore_index=-100, dloss=1.0, *,
                           threads=None):
    """dlogits (..., V) = dloss_row * (softmax(logits) - (1 - eps) * onehot(target) - eps / V), 0 on
    ignored rows. dloss: a scalar applied to every row (1 / n_valid for the mean) or an array (...).
    Written, not accumulated; dlogits may be logits itself (in place: saves N*V floats), and must not
    otherwise overlap it.
    threads: Numba threads for this call (None: unchanged); rows are independent, so never a bit."""
    op = "cross_entropy_backward"
    V, lead = _check_logits(op, logits)
    _check(op, "lse", lse, lead)
    eps = _smoothing(op, label_smoothing)
    t = _targets(op, targets, lead, V, int(ignore_index))
    if np.ndim(dloss) == 0:
        use_row, dscale, drow = False, float(dloss), lse.reshape(-1)
    else:
        _check(op, "dloss", dloss, lead)
        use_row, dscale, drow = True, 0.0, dloss.reshape(-1)
    threads = check_threads(op, threads)
    d2, x2, in_place = _check_gradient(op, dlogits, logits)
    with num_threads(threads):
        _cross_entropy_backward(d2, x2, lse.reshape(-1), t, eps, int(ignore_index), dscale, drow, use_row, in_place)


def cross_entropy_fused(losses, lse, dlogits, logits, targets, label_smoothing=0.0, ignore_index=-100, dloss=1.0, *,
                        threads=None):
    """cross_entropy_forward and then cross_entropy_backward with a scalar dloss, in one pass over
    the rows (a training step's loss, whose gradient is known before the forward: 1 / n_valid):
    the same losses, lse and dlogits, bit for bit. dlogits may be logits itself (in place)."""
    op = "cross_entropy_fused"
    V, eps, t = _check_forward(op, losses, lse, logits, targets, label_smoothing, ignore_index)
    if np.ndim(dloss) != 0:
        raise GraphError(f"{op}: 'dloss' must be a scalar (one scale for every row), got shape {np.shape(dloss)}")
    threads = check_threads(op, threads)
    d2, x2, in_place = _check_gradient(op, dlogits, logits)
    with num_threads(threads):
        _cross_entropy_fused(losses.reshape(-1), lse.reshape(-1), d2, x2, t, eps, int(ignore_index), float(dloss),
                             in_place)


def cross_entropy_mean(losses, targets, ignore_index=-100):
    """(mean over non-ignored rows as a Python float, n_valid). All rows ignored -> (0.0, 0), not NaN."""
    op = "cross_entropy_mean"
    _check(op, "losses", losses, None)
    t = np.asarray(targets)
    if t.dtype.kind not in "iu" or t.shape != losses.shape:
        raise GraphError(f"{op}: 'targets' is {t.dtype} {t.shape}, expected integers of shape {losses.shape}")
    s, n = _masked_mean(losses.reshape(-1), np.ascontiguousarray(t, dtype=np.int64).reshape(-1), int(ignore_index))
    return (s / n if n else 0.0), int(n)
