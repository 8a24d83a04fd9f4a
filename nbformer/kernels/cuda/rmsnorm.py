"""RMSNorm over the last axis on the GPU (Llama): out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps),
saving rstd for the backward pass (CUDA twin of kernels/cpu/rmsnorm.py).

Forward: one block per row; each thread sums the squares of its strided columns in float64, a
fixed-order shared-memory tree combines the threads (block_sum_f64), rstd is rounded to float32
once and out = (x * rstd) * w in float32, as on the CPU. Deterministic bits on every run.

Backward (rmsnorm_backward), two kernels, no float atomics, no scratch buffer:
- dw: a block owns `cols` columns; its `lanes` groups of threads take fixed chunks of `rows` rows
  (chunk lane, lane + lanes, ... in rounds), each summing its chunk's dout * norm in float64 in row
  order, and lane 0 adds the chunk partials in chunk order. With rows = 64 (the default) that is the
  CPU's order exactly (kernels/cpu/rmsnorm.py ROWS_PER_CHUNK): the CPU twin's dw bits. Launched
  first, so that dx may alias dout.
- dx: one block per row; mean(dnorm * norm) in float64 through one fixed-order shared-memory tree
  (the products formed in float64 as on the CPU), then dx = rstd * (dout * w - norm * a).
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ._jit import SIMULATOR, blocks, cuda, kernel
from .elementwise import block_sum_f64, check_device_array, launch_threads

# threads per block (a power of two; one block per row) for forward and backward dx; backward dw:
# blocks of cols x lanes threads over chunks of `rows` rows. Smaller blocks under the simulator.
TUNABLES = {"rmsnorm_forward": {"threads": 16 if SIMULATOR else 128},
            "rmsnorm_backward": ({"threads": 16, "cols": 8, "lanes": 2, "rows": 64} if SIMULATOR else
                                 {"threads": 128, "cols": 8, "lanes": 128, "rows": 64})}
# Whether a tunable can change the result bits (for the tuner): threads shapes the row reductions'
# trees; rows fixes the dw chunks (64 = the CPU's chunks, hence its bits); cols and lanes only say who
# computes which chunk.
BIT_CHANGING = {"rmsnorm_forward": {"threads": True},
                "rmsnorm_backward": {"threads": True, "cols": False, "lanes": False, "rows": True}}
MAX_THREADS = 1024


@kernel(cache=True)
def _rmsnorm_kernel(out, rstd, x, w, eps):
    # x, out (N, C); rstd (N,); w (C,); block i normalises row i. out may alias x: every element is
    # read by the thread that then writes it, after the row sum (whose tree holds barriers).
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    s = float64(0.0)
    for c in range(tid, C, nt):
        v = float64(x[i, c])
        s += v * v
    tot = block_sum_f64(sh, s, tid, nt)
    rf = float32(1.0 / float64(math.sqrt(tot / C + eps)))  # float64(): inf, not an exception (simulator)
    for c in range(tid, C, nt):
        out[i, c] = x[i, c] * rf * w[c]
    if tid == 0:
        rstd[i] = rf


def _lead(op, x):
    check_device_array(op, "x", x)
    if len(x.shape) < 1 or tuple(x.shape)[-1] < 1:
        raise GraphError(f"{op}: 'x' has shape {tuple(x.shape)}, expected (..., C) with C >= 1")
    return tuple(x.shape)[-1], tuple(x.shape)[:-1]


def rmsnorm_forward(out, rstd, x, w, eps, *, threads=None):
    """out (..., C) = x * rstd * w with rstd (...) = 1 / sqrt(mean(x^2) + eps), written for backward.

    Device arrays, float32, C-contiguous; out may alias x. `threads` overrides
    TUNABLES['rmsnorm_forward'] (a power of two). Asynchronous: launched on the default stream."""
    op = "rmsnorm_forward"
    C, lead = _lead(op, x)
    check_device_array(op, "out", out, x.shape)
    check_device_array(op, "w", w, (C,))
    check_device_array(op, "rstd", rstd, lead)
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    N = int(np.prod(lead, dtype=np.int64))
    if N == 0:
        return
    _rmsnorm_kernel[N, t, 0, 8 * t](out.reshape(N, C), rstd.reshape(N), x.reshape(N, C), w, float(eps))


# ---------------------------------------------------------------- backward
@kernel(cache=True)
def _rmsnorm_dw_kernel(dw, dout, x, rstd, cols, rows):
    # dw (C,) = sum over rows of dout * norm, norm = x * rstd (float32, as in the forward); x, dout
    # (N, C); rstd (N,). Thread tid: column bx*cols + tid % cols, lane tid // cols; sh: 8 * blockDim
    # bytes (dynamic).
    sh = cuda.shared.array(0, float64)
    N = x.shape[0]
    C = x.shape[1]
    nt = cuda.blockDim.x
    tid = cuda.threadIdx.x
    lanes = nt // cols
    lane = tid // cols
    j = tid - lane * cols
    c = cuda.blockIdx.x * cols + j
    nchunk = (N + rows - 1) // rows
    tw = 0.0
    for base in range(0, nchunk, lanes):
        k = base + lane
        pw = 0.0
        if c < C and k < nchunk:
            for i in range(k * rows, min(N, (k + 1) * rows)):  # rows in order (float64, the CPU's sums)
                n = x[i, c] * rstd[i]
                pw += float64(dout[i, c] * n)
        sh[tid] = pw
        cuda.syncthreads()
        if lane == 0 and c < C:
            for q in range(min(lanes, nchunk - base)):  # chunks in order
                tw += sh[q * cols + j]
        cuda.syncthreads()  # before the next round overwrites sh
    if lane == 0 and c < C:
        dw[c] = float32(tw)


@kernel(cache=True)
def _rmsnorm_dx_kernel(dx, dout, x, w, rstd):
    # dx (N, C) = rstd * (dnorm - norm * mean(dnorm * norm)), dnorm = dout * w; block i does row i.
    # Each element of dout is read again by the thread that then writes dx: dx may alias dout.
    sh = cuda.shared.array(0, float64)  # 8 * blockDim bytes (dynamic)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    r = rstd[i]
    s = float64(0.0)
    for c in range(tid, C, nt):
        s += float64(dout[i, c] * w[c]) * float64(x[i, c] * r)
    a = float32(block_sum_f64(sh, s, tid, nt) / C)
    for c in range(tid, C, nt):
        n = x[i, c] * r
        dx[i, c] = r * (dout[i, c] * w[c] - n * a)


def rmsnorm_backward(dx, dw, dout, x, w, rstd, **tunables):
    """Adjoint of rmsnorm_forward (the CUDA twin of kernels/cpu/rmsnorm.py's).

    x, dout, dx (..., C); w, dw (C,); rstd (...) from the forward. With norm = x * rstd and
    dnorm = dout * w: dx = rstd * (dnorm - norm * mean(dnorm * norm)), dw = sum_rows(dout * norm).
    Both written, not accumulated; dw over fixed chunks of `rows` rows (float64 partials) in a fixed
    order (the CPU's bits at rows=64). dx may alias dout. Device arrays, float32, C-contiguous.
    Tunables (keywords override TUNABLES['rmsnorm_backward']): threads, cols, lanes, rows.
    Asynchronous: launched on the default stream.
    """
    op = "rmsnorm_backward"
    C, lead = _lead(op, x)
    check_device_array(op, "dout", dout, x.shape)
    check_device_array(op, "dx", dx, x.shape)
    check_device_array(op, "w", w, (C,))
    check_device_array(op, "dw", dw, (C,))
    check_device_array(op, "rstd", rstd, lead)
    tun = TUNABLES[op]
    unknown = sorted(set(tunables) - set(tun))
    if unknown:
        raise GraphError(f"{op}: unknown tunable(s) {unknown}, expected some of {sorted(tun)}")
    t = {**tun, **tunables}
    nt = launch_threads(op, t, pow2=True)
    for name in ("cols", "lanes", "rows"):
        v = t[name]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise GraphError(f"{op}: tunable {name}={v!r}, expected a positive int")
    cols, rows = int(t["cols"]), int(t["rows"])
    if cols * int(t["lanes"]) > MAX_THREADS:
        raise GraphError(f"{op}: cols={cols} x lanes={t['lanes']} threads per block, at most {MAX_THREADS}")
    N = int(np.prod(lead, dtype=np.int64))
    x2, dout2, r1 = x.reshape(N, C), dout.reshape(N, C), rstd.reshape(N)
    lanes = max(1, min(int(t["lanes"]), blocks(N, rows)))  # no idle lanes (not bit-changing)
    bt = cols * lanes
    # dw first (it reads dout; dx may overwrite it); N = 0 writes zeros
    _rmsnorm_dw_kernel[blocks(C, cols), bt, 0, 8 * bt](dw, dout2, x2, r1, cols, rows)
    if N == 0:
        return
    _rmsnorm_dx_kernel[N, nt, 0, 8 * nt](dx.reshape(N, C), dout2, x2, w, r1)
