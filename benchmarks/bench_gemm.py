"""GEMMs at the models' shapes: nbformer's blocked sgemm (gemm.matmul_nn, gemm.auto_blocks) vs torch.mm.

The training step, GPT-2 prefill and embedding benchmarks spend 75-90 % of their time in these
products, so their ratios to torch follow this one: nbformer calls single-threaded OpenBLAS (via
Numba) on one block per thread, torch calls its BLAS (MKL on x86) on its own thread pool. Shapes
(M x K x N, out = a (M, K) @ b (K, N)): the training benchmark's (B8 T128, d256, vocab 8192), GPT-2
124M prefill at T=256 and all-MiniLM-L6-v2 on a 64 x 21-token batch. ratio = torch time /
nbformer time per interleaved round (> 1: nbformer faster).

    python benchmarks/bench_gemm.py [--threads 2] [--warmup 2] [--repeat 7]
"""
from __future__ import annotations

import sys

from common import bench_args, round_ratios, set_threads, spread, timeit_pair, write_results

SHAPES = [
    ("train: LM head forward", 1024, 256, 8192),
    ("train: LM head dx", 1024, 8192, 256),
    ("train: LM head dW", 8192, 1024, 256),
    ("train: FFN up", 1024, 256, 1024),
    ("train: FFN down", 1024, 1024, 256),
    ("train: QKV", 1024, 256, 768),
    ("GPT-2 T=256: QKV", 256, 768, 2304),
    ("GPT-2 T=256: FFN up", 256, 768, 3072),
    ("GPT-2 T=256: FFN down", 256, 3072, 768),
    ("GPT-2 T=256: LM head", 256, 768, 50257),
    ("MiniLM 64x21: FFN up", 1344, 384, 1536),
    ("MiniLM 64x21: FFN down", 1344, 1536, 384),
]


BLOCK_S = 0.1  # each timed call is a block of calls of about this long: a call of a few ms right after
# the quiet-machine wait (idle cores) ran up to 3x slower than the next ones


def _as_blocks(fns: dict) -> dict:
    """name -> a callable running fn `n` times back to back (n: BLOCK_S / one warm call, >= 1)."""
    import time

    out = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        n = max(1, int(BLOCK_S / max(time.perf_counter() - t0, 1e-6)))

        def block(fn=fn, n=n):
            for _ in range(n):
                fn()
        block.calls = n
        out[name] = block
    _as_blocks.calls = {name: f.calls for name, f in out.items()}
    return out


def _per_call(res: dict) -> dict:
    """timeit_pair's summaries of blocks -> per call (the times divided by each block's calls)."""
    for name, r in res.items():
        n = _as_blocks.calls[name]
        for k in ("median_s", "min_s", "max_s"):
            r[k] /= n
        for k in ("times_s", "all_times_s"):
            r[k] = [t / n for t in r[k]]
        r["calls_per_block"] = n
    return res


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=7)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)  # before numpy import

    import numpy as np
    import torch

    from nbformer.kernels.cpu.gemm import auto_blocks, matmul_nn

    rng = np.random.default_rng(0)
    rows, raw, headline = [], {}, []
    for name, M, K, N in SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        out, tout = np.empty((M, N), np.float32), torch.empty(M, N)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        blocks = auto_blocks(M, N)
        single = {"nbformer": lambda: matmul_nn(out, a, b, *blocks), "torch": lambda: torch.mm(ta, tb, out=tout)}
        res = _per_call(timeit_pair(_as_blocks(single), warmup=args.warmup, repeat=args.repeat))
        err = float(np.max(np.abs(out - tout.numpy())) / np.max(np.abs(tout.numpy())))
        flop = 2.0 * M * K * N
        per_round = round_ratios(res)
        rows.append({"shape": f"{name} {M}x{K}x{N}", "nbformer GFLOP/s": flop / res["nbformer"]["median_s"] / 1e9,
                     "torch GFLOP/s": flop / res["torch"]["median_s"] / 1e9, "ratio per round": spread(per_round),
                     "blocks (rows, cols)": f"{blocks[0]}, {blocks[1]}", "max rel diff": err})
        raw[name] = res
        headline.append((f"{name} {M}x{K}x{N}", f"per round {spread(per_round)}"))
        if err > 1e-5:
            print(f"WARNING: {name}: results differ by {err:.1e} (relative to the largest)", file=sys.stderr)
    notes = [f"median of the interleaved rounds, each a block of ~{BLOCK_S:g} s of back-to-back calls per side; "
             "ratio per round: torch time / nbformer time, median [min..max]",
             "nbformer: one OpenBLAS sgemm call per block (single-threaded), the blocks over the Numba threads; "
             "torch: torch.mm(out=) on its intra-op pool"]
    md = write_results("gemm", "GEMMs at the models' shapes (nbformer matmul_nn / torch.mm)",
                       ["shape", "nbformer GFLOP/s", "torch GFLOP/s", "ratio per round", "blocks (rows, cols)",
                        "max rel diff"], rows, notes, extra={"raw": raw, "threads": threads, "headline": headline})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
