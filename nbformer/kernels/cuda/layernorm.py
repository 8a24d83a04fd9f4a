"""LayerNorm forward over the last axis on the GPU; saves mean and rstd for the backward pass
(CUDA twin of kernels/cpu/layernorm.py).

One block per row. Each thread sums its strided columns in float64, then a fixed-order
shared-memory tree combines the threads: row statistics in float64 like the CPU's, two passes
(mean, then the sum of squared deviations), deterministic bits on every run.

Backward (layernorm_backward), two kernels, no float atomics, no scratch buffer:
- dw, db: a block owns `cols` columns; its `lanes` groups of threads take fixed chunks of `rows` rows
  (chunk lane, lane + lanes, ... in rounds), each summing its chunk in float64 in row order, and
  lane 0 adds the chunk partials in chunk order. With rows = 64 (the default) that is the CPU's
  order exactly (kernels/cpu/layernorm.py): the same dw, db bits as the CPU twin. Launched first,
  so that dx may alias dout.
- dx: one block per row; the two row sums (of dout*w and dout*w*norm) in float64 through one
  fixed-order shared-memory tree, then the elementwise dx.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, float64

from ...errors import GraphError
from ._jit import SIMULATOR, blocks, cuda, device_function, kernel
from .elementwise import block_sum_f64, check_device_array, launch_threads

# threads per block (a power of two; one block per row) for forward and backward dx; backward dw/db:
# blocks of cols x lanes threads over chunks of `rows` rows. Smaller blocks under the simulator.
TUNABLES = {"layernorm_forward": {"threads": 128},
            "layernorm_backward": ({"threads": 16, "cols": 8, "lanes": 2, "rows": 64} if SIMULATOR else
                                   {"threads": 128, "cols": 8, "lanes": 128, "rows": 64})}
# Whether a tunable can change the result bits (for the tuner): the thread count shapes the row
# reductions' trees; rows fixes the dw/db chunks (64 = the CPU's chunks, hence its bits); cols and
# lanes only say who computes which chunk.
BIT_CHANGING = {"layernorm_forward": {"threads": True},
                "layernorm_backward": {"threads": True, "cols": False, "lanes": False, "rows": True}}


@kernel(cache=True)
def _layernorm_kernel(out, mean, rstd, x, w, b, eps):
    # x, out (N, C); mean, rstd (N,); w, b (C,); block i normalises row i
    sh = cuda.shared.array(0, float64)  # dynamic: one float64 per thread (sized at launch)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    s = float64(0.0)
    for c in range(tid, C, nt):
        s += float64(x[i, c])
    m = block_sum_f64(sh, s, tid, nt) / C
    v = float64(0.0)
    for c in range(tid, C, nt):
        d = float64(x[i, c]) - m
        v += d * d
    var = block_sum_f64(sh, v, tid, nt) / C
    r = 1.0 / float64(math.sqrt(var + eps))  # float64(): inf, not an exception, under the simulator
    mf = float32(m)
    rf = float32(r)
    for c in range(tid, C, nt):
        out[i, c] = (x[i, c] - mf) * rf * w[c] + b[c]
    if tid == 0:
        mean[i] = mf
        rstd[i] = rf


def layernorm_forward(out, mean, rstd, x, w, b, eps, *, threads=None):
    """out (..., C) = (x - mean) * rstd * w + b; mean, rstd (...) written for backward.

    Device arrays, float32, C-contiguous (views into an arena are fine when contiguous)."""
    op = "layernorm_forward"
    check_device_array(op, "x", x)
    if len(x.shape) < 1 or tuple(x.shape)[-1] < 1:
        raise GraphError(f"{op}: 'x' has shape {tuple(x.shape)}, expected (..., C) with C >= 1")
    C = tuple(x.shape)[-1]
    lead = tuple(x.shape)[:-1]
    check_device_array(op, "out", out, x.shape)
    check_device_array(op, "mean", mean, lead)
    check_device_array(op, "rstd", rstd, lead)
    check_device_array(op, "w", w, (C,))
    check_device_array(op, "b", b, (C,))
    t = launch_threads(op, TUNABLES[op], threads, pow2=True)
    N = int(np.prod(lead, dtype=np.int64))
    if N == 0:
        return
    _layernorm_kernel[N, t, 0, 8 * t](out.reshape(N, C), mean.reshape(N), rstd.reshape(N), x.reshape(N, C), w, b,
                            float(eps))


# ---------------------------------------------------------------- backward
MAX_THREADS = 1024


@kernel(cache=True)
def _layernorm_dwdb_kernel(dw, db, dout, x, mean, rstd, cols, rows):
    # dw, db (C,) = sums over rows of dout * norm and of dout; x, dout (N, C); mean, rstd (N,).
    # Thread tid: column bx*cols + tid % cols, lane tid // cols; sh: 16 * blockDim bytes (dynamic).
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
    tb = 0.0
    for base in range(0, nchunk, lanes):
        k = base + lane
        pw = 0.0
        pb = 0.0
        if c < C and k < nchunk:
            for i in range(k * rows, min(N, (k + 1) * rows)):  # rows in order (float64, the CPU's sums)
                n = (x[i, c] - mean[i]) * rstd[i]  # float32, as in the forward
                g = dout[i, c]
                pw += float64(g * n)
                pb += float64(g)
        sh[tid] = pw
        sh[nt + tid] = pb
        cuda.syncthreads()
        if lane == 0 and c < C:
            for q in range(min(lanes, nchunk - base)):  # chunks in order
                tw += sh[q * cols + j]
                tb += sh[nt + q * cols + j]
        cuda.syncthreads()  # before the next round overwrites sh
    if lane == 0 and c < C:
        dw[c] = float32(tw)
        db[c] = float32(tb)


@device_function
def _block_sum2_f64(sh, a, b, tid, nt):
    # two fixed-order shared-memory trees at once (sh: 2 * nt float64); every thread gets both sums
    sh[tid] = a
    sh[nt + tid] = b
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            sh[tid] = sh[tid] + sh[tid + s]
            sh[nt + tid] = sh[nt + tid] + sh[nt + tid + s]
        cuda.syncthreads()
        s //= 2
    ra = sh[0]
    rb = sh[nt]
    cuda.syncthreads()
    return ra, rb


@kernel(cache=True)
def _layernorm_dx_kernel(dx, dout, x, w, mean, rstd):
    # dx (N, C) = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w; block i
    # does row i. Each element of dout is read again by the thread that then writes dx: dx may alias dout.
    sh = cuda.shared.array(0, float64)  # 16 * blockDim bytes (dynamic)
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    m = mean[i]
    r = rstd[i]
    s1 = float64(0.0)
    s2 = float64(0.0)
    for c in range(tid, C, nt):
        n = (x[i, c] - m) * r
        dn = dout[i, c] * w[c]
        s1 += float64(dn)
        s2 += float64(dn * n)
    t1, t2 = _block_sum2_f64(sh, s1, s2, tid, nt)
    a = float32(t1 / C)
    bb = float32(t2 / C)
    for c in range(tid, C, nt):
        n = (x[i, c] - m) * r
        dx[i, c] = r * (dout[i, c] * w[c] - a - n * bb)


def layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, **tunables):
    """Adjoint of layernorm_forward (the CUDA twin of kernels/cpu/layernorm.py's).

    x, dout, dx (..., C); w, dw, db (C,); mean, rstd (...) from the forward. dx = rstd * (dnorm -
    mean(dnorm) - norm * mean(dnorm * norm)) with dnorm = dout * w; dw = sum_rows(dout * norm),
    db = sum_rows(dout). All three written, not accumulated; dw/db over fixed chunks of `rows` rows
    (float64 partials) in a fixed order (the CPU's bits at rows=64). dx may alias dout. Device arrays,
    float32, C-contiguous. Tunables (keywords override TUNABLES['layernorm_backward']): threads,
    cols, lanes, rows. Asynchronous: launched on the default stream.
    """
    op = "layernorm_backward"
    check_device_array(op, "x", x)
    if len(x.shape) < 1 or tuple(x.shape)[-1] < 1:
        raise GraphError(f"{op}: 'x' has shape {tuple(x.shape)}, expected (..., C) with C >= 1")
    C = tuple(x.shape)[-1]
    lead = tuple(x.shape)[:-1]
    check_device_array(op, "dout", dout, x.shape)
    check_device_array(op, "dx", dx, x.shape)
    for name, a in (("w", w), ("dw", dw), ("db", db)):
        check_device_array(op, name, a, (C,))
    check_device_array(op, "mean", mean, lead)
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
    x2, dout2 = x.reshape(N, C), dout.reshape(N, C)
    lanes = max(1, min(int(t["lanes"]), blocks(N, rows)))  # no idle lanes (not bit-changing)
    bt = cols * lanes
    # dw, db first (they read dout; dx may overwrite it); N = 0 writes zeros
    _layernorm_dwdb_kernel[blocks(C, cols), bt, 0, 16 * bt](dw, db, dout2, x2, mean.reshape(N), rstd.reshape(N),
                                                            cols, rows)
    if N == 0:
        return
    _layernorm_dx_kernel[N, nt, 0, 16 * nt](dx.reshape(N, C), dout2, x2, w, mean.reshape(N), rstd.reshape(N))
