"""Attention backward on the CPU: nbformer's kernel vs torch scaled_dot_product_attention's backward.

B=1, NH=12, HS=64, T=1024 by default (--T 256 1024 4096), causal and not, float32, same process,
--threads for both (numba prange pool / torch intra-op pool).

torch: q, k, v (B, NH, T, HS) with requires_grad, out = SDPA(q, k, v, is_causal=causal) once, then
the timed call is torch.autograd.grad(out, (q, k, v), dO, retain_graph=True): the backward only
(fresh gradient tensors, no accumulation into .grad).
nbformer: attention_forward once on a fused (B, T, 3C) QKV buffer (as the model graph does), then the
timed call is attention_backward (delta = rowsum(dO * O) included) into a fused dQKV buffer.

Timing: --rounds rounds; in each, both sides run as a block (one untimed call, a short pause, then
--repeat timed calls; block medians), the side that goes first alternating round by round. The ratio
(torch time / nbformer time, > 1: nbformer faster) is taken per round; the table gives the median
ratio over rounds and its min..max spread. Blocks rather than call-by-call alternation: numba's and
torch's OpenMP pools each spin after a parallel region (see bench_attention.py).
FLOPs: the usual 2.5x the forward's convention, 10*B*NH*T*T*HS (half if causal).

    python benchmarks/bench_attention_backward.py [--threads 2] [--T 1024] [--rounds 5] [--repeat 3]
        [--blocks BQ BK] [--sweep] [--md benchmarks/results/attention_backward.md] [--label after]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import common
from common import bench_args, set_threads

B, NH, HS = 1, 12, 64
SWEEP = [(32, 32), (48, 48), (64, 64), (96, 96), (128, 64), (64, 128), (128, 128)]


def make_case(T, causal, seed=0):
    import numpy as np
    import torch

    from nbformer.kernels.cpu.attention import attention_forward

    C = NH * HS
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    mask = np.ones((B, T), np.uint8)
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    attention_forward(out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, causal, HS ** -0.5)
    t = torch.from_numpy(qkv.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4).copy())
    q, k, v = (t[i].contiguous().requires_grad_(True) for i in range(3))
    tout = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    tdo = torch.from_numpy(dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3).copy())
    return dict(qkv=qkv, dout=dout, mask=mask, out=out, lse=lse, q=q, k=k, v=v, tout=tout, tdo=tdo,
                dqkv=np.empty_like(qkv), delta=np.empty((B, NH, T), np.float32), causal=causal)


KERNEL_MODULE = "nbformer.kernels.cpu.attention_backward"


def nb_call(c, blocks=None, **kw):
    import importlib

    attention_backward = importlib.import_module(KERNEL_MODULE).attention_backward

    C = NH * HS
    if blocks is not None:
        kw.update(block_q=blocks[0], block_k=blocks[1])
    return lambda: attention_backward(c["dqkv"], c["dqkv"], c["delta"], c["dout"], c["out"], c["lse"], c["qkv"], 0,
                                      c["qkv"], C, 2 * C, c["mask"], NH, HS, c["causal"], HS ** -0.5, **kw)


def torch_call(c):
    import torch

    return lambda: torch.autograd.grad(c["tout"], (c["q"], c["k"], c["v"]), c["tdo"], retain_graph=True)


def max_diff_vs_torch(c):
    import numpy as np

    C = NH * HS
    T = c["qkv"].shape[1]
    nb_call(c)()
    g = torch_call(c)()
    want = np.concatenate([x.detach().numpy().transpose(0, 2, 1, 3).reshape(B, T, C) for x in g], axis=-1)
    scale = float(np.abs(want).max())
    return float(np.abs(c["dqkv"] - want).max()) / scale


def block(fn, repeat):
    fn()
    time.sleep(0.05)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rounds(fns: dict, n_rounds: int, repeat: int) -> dict:
    """name -> list of per-round block medians; the order of the sides alternates per round."""
    names = list(fns)
    res = {k: [] for k in names}
    for r in range(n_rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            res[k].append(block(fns[k], repeat))
    return res


def flops(T, causal):
    f = 10 * B * NH * T * T * HS
    return f // 2 if causal else f


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=3)
    p.add_argument("--T", type=int, nargs="+", default=[1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blocks", type=int, nargs=2, default=None, help="nbformer (block_q, block_k)")
    p.add_argument("--passes", type=int, default=None, help="nbformer: force 1 or 2 passes")
    p.add_argument("--sweep", action="store_true", help="also time nbformer alone at several block sizes")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--md", default=None, help="append the table to this markdown file")
    p.add_argument("--label", default="", help="a label for the appended table")
    p.add_argument("--kernel-module", default=KERNEL_MODULE,
                   help="module whose attention_backward is timed (e.g. an older copy on sys.path, for before/after)")
    args = p.parse_args(argv)
    globals()["KERNEL_MODULE"] = args.kernel_module
    threads = set_threads(args.threads)  # before numpy import (and torch before numba's pool)

    kw = {} if args.passes is None else {"passes": args.passes}
    rows = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    for T in args.T:
        for causal in causals:
            c = make_case(T, causal)
            nb, th = nb_call(c, args.blocks, **kw), torch_call(c)
            for _ in range(args.warmup):
                nb(), th()
            err = max_diff_vs_torch(c)
            res = rounds({"nbformer": nb, "torch": th}, args.rounds, args.repeat)
            ratios = [t / n for n, t in zip(res["nbformer"], res["torch"])]
            tn, tt = statistics.median(res["nbformer"]), statistics.median(res["torch"])
            row = {"T": T, "causal": causal, "nbformer ms": tn * 1e3, "torch ms": tt * 1e3,
                   "nbformer GFLOP/s": flops(T, causal) / tn / 1e9, "torch GFLOP/s": flops(T, causal) / tt / 1e9,
                   "ratio (median)": statistics.median(ratios),
                   "ratio min..max": f"{min(ratios):.2f}..{max(ratios):.2f}",
                   "rel. max diff vs torch": err, "rounds": args.rounds}
            rows.append(row)
            print(f"T={T} causal={causal}: nbformer {tn * 1e3:.1f} ms, torch {tt * 1e3:.1f} ms, ratio "
                  f"{row['ratio (median)']:.2f} [{row['ratio min..max']}] (per-round: "
                  f"{' '.join(f'{x:.2f}' for x in ratios)}), rel diff {err:.1e}", flush=True)
            if args.sweep:
                fns = {f"{bq}x{bk}": nb_call(c, (bq, bk), **kw) for bq, bk in SWEEP}
                sres = rounds(fns, max(3, args.rounds // 2), args.repeat)
                for name, ts in sres.items():
                    print(f"    blocks {name}: {statistics.median(ts) * 1e3:.1f} ms "
                          f"({' '.join(f'{x * 1e3:.1f}' for x in ts)})", flush=True)

    cols = ["T", "causal", "nbformer ms", "torch ms", "nbformer GFLOP/s", "torch GFLOP/s", "ratio (median)",
            "ratio min..max", "rel. max diff vs torch", "rounds"]
    table = common.md_table(cols, rows)
    info = common.machine_info()
    text = (f"### {args.label or 'run'}\n\n" + table + "\n\n"
            f"`{' '.join(['python', 'benchmarks/bench_attention_backward.py'] + (argv or sys.argv[1:]))}`; "
            f"B={B}, NH={NH}, HS={HS}, fp32, {threads['threads']} threads each (numba "
            f"{threads.get('numba_threads')}, torch {threads.get('torch_threads')}); {args.rounds} rounds of "
            f"{args.repeat} timed calls per side; git {info['git']}; {info['date']}; load average "
            f"{info['loadavg_1_5_15']}\n\n")
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text)
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
