"""The CUDA streaming-read kernel of the roofline measurement: a grid-stride sum, one partial per
block (shared-memory tree, no shuffles: runs under the simulator too)."""
from numba import float32

from ..kernels.cuda._jit import cuda, kernel

MAX_THREADS = 1024  # shared scratch per block; blockDim.x must be a power of two <= this


@kernel
def read_sum(a, partial):
    """partial[block] = the sum of the elements its threads visit (each element read once)."""
    sh = cuda.shared.array(MAX_THREADS, float32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    s = float32(0.0)
    while i < a.size:
        s += a[i]
        i += stride
    sh[tid] = s
    cuda.syncthreads()
    w = nt // 2
    while w > 0:
        if tid < w:
            sh[tid] += sh[tid + w]
        cuda.syncthreads()
        w //= 2
    if tid == 0:
        partial[cuda.blockIdx.x] = sh[0]
