"""Fused softmax + cross-entropy with label smoothing and an ignore index on the GPU (CUDA twin of
kernels/cpu/loss.py: same launchers, argument order and torch semantics).

Per row i with target t (eps = label_smoothing, V classes, lse = logsumexp(logits[i])):
    loss_i = (1 - eps) * (lse - logits[i, t]) + eps * (lse - mean_j logits[i, j]),  0 if t == ignore_index
    dlogits[i] = dloss_i * (softmax(logits[i]) - (1 - eps) * onehot(t) - eps / V), 0 if ignored

Forward: a block holds R rows of L lanes each (L a power of two, R * L threads); a lane strides over
its row's columns, then a fixed-order shared-memory tree combines the lanes (max, then the float64
sums of exp(x - max) and, with smoothing, of x). exp is float32 and every sum float64, as on the CPU;
the bits are the same on every run (they depend on L, not on the grid). Backward is elementwise
(float32 throughout, like the CPU) with no reduction, one thread per logit on a grid-stride loop;
dlogits may alias logits (each element is read and then written by the same thread).

Targets: a (...) int64 device array is taken as is, its values NOT checked (that would need a copy
back): the caller validates them on the host first (each a class in [0, V) or ignore_index), as the
trainer does when it builds the batch. A host integer array is validated here exactly like the CPU
launcher does (GraphError naming 'targets'), then uploaded.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ..cpu import loss as _cpu
from ._jit import SIMULATOR, cuda, kernel
from .elementwise import (check_device_array, group_max_f64, group_sum_f64, grid_blocks, is_device_array,
                          launch_threads)

# forward: threads per block (a power of two), lanes per row (None: the smallest power of two giving
# each lane at most `per_lane` columns, capped at threads), grid cap; backward: grid-stride launch.
# Under the simulator (one Python thread per CUDA thread) smaller blocks keep model tests fast.
TUNABLES = {
    "cross_entropy_forward": {"threads": 32 if SIMULATOR else 256, "lanes": None, "per_lane": 4, "max_blocks": 65535},
    "cross_entropy_backward": {"threads": 64 if SIMULATOR else 256, "max_blocks": 8192},
}

_FWD = {}


def _forward_kernel(L, R, smooth):
    """The forward variant for L lanes per row, R rows per block, with/without the smoothing sum
    (compile-time constants; made once, then from the dict)."""
    key = (L, R, smooth)
    fn = _FWD.get(key)
    if fn is not None:
        return fn
    LANES, ROWS, SMOOTH = L, R, smooth

    @kernel(cache=True)
    def cross_entropy_forward_rows(losses, lse, logits, targets, eps, ignore_index):
        # logits (N, V); targets (N,) int64; losses, lse (N,). Row group r of the block takes row
        # rb * ROWS + r of each row-block rb of its grid-stride loop; rows past N reduce -inf / 0
        # (every thread reaches every syncthreads of the reductions).
        sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
        tid = cuda.threadIdx.x
        r = tid // LANES
        lane = tid - r * LANES
        N = logits.shape[0]
        V = logits.shape[1]
        nrb = (N + ROWS - 1) // ROWS
        for rb in range(cuda.blockIdx.x, nrb, cuda.gridDim.x):
            i = rb * ROWS + r
            valid = i < N
            m = -math.inf
            if valid:
                for j in range(lane, V, LANES):
                    if logits[i, j] > m:  # NaN never wins, like the CPU's max
                        m = float64(logits[i, j])
            m = group_max_f64(sh, m, tid, lane, LANES)
            mf = float32(m)
            s = float64(0.0)
            sx = float64(0.0)
            if valid:
                for j in range(lane, V, LANES):
                    xj = logits[i, j]
                    s += float64(float32(math.exp(xj - mf)))  # float32 exp of an argument <= 0
                    if SMOOTH:
                        sx += float64(xj)
            s = group_sum_f64(sh, s, tid, lane, LANES)
            if SMOOTH:
                sx = group_sum_f64(sh, sx, tid, lane, LANES)
            if valid and lane == 0:
                lv = m + math.log(s)
                lse[i] = float32(lv)
                t = targets[i]
                if t == ignore_index:
                    losses[i] = 0.0
                else:
                    loss = (1.0 - eps) * (lv - float64(logits[i, t]))
                    if SMOOTH:  # skipped when eps = 0 so that -inf logits keep a finite loss
                        loss += eps * (lv - sx / V)
                    losses[i] = float32(loss)

    _FWD[key] = cross_entropy_forward_rows
    return cross_entropy_forward_rows


@kernel(cache=True)
def _cross_entropy_backward_kernel(dlogits, logits, lse, targets, drow, dscale, use_row, smooth, one_minus_eps,
                                   ignore_index):
    # dlogits, logits (N, V) (may alias); lse, drow (N,) float32; float32 arithmetic like the CPU's
    N = logits.shape[0]
    V = logits.shape[1]
    for e in range(cuda.grid(1), N * V, cuda.gridsize(1)):
        i = e // V
        j = e - i * V
        t = targets[i]
        if t == ignore_index:
            dlogits[i, j] = 0.0
        else:
            d = drow[i] if use_row else dscale
            g = float32(math.exp(logits[i, j] - lse[i])) - smooth
            if j == t:
                g = g - one_minus_eps
            dlogits[i, j] = d * g


def _logits(op, logits):
    check_device_array(op, "logits", logits)
    shape = tuple(logits.shape)
    if len(shape) < 1 or shape[-1] < 1:
        raise GraphError(f"{op}: 'logits' has shape {shape}, expected (..., V) with V >= 1")
    return shape[-1], shape[:-1]


def _targets(op, targets, lead, V, ignore_index):
    """A device int64 array of shape lead (values trusted: host-validated by the caller) or a host
    integer array (validated like the CPU's, then uploaded) -> flat (N,) int64 device array."""
    if is_device_array(targets):
        check_device_array(op, "targets", targets, lead, np.int64)
        return targets.reshape(int(np.prod(lead, dtype=np.int64)))
    if not isinstance(targets, np.ndarray):
        raise GraphError(f"{op}: 'targets' must be an integer array, got {type(targets).__name__}")
    return cuda.to_device(_cpu._targets(op, targets, lead, V, ignore_index))


def _lanes(op, tun, V, t, lanes):
    L = tun["lanes"] if lanes is None else lanes
    if L is None:
        need = -(-V // max(1, int(tun["per_lane"])))
        L = 1
        while L < need and L < t:
            L *= 2
    L = int(L)
    if L < 1 or L & (L - 1) or L > t:
        raise GraphError(f"{op}: lanes per row must be a power of two in [1, threads={t}], got {L}")
    return L


def cross_entropy_forward(losses, lse, logits, targets, label_smoothing=0.0, ignore_index=-100, *,
                          threads=None, lanes=None, max_blocks=None):
    """logits (..., V) float32 device array, targets (...) int -> losses (...) per row (0 where
    ignored) and lse (...) = logsumexp of each row (saved for backward). torch reduction='none'.

    targets: an int64 device array already validated on the host (values unchecked here), or a host
    integer array (checked here, then uploaded)."""
    op, tun = "cross_entropy_forward", TUNABLES["cross_entropy_forward"]
    V, lead = _logits(op, logits)
    check_device_array(op, "losses", losses, lead)
    check_device_array(op, "lse", lse, lead)
    eps = _cpu._smoothing(op, label_smoothing)
    ii = int(ignore_index)
    t = launch_threads(op, tun, threads, pow2=True)
    L = _lanes(op, tun, V, t, lanes)
    tg = _targets(op, targets, lead, V, ii)
    N = int(np.prod(lead, dtype=np.int64))
    if N == 0:
        return
    R = t // L
    mb = int(tun["max_blocks"] if max_blocks is None else max_blocks)
    if mb < 1:
        raise GraphError(f"{op}: max_blocks must be >= 1, got {mb}")
    nb = min(-(-N // R), mb)
    _forward_kernel(L, R, eps != 0.0)[nb, t, 0, 8 * t](losses.reshape(N), lse.reshape(N), logits.reshape(N, V),
                                                        tg, eps, ii)


def cross_entropy_backward(dlogits, logits, lse, targets, label_smoothing=0.0, ignore_index=-100, dloss=1.0, *,
                           threads=None, max_blocks=None):
    """dlogits (..., V) = dloss_row * (softmax(logits) - (1 - eps) * onehot(target) - eps / V), 0 on
    ignored rows. dloss: a scalar applied to every row (1 / n_valid for the mean) or a float32 array
    (...) (device, or host: uploaded). Written, not accumulated; dlogits may alias logits.
    targets as for cross_entropy_forward."""
    op, tun = "cross_entropy_backward", TUNABLES["cross_entropy_backward"]
    V, lead = _logits(op, logits)
    check_device_array(op, "dlogits", dlogits, tuple(logits.shape))
    check_device_array(op, "lse", lse, lead)
    eps = _cpu._smoothing(op, label_smoothing)
    ii = int(ignore_index)
    N = int(np.prod(lead, dtype=np.int64))
    if is_device_array(dloss):
        check_device_array(op, "dloss", dloss, lead)
        use_row, dscale, drow = True, 0.0, dloss.reshape(N)
    elif np.ndim(dloss) == 0:
        use_row, dscale, drow = False, float(dloss), lse.reshape(N)
    else:
        if not isinstance(dloss, np.ndarray):
            raise GraphError(f"{op}: 'dloss' must be a scalar or a float32 array, got {type(dloss).__name__}")
        _cpu._check(op, "dloss", dloss, lead)
        use_row, dscale, drow = True, 0.0, cuda.to_device(dloss.reshape(N))
    t = launch_threads(op, tun, threads)
    tg = _targets(op, targets, lead, V, ii)
    if N == 0:
        return
    _cross_entropy_backward_kernel[grid_blocks(op, tun, N * V, t, max_blocks), t](
        dlogits.reshape(N, V), logits.reshape(N, V), lse.reshape(N), tg, drow, np.float32(dscale), use_row,
        np.float32(eps / V), np.float32(1.0 - eps), ii)


def cross_entropy_fused(losses, lse, dlogits, logits, targets, label_smoothing=0.0, ignore_index=-100, dloss=1.0,
                        **tuned):
    """cross_entropy_forward and then cross_entropy_backward with a scalar dloss (the training graph's
    fused loss node; on the CPU one pass over the rows): here the two kernels, the targets checked
    and uploaded once; tuned: the forward's tunables."""
    op = "cross_entropy_fused"
    V, lead = _logits(op, logits)
    if np.ndim(dloss) != 0:
        raise GraphError(f"{op}: 'dloss' must be a scalar (one scale for every row), got shape {np.shape(dloss)}")
    tg = _targets(op, targets, lead, V, int(ignore_index))
    cross_entropy_forward(losses, lse, logits, tg, label_smoothing, ignore_index, **tuned)
    cross_entropy_backward(dlogits, logits, lse, tg, label_smoothing, ignore_index, float(dloss))


def cross_entropy_mean(losses, targets, ignore_index=-100):
    """(mean over non-ignored rows as a Python float, n_valid); all rows ignored -> (0.0, 0).

    A host reduction (the CPU's, same bits): device losses / targets are copied back (N values,
    small next to the logits); host arrays are used as they are."""
    if is_device_array(losses):
        check_device_array("cross_entropy_mean", "losses", losses)
        losses = losses.copy_to_host()
    if is_device_array(targets):
        targets = targets.copy_to_host()
    return _cpu.cross_entropy_mean(losses, targets, ignore_index)
