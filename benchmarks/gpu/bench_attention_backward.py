"""Our CUDA attention backward (FlashAttention-2 style, two deterministic passes,
nbformer/kernels/cuda/attention_backward.py) vs the backward of torch's
scaled_dot_product_attention, fp32, one GPU.

    PYTHONPATH=. python benchmarks/gpu/bench_attention_backward.py [--T 1024 4096] [--rounds 7]
        [--calls 5] [--sweep] [--tiles 32,32,128 ...] [--causal both] [--budget 120] [--json PATH] [--md PATH]
    PYTHONPATH=. python benchmarks/gpu/bench_attention_backward.py --smoke   # script check, simulator

Shapes: B=1, 12 heads of 64 (GPT-2 small), T = 1024 and 4096, causal and not. nbformer reads q/k/v
from one fused (B, T, 3C) qkv buffer and writes dq/dk/dv into one fused (B, T, 3C) gradient buffer
(dq_buf is dkv_buf), as the model graph does; out and lse come from our CUDA forward, run once.
torch gets leaf (B, H, T, HS) tensors of the same values and runs torch.autograd.grad(out, (q, k, v),
dout, retain_graph=True) on its SDPA output (TF32 off: allow_tf32 = False, float32 matmul precision
"highest"; for fp32 its dispatcher picks the memory-efficient kernel). Only the backward is timed on
both sides (ours: the dq pass, which also writes delta = rowsum(dO * O), and the dK/dV pass).

Per shape, before timing, every tile configuration is checked on NaN-filled gradients against a
float64 reference (torch autograd through the math path on float64 copies), torch's fp32 gradients
checked the same way: max |error| <= 1e-4 * max |reference gradient|, per tensor. Timing: CUDA
events around `calls` back-to-back calls on the default stream (through the public launcher,
argument checks included), divided by calls; `rounds` such rounds interleaved with torch round by
round; median with the min-max spread; ratio = torch time / ours per round (> 1: ours faster).
GFLOP/s by the usual backward convention, 10*B*H*T*T*HS (5 matmuls) / t, half of that when causal.

--sweep also times attention_backward.CANDIDATES (fewer rounds); --budget (seconds) stops the run
when it runs out (numba compiles two kernels per variant, a few seconds, unless NUMBA_CACHE_DIR
holds them); rows not measured say so. Exit status 2 when there is no CUDA GPU (and no --smoke),
1 when a measured configuration fails its check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

B, NH, HS = 1, 12, 64
SMOKE = dict(B=1, NH=2, HS=8, T=(9,), tiles=[(4, 4, 4), (8, 4, 4)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds for the default (and best) tiles")
    p.add_argument("--sweep-rounds", type=int, default=3, help="timed rounds per sweep candidate")
    p.add_argument("--calls", type=int, default=5, help="back-to-back calls per round (at most)")
    p.add_argument("--sweep", action="store_true", help="also time attention_backward.CANDIDATES")
    p.add_argument("--tiles", nargs="*", default=[], help="extra candidates block_q,block_k,threads")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole run")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--md", default=None, help="also append the markdown table here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes under NUMBA_ENABLE_CUDASIM=1, wall-clock timing, torch on the CPU: "
                        "checks the script (numbers meaningless)")
    return p.parse_args(argv)


def stats(v):
    v = [float(x) for x in v]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def fmt_ms(s):
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def fmt_ratio(s):
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


class Clock:
    """CUDA events on torch's current stream (the legacy default stream: numba's stream 0 too), or
    the wall clock in --smoke mode."""

    def __init__(self, torch, smoke):
        self.torch, self.smoke = torch, smoke

    def time(self, fn, calls):
        """ms per call over `calls` back-to-back calls."""
        if self.smoke:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            return (time.perf_counter() - t0) * 1e3 / calls
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    def sync(self):
        if self.smoke:
            from numba import cuda
            cuda.synchronize()
        else:
            self.torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    smoke = args.smoke
    if smoke:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    try:
        import torch  # before numba (tests/conftest.py: the libgomp load order)
    except ImportError:
        print("bench_attention_backward: torch is not installed; nothing measured")
        return 2
    import numpy as np
    from numba import config, cuda

    if not smoke:
        if config.ENABLE_CUDASIM:
            print("bench_attention_backward: NUMBA_ENABLE_CUDASIM=1 is set; unset it on a GPU machine, "
                  "or use --smoke for a script check")
            return 2
        if not torch.cuda.is_available() or not cuda.is_available():
            why = ("torch.cuda.is_available() is False" if not torch.cuda.is_available()
                   else "numba.cuda.is_available() is False")
            print(f"bench_attention_backward: no CUDA GPU ({why}); nothing measured")
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    from nbformer.kernels.cuda import attention as A
    from nbformer.kernels.cuda import attention_backward as AB

    b_, nh, hs = (SMOKE["B"], SMOKE["NH"], SMOKE["HS"]) if smoke else (B, NH, HS)
    Ts = list(SMOKE["T"]) if smoke else args.T
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if smoke:
        default, cands = SMOKE["tiles"][0], list(SMOKE["tiles"][1:])
    else:
        default = AB.default_tiles(hs)
        cands = [tuple(c) for c in AB.CANDIDATES] if args.sweep else []
    cands = [default] + [c for c in cands if c != default]
    for t in args.tiles:
        c = tuple(int(x) for x in t.split(","))
        if c not in cands:
            cands.append(c)
    tdev = "cpu" if smoke else "cuda"
    clock = Clock(torch, smoke)
    calls = 1 if smoke else args.calls
    rounds = 2 if smoke else args.rounds
    sweep_rounds = 1 if smoke else args.sweep_rounds
    from importlib import metadata

    versions = {}
    for p in ("torch", "numba", "numba-cuda", "numpy"):
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "?"
    results = {"device": "simulator" if smoke else torch.cuda.get_device_name(), "versions": versions,
               "shape": dict(B=b_, NH=nh, HS=hs), "max_calls": calls, "rounds": rounds,
               "sweep_rounds": sweep_rounds, "default_tiles": list(default), "cases": []}

    def left():
        return args.budget - (time.perf_counter() - t_start)

    C = nh * hs
    scale = 1.0 / math.sqrt(hs)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def to_numba(t):
        return cuda.to_device(t.numpy()) if smoke else cuda.as_cuda_array(t)

    def run_case(T, causal):
        case = {"T": T, "causal": causal, "gflop": AB.attention_backward_flops(b_, nh, T, T, hs, causal) / 1e9,
                "rows": [{"tiles": list(c), "default": c == default} for c in cands]}
        results["cases"].append(case)
        if left() < 5.0:
            for r in case["rows"]:
                r["skipped"] = "budget"
            return case
        qkv = torch.randn((b_, T, 3 * C), generator=gen, dtype=torch.float32).to(tdev)
        dout_btc = torch.randn((b_, T, C), generator=gen, dtype=torch.float32).to(tdev)
        q, k, v = (x.contiguous().requires_grad_(True) for x in qkv.view(b_, T, 3, nh, hs).permute(2, 0, 3, 1, 4))
        dout = dout_btc.view(b_, T, nh, hs).transpose(1, 2).contiguous()

        # float64 reference gradients (math path), and torch's fp32 error against them
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        o64 = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        ref = torch.autograd.grad(o64, (q64, k64, v64), dout.double())
        del o64, q64, k64, v64
        ref_btc = [g.transpose(1, 2).reshape(b_, T, C) for g in ref]  # dq, dk, dv in (B, T, C)
        ref_max = [max(1.0, float(g.abs().max())) for g in ref]
        del ref
        o_t = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        t_grads = torch.autograd.grad(o_t, (q, k, v), dout, retain_graph=True)
        case["torch_rel_err"] = max(float((g.double().transpose(1, 2).reshape(b_, T, C) - r).abs().max()) / m
                                    for g, r, m in zip(t_grads, ref_btc, ref_max))
        del t_grads

        # our buffers: fused qkv in, fused dqkv out; out/lse from our forward
        mask_t = torch.ones((b_, T), dtype=torch.uint8, device=tdev)
        out_t = torch.empty((b_, T, C), dtype=torch.float32, device=tdev)
        lse_t = torch.empty((b_, nh, T), dtype=torch.float32, device=tdev)
        dqkv_t = torch.empty((b_, T, 3 * C), dtype=torch.float32, device=tdev)
        delta_t = torch.empty((b_, nh, T), dtype=torch.float32, device=tdev)
        d_qkv, d_mask, d_dout = to_numba(qkv), to_numba(mask_t), to_numba(dout_btc)
        d_out, d_lse, d_dqkv, d_delta = (to_numba(x) for x in (out_t, lse_t, dqkv_t, delta_t))
        fwd_tiles = dict(block_q=4, block_k=4, threads=4) if smoke else {}
        A.attention_forward(d_out, d_lse, d_qkv, 0, d_qkv, C, 2 * C, d_mask, nh, hs, causal, scale, **fwd_tiles)
        clock.sync()

        def ours_fn(tiles):
            bq, bk, nt = tiles
            return lambda: AB.attention_backward(d_dqkv, d_dqkv, d_delta, d_dout, d_out, d_lse, d_qkv, 0, d_qkv, C,
                                                 2 * C, d_mask, nh, hs, causal, scale, block_q=bq, block_k=bk,
                                                 threads=nt)

        def torch_fn():
            return lambda: torch.autograd.grad(o_t, (q, k, v), dout, retain_graph=True)

        def check(tiles):
            """Compile (first call), run on NaN-filled gradients, compare with float64."""
            if smoke:
                d_dqkv.copy_to_device(np.full((b_, T, 3 * C), np.nan, np.float32))
            else:
                dqkv_t.fill_(float("nan"))
            t0 = time.perf_counter()
            ours_fn(tiles)()
            clock.sync()
            first = time.perf_counter() - t0
            g = torch.from_numpy(d_dqkv.copy_to_host()) if smoke else dqkv_t
            errs = [float((g[..., i * C:(i + 1) * C].double() - r).abs().max()) / m
                    for i, (r, m) in enumerate(zip(ref_btc, ref_max))]
            err = max(errs) if all(math.isfinite(e) for e in errs) else float("nan")
            return math.isfinite(err) and err <= 1e-4, err, first

        def measure(row, n_rounds):
            f_ours, f_torch = ours_fn(tuple(row["tiles"])), torch_fn()
            ours, theirs = [], []
            est = max(clock.time(f_ours, 1), clock.time(f_torch, 1), 1e-3)  # also warms up
            n = max(1, min(calls, int(50.0 / est)))
            for _ in range(n_rounds):
                ours.append(clock.time(f_ours, n))
                theirs.append(clock.time(f_torch, n))
            row["ms"], row["torch_ms"], row["calls"] = stats(ours), stats(theirs), n
            row["ratio"] = stats([t / o for o, t in zip(ours, theirs)])

        for row in case["rows"]:
            if left() < 3.0:
                row["skipped"] = "budget"
                continue
            try:
                ok, err, first = check(tuple(row["tiles"]))
            except Exception as e:  # an invalid candidate for this shape: say so, go on
                row["error"] = f"{type(e).__name__}: {e}"
                continue
            row.update(rel_err=err, first_call_s=first, valid=ok)
            if ok:
                measure(row, rounds if row["default"] else sweep_rounds)
        timed = [r for r in case["rows"] if "ms" in r]
        best = min(timed, key=lambda r: r["ms"]["median"]) if timed else None
        case["best_tiles"] = best["tiles"] if best else None
        if best is not None and not best["default"] and left() > 3.0:
            measure(best, rounds)
        for r in timed:
            r["gflops"] = case["gflop"] / (r["ms"]["median"] * 1e-3)
            r["torch_gflops"] = case["gflop"] / (r["torch_ms"]["median"] * 1e-3)
        return case

    for T in Ts:
        for causal in causals:
            run_case(T, causal)
            if not smoke:
                torch.cuda.empty_cache()

    md = render(results, smoke)
    print(md)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for c in results["cases"] for r in c["rows"] if r.get("valid") is False]
    return 1 if bad else 0


def render(results, smoke):
    sh = results["shape"]
    lines = ["## Attention backward, CUDA: nbformer vs torch SDPA backward (fp32, TF32 off)", "",
             f"{results['device']}; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
             + f"; B={sh['B']}, H={sh['NH']}, HS={sh['HS']}; fused qkv / dqkv buffers; up to "
             f"{results['max_calls']} calls per round; ms = median (min-max) over rounds; ratio = torch "
             f"time / ours per round (> 1: ours faster); GFLOP/s = 10*B*H*T*T*HS / t (half if causal)"
             + (" **(smoke run under the simulator: numbers meaningless)**" if smoke else ""), ""]
    lines += ["| T | causal | tiles (bq,bk,threads) | nbformer ms | GFLOP/s | torch ms | torch GFLOP/s "
              "| ratio torch/ours | rounds x calls | max rel err vs f64 (ours / torch) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        for r in c["rows"]:
            tiles = ",".join(str(x) for x in r["tiles"])
            tag = (" default" if r["default"] else "") + (" **best**" if r["tiles"] == c.get("best_tiles") else "")
            head = f"| {c['T']} | {'yes' if c['causal'] else 'no'} | {tiles}{tag} "
            if "ms" in r:
                lines.append(head + f"| {fmt_ms(r['ms'])} | {r['gflops']:.0f} | {fmt_ms(r['torch_ms'])} "
                             f"| {r['torch_gflops']:.0f} | {fmt_ratio(r['ratio'])} "
                             f"| {len(r['ms']['values'])}x{r['calls']} "
                             f"| {r['rel_err']:.1e} / {c.get('torch_rel_err', float('nan')):.1e} |")
            else:
                why = (r.get("skipped") and f"skipped ({r['skipped']})") or r.get("error") or (
                    f"INVALID: max rel err {r.get('rel_err', float('nan')):.2e}")
                lines.append(head + f"| {why} | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
