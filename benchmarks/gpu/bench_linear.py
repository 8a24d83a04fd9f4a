"""Our CUDA linear (tiled SGEMM / few-row path, fused epilogue; and its backward) vs torch.nn.functional.linear
(and its autograd backward), fp32, one GPU.

    PYTHONPATH=. python benchmarks/gpu/bench_linear.py [--runs 20] [--reps 10] [--warmup 3]
        [--only prefill|decode|backward] [--tunables '{"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8}']
        [--json benchmarks/results/gpu_linear.json] [--md benchmarks/results/gpu_linear.md]
    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python benchmarks/gpu/bench_linear.py --smoke   # script check, no GPU

Shapes: GPT-2 124M prefill (B*T = 8192 rows: attention qkv 768->2304, MLP fc 768->3072 with
gelu_tanh, MLP proj 3072->768) and decoding through the LM head (1 and 8 rows x 768->50257, no bias).
torch runs with TF32 off (allow_tf32 = False, float32 matmul precision "highest"): plain fp32 on CUDA
cores, like ours. Where a row has an activation, torch runs F.linear and then the activation (two
kernels), ours the fused epilogue.

Timing: CUDA events around `reps` back-to-back calls on the default stream, divided by reps; the
median over `runs` such rounds is reported with the min-max spread. Calls go through the public
launchers (argument checks included), so host overhead counts wherever it exceeds the kernel time,
as it would in the executor. Both sides share the same device buffers (torch tensors seen by Numba
through __cuda_array_interface__). Every row is first checked against torch (max relative error).

Backward (the same three prefill shapes, bias and activation as in the forward rows): our
linear_backward (g = dout * act'(pre) into a scratch buffer unless act is none, dx = g @ w, dw = g.T @ x
with db fused in: at most three kernels) vs torch.autograd.grad of act(F.linear(x, w, b)) for
(x, w, b) on a graph built once (retain_graph: the backward only, activation backward included).
Tunables in --tunables go to the launcher that takes them (dx_*, dw_*, bw_*, db_* to the backward).
Backward GFLOP/s = 4 N K M / t (the two GEMMs); max rel err = the worst of dx, dw, db vs torch, each
relative to that tensor's largest magnitude.

GFLOP/s = 2 N K M / t. GB/s = the minimal traffic (x, w, b read once, out written once) / t: the
number that matters for the memory-bound decoding rows. ratio nbformer/torch = our GFLOP/s over torch's
= torch time / our time (> 1: ours faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PREFILL = [  # (name, N, K, M, act, bias)
    ("qkv  768->2304", 8192, 768, 2304, "none", True),
    ("fc   768->3072", 8192, 768, 3072, "gelu_tanh", True),
    ("proj 3072->768", 8192, 3072, 768, "none", True),
]
DECODE = [
    ("lm_head 1 row", 1, 768, 50257, "none", False),
    ("lm_head 8 rows", 8, 768, 50257, "none", False),
]
SMOKE = [  # tiny shapes for a check of the script itself under the simulator
    ("smoke tiled", 40, 24, 20, "gelu_tanh", True),
    ("smoke few rows", 2, 24, 20, "none", False),
]
SMOKE_TUNABLES = {"BM": 8, "BN": 8, "BK": 4, "TM": 2, "TN": 2, "fr_threads": 16, "fr_lanes": 4, "fr_cols": 2,
                  "fr_kc": 8, "dx_BM": 8, "dx_BN": 8, "dx_BK": 4, "dx_TM": 2, "dx_TN": 2, "dw_BM": 8, "dw_BN": 8,
                  "dw_BK": 4, "dw_TM": 2, "dw_TN": 2, "bw_threads": 16, "bw_max_blocks": 4}
BACKWARD = PREFILL  # (name, N, K, M, act, bias): the backward of each prefill layer
SMOKE_BACKWARD = [("smoke backward", 40, 24, 20, "gelu_tanh", True), ("smoke backward none", 9, 12, 10, "none", True)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="timed rounds (median and spread over them)")
    p.add_argument("--reps", type=int, default=10, help="back-to-back calls per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (compilation, clocks)")
    p.add_argument("--only", choices=["prefill", "decode", "backward"], default=None)
    p.add_argument("--tunables", default="{}", help="JSON dict of overrides for our launcher")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, wall-clock timing: checks the script "
                                                         "under NUMBA_ENABLE_CUDASIM=1 (numbers meaningless)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from numba import cuda

    from nbformer.kernels.cuda import linear as L
    from nbformer.kernels.cuda._jit import SIMULATOR

    tunables = json.loads(args.tunables)
    if args.smoke:
        if not SIMULATOR:
            print("--smoke is meant for the simulator (NUMBA_ENABLE_CUDASIM=1)", file=sys.stderr)
        shapes, tunables = SMOKE, {**SMOKE_TUNABLES, **tunables}
        bshapes = SMOKE_BACKWARD if args.only in (None, "backward") else []
        shapes = shapes if args.only != "backward" else []
        args.runs, args.reps, args.warmup = min(args.runs, 2), 1, 0
        tdev = "cpu"
    else:
        if SIMULATOR or not cuda.is_available() or not torch.cuda.is_available():
            print("bench_linear needs a CUDA GPU, numba-cuda and a CUDA build of torch "
                  f"(simulator={SIMULATOR}, numba sees a GPU: {not SIMULATOR and cuda.is_available()}, "
                  f"torch sees a GPU: {torch.cuda.is_available()}); use --smoke to check the script", file=sys.stderr)
            return 2
        shapes = ((PREFILL if args.only in (None, "prefill") else []) +
                  (DECODE if args.only in (None, "decode") else []))
        bshapes = BACKWARD if args.only in (None, "backward") else []
        tdev = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    fwd_tunables = {k: v for k, v in tunables.items() if k not in L.BACKWARD_TUNABLES}
    bwd_tunables = {k: v for k, v in tunables.items() if k in L.BACKWARD_TUNABLES}
    acts = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
            "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}

    def as_numba(t):
        return cuda.to_device(t.numpy()) if tdev == "cpu" else cuda.as_cuda_array(t)

    def sync():
        if tdev == "cuda":
            torch.cuda.synchronize()
        cuda.synchronize()

    def timed(fn):
        """Per-call milliseconds of each timed round."""
        for _ in range(args.warmup):
            fn()
        sync()
        times = []
        for _ in range(args.runs):
            if tdev == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.reps):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / args.reps)
            else:
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3 / args.reps)
        return times

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, N, K, M, act, use_bias in shapes:
        x = torch.randn(N, K, generator=gen).to(tdev)
        w = (torch.randn(M, K, generator=gen) / K ** 0.5).to(tdev)
        b = torch.randn(M, generator=gen).to(tdev) if use_bias else None
        out = torch.empty(N, M, device=tdev)
        xd, wd, od = as_numba(x), as_numba(w), as_numba(out)
        bd = as_numba(b) if use_bias else None
        act_fn = acts[act]

        def ours():
            L.linear_forward(od, xd, wd, bd, act, None, **fwd_tunables)

        def theirs():
            return act_fn(F.linear(x, w, b))

        ours()
        sync()
        got = od.copy_to_host()
        want = theirs().cpu().numpy()
        rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
        t_ours, t_torch = timed(ours), timed(theirs)
        m_ours, m_torch = statistics.median(t_ours), statistics.median(t_torch)
        flops = 2.0 * N * K * M
        nbytes = 4.0 * (N * K + M * K + N * M + (M if use_bias else 0))
        rows.append({
            "shape": name, "N": N, "K": K, "M": M, "act": act, "bias": use_bias,
            "path": "few-row" if N <= {**L.TUNABLES, **tunables}["few_rows"] else "tiled",
            "ours_ms": m_ours, "ours_min_ms": min(t_ours), "ours_max_ms": max(t_ours),
            "torch_ms": m_torch, "torch_min_ms": min(t_torch), "torch_max_ms": max(t_torch),
            "ours_gflops": flops / m_ours / 1e6, "torch_gflops": flops / m_torch / 1e6,
            "ours_gbs": nbytes / m_ours / 1e6, "torch_gbs": nbytes / m_torch / 1e6,
            "ratio": m_torch / m_ours, "max_rel_err_vs_torch": rel,
        })
        del x, w, b, out, xd, wd, od, bd

    brows = []
    for name, N, K, M, act, use_bias in bshapes:
        x = torch.randn(N, K, generator=gen).to(tdev).requires_grad_(True)
        w = (torch.randn(M, K, generator=gen) / K ** 0.5).to(tdev).requires_grad_(True)
        b = torch.randn(M, generator=gen).to(tdev).requires_grad_(True) if use_bias else None
        dout = torch.randn(N, M, generator=gen).to(tdev)
        with torch.no_grad():
            pre = F.linear(x, w, b)
        y = acts[act](F.linear(x, w, b))  # the graph torch differentiates, built once
        params = (x, w, b) if use_bias else (x, w)
        grads = [torch.empty(N, K, device=tdev), torch.empty(M, K, device=tdev), torch.empty(M, device=tdev)]
        scratch = torch.empty(N, M, device=tdev) if act != "none" else None
        xd, wd, doutd, pred = (as_numba(t.detach()) for t in (x, w, dout, pre))
        gd = [as_numba(g) for g in grads]
        sd = as_numba(scratch) if scratch is not None else None

        def ours():
            L.linear_backward(gd[0], gd[1], gd[2] if use_bias else None, doutd, xd, wd, pred, act, sd,
                              **bwd_tunables)

        def theirs():
            return torch.autograd.grad(y, params, dout, retain_graph=True)

        ours()
        sync()
        want = [t.cpu().numpy() for t in theirs()]
        rel = 0.0
        for g, t in zip(gd, want):
            got = g.copy_to_host()
            rel = max(rel, float(np.max(np.abs(got - t)) / max(np.max(np.abs(t)), 1e-30)))
        t_ours, t_torch = timed(ours), timed(theirs)
        m_ours, m_torch = statistics.median(t_ours), statistics.median(t_torch)
        flops = 4.0 * N * K * M
        brows.append({
            "shape": name, "N": N, "K": K, "M": M, "act": act, "bias": use_bias,
            "ours_ms": m_ours, "ours_min_ms": min(t_ours), "ours_max_ms": max(t_ours),
            "torch_ms": m_torch, "torch_min_ms": min(t_torch), "torch_max_ms": max(t_torch),
            "ours_gflops": flops / m_ours / 1e6, "torch_gflops": flops / m_torch / 1e6,
            "ratio": m_torch / m_ours, "max_rel_err_vs_torch": rel,
        })
        del x, w, b, dout, pre, y, params, grads, scratch, xd, wd, doutd, pred, gd, sd

    info = {"numba_cuda": _version("numba-cuda"), "torch": torch.__version__, "simulator": SIMULATOR,
            "tunables": {**L.TUNABLES, **tunables}, "runs": args.runs, "reps": args.reps, "smoke": args.smoke}
    if tdev == "cuda":
        dev = cuda.get_current_device()
        info["gpu"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        info["compute_capability"] = list(dev.compute_capability)
    md = "\n\n".join(t for t in (table(rows, info) if rows else "", backward_table(brows, info) if brows else "")
                       if t)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "backward_rows": brows}, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


def _version(dist):
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        return "unknown"


def table(rows, info):
    head = (f"### linear fp32: nbformer (numba-cuda {info['numba_cuda']}) vs torch {info['torch']} F.linear"
            f"{' on ' + info['gpu'] if 'gpu' in info else ''}, TF32 off\n\n"
            f"median of {info['runs']} rounds x {info['reps']} calls (min-max), tunables {info['tunables']}\n\n"
            "| shape | N | K -> M | act | path | ours ms (min-max) | torch ms (min-max) | ours GFLOP/s | "
            "torch GFLOP/s | ours GB/s | torch GB/s | ratio nbformer/torch | max rel err |\n"
            "|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']} | {r['K']} -> {r['M']} | {r['act']}{' +b' if r['bias'] else ''} | {r['path']} "
            f"| {r['ours_ms']:.4f} ({r['ours_min_ms']:.4f}-{r['ours_max_ms']:.4f}) "
            f"| {r['torch_ms']:.4f} ({r['torch_min_ms']:.4f}-{r['torch_max_ms']:.4f}) "
            f"| {r['ours_gflops']:,.0f} | {r['torch_gflops']:,.0f} | {r['ours_gbs']:,.0f} | {r['torch_gbs']:,.0f} "
            f"| {r['ratio']:.2f} | {r['max_rel_err_vs_torch']:.1e} |")
    return "\n".join(lines)


def backward_table(rows, info):
    head = (f"### linear backward fp32: nbformer linear_backward vs torch {info['torch']} autograd of "
            f"act(F.linear){' on ' + info['gpu'] if 'gpu' in info else ''}, TF32 off\n\n"
            f"median of {info['runs']} rounds x {info['reps']} calls (min-max); dx, dw and db (g = dout * act'(pre) "
            "first where there is an activation)\n\n"
            "| shape | N | K -> M | act | ours ms (min-max) | torch ms (min-max) | ours GFLOP/s | torch GFLOP/s | "
            "ratio nbformer/torch | max rel err |\n"
            "|---|---:|---|---|---|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']} | {r['K']} -> {r['M']} | {r['act']}{' +b' if r['bias'] else ''} "
            f"| {r['ours_ms']:.4f} ({r['ours_min_ms']:.4f}-{r['ours_max_ms']:.4f}) "
            f"| {r['torch_ms']:.4f} ({r['torch_min_ms']:.4f}-{r['torch_max_ms']:.4f}) "
            f"| {r['ours_gflops']:,.0f} | {r['torch_gflops']:,.0f} | {r['ratio']:.2f} "
            f"| {r['max_rel_err_vs_torch']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
