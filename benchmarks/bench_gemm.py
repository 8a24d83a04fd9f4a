"""GEMMs at the models' shapes: the product calls nbformer's layers make vs the ones torch's models make.

The training step, GPT-2 prefill and embedding benchmarks spend 75-90 % of their time in these
products, so their ratios to torch follow this one: nbformer calls single-threaded OpenBLAS (via
Numba) on one block per thread, torch calls its BLAS (MKL on x86) on its own thread pool. Each
row is one product at a benchmark's shape (M x K x N: out (M, N), inner dimension K), in the layouts
both models use:
  linear   nbformer linear_forward(out, x, w) with w (N, K) (nn.Linear layout, how nbformer keeps
           every weight); torch as its model computes it: F.linear(x, w) for nn.Linear layers (LM
           heads, BERT), torch.mm(x, w_kn) with w_kn (K, N) for GPT-2's Conv1D layers (addmm there);
  dx       dx = g @ w (both: w (N_out, K) as stored): nbformer linear_backward(dx, None, None, g, x, w)
           (its dX product alone: AMX where linear._on_amx takes it, gemm.matmul_nn otherwise), torch.mm;
  dW       dW = g.T @ x: nbformer linear_backward(None, dw, None, g, x, w) (AMX, or gemm.matmul_tn),
           torch.mm(g.t(), x).
On a host with AMX (gemm_amx.available()) the layers' products big enough run there (linear.py);
the "calls" column names the path each row took.
Shapes: the training benchmark's (B8 T128, d256, vocab 8192), GPT-2 124M prefill at T=256 and
all-MiniLM-L6-v2 on a 64 x 21-token batch. ratio = torch time / nbformer time per interleaved round
(> 1: nbformer faster).

    python benchmarks/bench_gemm.py [--threads 2] [--warmup 2] [--repeat 7]
"""
from __future__ import annotations

import sys

from common import bench_args, round_ratios, set_threads, spread, timeit_pair, write_results

# (name, kind, M, K, N, torch's call for "linear": "linear" (nn.Linear) or "conv1d" (x @ w_kn))
SHAPES = [
    ("train: LM head forward", "linear", 1024, 256, 8192, "linear"),
    ("train: LM head dx", "dx", 1024, 8192, 256, None),
    ("train: LM head dW", "dW", 8192, 1024, 256, None),
    ("train: FFN up", "linear", 1024, 256, 1024, "conv1d"),
    ("train: FFN down dx", "dx", 1024, 1024, 256, None),
    ("train: FFN up dW", "dW", 1024, 1024, 256, None),
    ("GPT-2 T=256: QKV", "linear", 256, 768, 2304, "conv1d"),
    ("GPT-2 T=256: FFN up", "linear", 256, 768, 3072, "conv1d"),
    ("GPT-2 T=256: FFN down", "linear", 256, 3072, 768, "conv1d"),
    ("GPT-2 T=256: LM head", "linear", 256, 768, 50257, "linear"),
    ("MiniLM 64x21: FFN up", "linear", 1344, 384, 1536, "linear"),
    ("MiniLM 64x21: FFN down", "linear", 1344, 1536, 384, "linear"),
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

    import torch.nn.functional as F

    from nbformer.kernels.cpu.gemm import auto_blocks
    from nbformer.kernels.cpu.linear import _on_amx, linear_backward, linear_forward

    rng = np.random.default_rng(0)
    rows, raw, headline = [], {}, []
    for name, kind, M, K, N, torch_call in SHAPES:
        out = np.empty((M, N), np.float32)
        if kind == "linear":  # out (M, N) = x (M, K) @ w.T, w (N, K)
            x, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            tw_kn = tw.t().contiguous()
            nb = lambda: linear_forward(out, x, w)  # noqa: E731
            tc = (lambda: F.linear(tx, tw)) if torch_call == "linear" else (lambda: torch.mm(tx, tw_kn))
            blocks = "AMX" if _on_amx(M, N, K) else f"{auto_blocks(M, N)}"
            call = f"linear_forward / {'F.linear' if torch_call == 'linear' else 'torch.mm (Conv1D)'}"
        elif kind == "dx":  # out (M, N) = g (M, K) @ w (K, N)
            g, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
            tg, tw = torch.from_numpy(g), torch.from_numpy(w)
            x_like = np.empty((M, N), np.float32)  # (x's shape is dx's; its values are not read)
            nb = lambda: linear_backward(out, None, None, g, x_like, w)  # noqa: E731
            tc = lambda: torch.mm(tg, tw)  # noqa: E731
            blocks = "AMX" if _on_amx(M, N, K) else f"{auto_blocks(M, N)}"
            call = f"linear_backward dX ({'AMX' if _on_amx(M, N, K) else 'matmul_nn'}) / torch.mm"
        else:  # dW: out (M, N) = g (K, M).T @ x (K, N)
            g, x = rng.standard_normal((K, M), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
            tg, tx = torch.from_numpy(g), torch.from_numpy(x)
            w_like = np.empty((M, N), np.float32)  # (w's shape is dW's; its values are not read)
            nb = lambda: linear_backward(None, out, None, g, x, w_like)  # noqa: E731
            tc = lambda: torch.mm(tg.t(), tx)  # noqa: E731
            blocks = "AMX" if _on_amx(M, N, K) else "tn_rows"
            call = f"linear_backward dW ({'AMX' if _on_amx(M, N, K) else 'matmul_tn'}) / torch.mm(g.t(), x)"
        res = _per_call(timeit_pair(_as_blocks({"nbformer": nb, "torch": tc}), warmup=args.warmup,
                                    repeat=args.repeat))
        ref = tc().numpy()
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        flop = 2.0 * M * K * N
        per_round = round_ratios(res)
        rows.append({"shape": f"{name} {M}x{K}x{N}", "calls (nbformer / torch)": call,
                     "nbformer GFLOP/s": flop / res["nbformer"]["median_s"] / 1e9,
                     "torch GFLOP/s": flop / res["torch"]["median_s"] / 1e9, "ratio per round": spread(per_round),
                     "blocks": f"{blocks}", "max rel diff": err})
        raw[name] = res
        headline.append((f"{name} {M}x{K}x{N}", f"per round {spread(per_round)}"))
        if err > 1e-5:
            print(f"WARNING: {name}: results differ by {err:.1e} (relative to the largest)", file=sys.stderr)
    notes = [f"median of the interleaved rounds, each a block of ~{BLOCK_S:g} s of back-to-back calls per side; "
             "ratio per round: torch time / nbformer time, median [min..max]",
             "nbformer: blocks 'AMX': the AMX GEMM (gemm_amx: fp32 from three bfloat16 parts, 32 x 32 blocks over "
             "the Numba threads, operands packed per thread); otherwise one OpenBLAS sgemm call per block "
             "(single-threaded), the blocks (gemm.auto_blocks: rows, cols; gemm.tn_rows: rows) over the Numba "
             "threads; torch: its intra-op pool"]
    md = write_results("gemm", "GEMMs at the models' shapes (nbformer / torch)",
                       ["shape", "calls (nbformer / torch)", "nbformer GFLOP/s", "torch GFLOP/s", "ratio per round",
                        "blocks", "max rel diff"], rows, notes,
                       extra={"raw": raw, "threads": threads, "headline": headline})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
