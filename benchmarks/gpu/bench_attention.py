"""Our CUDA attention forward (tiled FlashAttention-2 style, nbformer/kernels/cuda/attention.py) vs
torch.nn.functional.scaled_dot_product_attention, fp32, one GPU.

    PYTHONPATH=. python benchmarks/gpu/bench_attention.py [--T 1024 4096] [--rounds 7] [--calls 10]
        [--no-sweep] [--tiles 64,32,128 ...] [--budget 55] [--json PATH] [--md PATH]
    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python benchmarks/gpu/bench_attention.py --smoke  # script check

Shapes: B=1, 12 heads of 64 (GPT-2 small), T = 1024 and 4096, causal and not. nbformer reads q/k/v
from one fused (B, T, 3C) qkv buffer, as the model graph does; torch gets contiguous (B, H, T, HS)
tensors of the same values. torch runs with TF32 off (allow_tf32 = False, float32 matmul precision
"highest"); with fp32 inputs its dispatcher picks the memory-efficient kernel (no flash for fp32).

Per shape: every tile candidate (attention.CANDIDATES, plus the default TUNABLES and --tiles) is
first checked on NaN-filled outputs against a float64 reference (torch math on float64 copies),
torch's fp32 output checked the same way, then timed. Timing: CUDA events around `calls`
back-to-back calls on the default stream (through the public launcher, argument checks included),
divided by calls; `rounds` such rounds, interleaved with torch round by round; the median is
reported with the min-max spread; ratio = torch time / our time per round (= our GFLOP/s over
torch's; > 1: ours faster), median [min-max]. Sweep candidates get fewer rounds (3); the default
and the best candidate of each shape then get the full count. GFLOP/s = 4*B*H*T*T*HS / t, half
of that when causal.

--budget (seconds, default 55: benchmarks/gpu/check.sh gives this script 60) stops the sweep
when it runs out (numba compiles each variant once, a few seconds, unless NUMBA_CACHE_DIR holds it);
rows not measured say so. Exit status 2 when there is no CUDA GPU (and no --smoke).
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
SMOKE_SHAPE = dict(B=1, NH=2, HS=8, T=(9,))
SMOKE_TILES = [(4, 4, 4), (8, 4, 4)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds for the default and best tiles")
    p.add_argument("--sweep-rounds", type=int, default=3, help="timed rounds per sweep candidate")
    p.add_argument("--calls", type=int, default=10, help="back-to-back calls per round")
    p.add_argument("--no-sweep", action="store_true", help="only the default tiles")
    p.add_argument("--tiles", nargs="*", default=[], help="extra candidates block_q,block_k,threads")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--budget", type=float, default=55.0, help="seconds for the whole run")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--md", default=None, help="also append the markdown tables here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, wall-clock timing, torch on the CPU: checks the script under "
                        "NUMBA_ENABLE_CUDASIM=1 (numbers meaningless)")
    return p.parse_args(argv)


class Clock:
    """CUDA events on torch's current stream (the legacy default stream, numba's stream 0 too),
    or wall clock in --smoke mode."""

    def __init__(self, torch, smoke):
        self.torch, self.smoke = torch, smoke

    def time(self, fn, calls):
        """ms per call over `calls` back-to-back calls."""
        if self.smoke:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
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
        if not self.smoke:
            self.torch.cuda.synchronize()
        else:
            from numba import cuda
            cuda.synchronize()


def stats(v):
    v = [float(x) for x in v]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def fmt_ms(s):
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def fmt_ratio(s):
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    smoke = args.smoke
    if smoke:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    import torch  # before numba (see tests/conftest.py: the libgomp load order)
    import numpy as np
    from numba import config, cuda

    if not smoke:
        if config.ENABLE_CUDASIM:
            print("bench_attention: NUMBA_ENABLE_CUDASIM=1 is set; use --smoke for a script check")
            return 2
        if not torch.cuda.is_available() or not cuda.is_available():
            why = ("torch.cuda.is_available() is False" if not torch.cuda.is_available()
                   else "numba.cuda.is_available() is False")
            print(f"bench_attention: no CUDA GPU ({why}); nothing measured")
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    from nbformer.kernels.cuda import attention as A

    b_, nh, hs = (SMOKE_SHAPE["B"], SMOKE_SHAPE["NH"], SMOKE_SHAPE["HS"]) if smoke else (B, NH, HS)
    Ts = list(SMOKE_SHAPE["T"]) if smoke else args.T
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    default = A.default_tiles(hs)
    if smoke:
        default, cands = SMOKE_TILES[0], SMOKE_TILES[1:]
    else:
        cands = [] if args.no_sweep else [tuple(c) for c in A.CANDIDATES]
    cands = [default] + [c for c in cands if c != default]
    for t in args.tiles:
        c = tuple(int(x) for x in t.split(","))
        if c not in cands:
            cands.append(c)
    tdev = "cpu" if smoke else "cuda"
    clock = Clock(torch, smoke)
    calls = 2 if smoke else args.calls
    rounds = 2 if smoke else args.rounds
    sweep_rounds = 1 if smoke else args.sweep_rounds
    if smoke:
        dev_name = "simulator"
    else:
        dev_name = torch.cuda.get_device_name()
    from importlib import metadata

    versions = {}
    for p in ("torch", "numba", "numba-cuda", "numpy"):
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "?"
    results = {"device": dev_name, "versions": versions, "shape": dict(B=b_, NH=nh, HS=hs),
               "max_calls": calls, "rounds": rounds, "sweep_rounds": sweep_rounds,
               "default_tiles": list(default), "cases": []}

    def left():
        return args.budget - (time.perf_counter() - t_start)

    C = nh * hs
    gen = torch.Generator(device="cpu").manual_seed(0)
    scale = 1.0 / math.sqrt(hs)
    cases = []  # (case dict, helpers) for every (T, causal)
    for T in Ts:
        qkv = torch.randn((b_, T, 3 * C), generator=gen, dtype=torch.float32).to(tdev)
        q, k, v = (x.contiguous() for x in qkv.view(b_, T, 3, nh, hs).permute(2, 0, 3, 1, 4))
        mask_t = torch.ones((b_, T), dtype=torch.uint8, device=tdev)
        out_t = torch.empty((b_, T, C), dtype=torch.float32, device=tdev)
        lse_t = torch.empty((b_, nh, T), dtype=torch.float32, device=tdev)
        if smoke:
            d_qkv, d_mask = cuda.to_device(qkv.numpy()), cuda.to_device(mask_t.numpy())
            d_out, d_lse = cuda.to_device(out_t.numpy()), cuda.to_device(lse_t.numpy())
        else:  # the same device memory, seen by numba through __cuda_array_interface__
            d_qkv, d_mask = cuda.as_cuda_array(qkv), cuda.as_cuda_array(mask_t)
            d_out, d_lse = cuda.as_cuda_array(out_t), cuda.as_cuda_array(lse_t)
        for causal in causals:
            case = {"T": T, "causal": causal, "gflop": A.attention_flops(b_, nh, T, T, hs, causal) / 1e9,
                    "rows": [{"tiles": list(c), "default": c == default} for c in cands]}
            results["cases"].append(case)
            # float64 reference (torch math path on float64 copies) for both implementations
            with torch.no_grad():
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.double(), k.double(), v.double(), is_causal=causal)
                sc = (q.double() @ k.double().transpose(-1, -2)) * scale
                if causal:
                    sc = sc.masked_fill(torch.ones(T, T, dtype=torch.bool, device=tdev).triu(1),
                                        float("-inf"))
                ref_lse = torch.logsumexp(sc, dim=-1)
                del sc
                t_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            case["torch_max_err"] = float((t_out.double() - ref).abs().max())
            del t_out
            h = dict(q=q, k=k, v=v, causal=causal, d_qkv=d_qkv, d_mask=d_mask, d_out=d_out,
                     d_lse=d_lse, out_t=out_t, lse_t=lse_t, ref_btc=ref.transpose(1, 2).reshape(b_, T, C),
                     ref_max=max(1.0, float(ref.abs().max())), ref_lse=ref_lse,
                     lse_max=max(1.0, float(ref_lse.abs().max())))
            del ref
            cases.append((case, h))

    def torch_fn(h):
        q, k, v, causal = h["q"], h["k"], h["v"], h["causal"]
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours_fn(h, tiles):
        bq, bk, nt = tiles
        d_out, d_lse, d_qkv, d_mask, causal = h["d_out"], h["d_lse"], h["d_qkv"], h["d_mask"], h["causal"]
        return lambda: A.attention_forward(d_out, d_lse, d_qkv, 0, d_qkv, C, 2 * C, d_mask, nh, hs,
                                           causal, scale, block_q=bq, block_k=bk, threads=nt)

    def check(h, tiles):
        """Compile (first call), run on NaN-filled outputs, compare with float64."""
        if smoke:
            h["d_out"].copy_to_device(np.full(tuple(h["out_t"].shape), np.nan, np.float32))
            h["d_lse"].copy_to_device(np.full(tuple(h["lse_t"].shape), np.nan, np.float32))
        else:
            h["out_t"].fill_(float("nan"))
            h["lse_t"].fill_(float("nan"))
        t0 = time.perf_counter()
        ours_fn(h, tiles)()
        clock.sync()
        first = time.perf_counter() - t0
        o = torch.from_numpy(h["d_out"].copy_to_host()) if smoke else h["out_t"]
        l_ = torch.from_numpy(h["d_lse"].copy_to_host()) if smoke else h["lse_t"]
        err = float((o.double() - h["ref_btc"]).abs().max())
        lerr = float((l_.double() - h["ref_lse"]).abs().max())
        ok = (math.isfinite(err) and err <= 1e-4 * h["ref_max"] and math.isfinite(lerr)
              and lerr <= 1e-4 * h["lse_max"])
        return ok, err, lerr, first

    def measure(row, h, n_rounds):
        """Interleaved rounds; calls per round shrink so that a round takes ~30 ms at most."""
        f_ours, f_torch = ours_fn(h, tuple(row["tiles"])), torch_fn(h)
        ours, theirs = [], []
        with torch.no_grad():
            est = max(clock.time(f_ours, 1), clock.time(f_torch, 1), 1e-3)  # also warms up
            n = max(1, min(calls, int(30.0 / est)))
            for _ in range(n_rounds):
                ours.append(clock.time(f_ours, n))
                theirs.append(clock.time(f_torch, n))
        row["ms"], row["torch_ms"], row["calls"] = stats(ours), stats(theirs), n
        row["ratio"] = stats([t / o for o, t in zip(ours, theirs)])

    def run_row(case, h, row, n_rounds):
        if left() < 3.0:
            row.setdefault("skipped", "budget")
            return
        row.pop("skipped", None)
        try:
            ok, err, lerr, first = check(h, tuple(row["tiles"]))
        except Exception as e:  # an invalid candidate for this shape: say so, go on
            row["error"] = f"{type(e).__name__}: {e}"
            return
        row.update(max_err=err, lse_max_err=lerr, first_call_s=first, valid=ok)
        if ok:
            measure(row, h, n_rounds)

    # 1. default tiles everywhere (full rounds), 2. the sweep, 3. full rounds for each best
    for case, h in cases:
        run_row(case, h, case["rows"][0], rounds)
    for case, h in cases:
        for row in case["rows"][1:]:
            run_row(case, h, row, sweep_rounds)
    for case, h in cases:
        timed = [r for r in case["rows"] if "ms" in r]
        best = min(timed, key=lambda r: r["ms"]["median"]) if timed else None
        case["best_tiles"] = best["tiles"] if best else None
        if best is not None and not best["default"] and left() > 3.0:
            measure(best, h, rounds)
        for r in timed:
            r["gflops"] = case["gflop"] / (r["ms"]["median"] * 1e-3)
            r["torch_gflops"] = case["gflop"] / (r["torch_ms"]["median"] * 1e-3)

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
    lines = ["## Attention forward, CUDA: nbformer vs torch SDPA (fp32, TF32 off)", "",
             f"{results['device']}; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
             + f"; B={sh['B']}, H={sh['NH']}, HS={sh['HS']}; up to {results['max_calls']} calls per round; "
             f"ms = median (min-max) over rounds; ratio = torch time / ours per round"
             + (" **(smoke run under the simulator: numbers meaningless)**" if smoke else ""), ""]
    lines += ["| T | causal | tiles (bq,bk,threads) | nbformer ms | GFLOP/s | torch ms | torch GFLOP/s "
              "| ratio nbformer/torch | rounds x calls | max err vs f64 (ours / torch) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        for r in c["rows"]:
            tiles = ",".join(str(x) for x in r["tiles"])
            tag = (" default" if r["default"] else "") + (" **best**" if r["tiles"] == c.get("best_tiles") else "")
            head = f"| {c['T']} | {'yes' if c['causal'] else 'no'} | {tiles}{tag} "
            if "ms" in r:
                lines.append(head + f"| {fmt_ms(r['ms'])} | {r['gflops']:.0f} | {fmt_ms(r['torch_ms'])} "
                             f"| {r['torch_gflops']:.0f} | {fmt_ratio(r['ratio'])} "
                             f"| {len(r['ms']['values'])}x{r['calls']} | {r['max_err']:.1e} / {c['torch_max_err']:.1e} |")
            else:
                why = (r.get("skipped") and f"skipped ({r['skipped']})") or r.get("error") or (
                    f"INVALID: max err {r.get('max_err', float('nan')):.2e}, "
                    f"lse err {r.get('lse_max_err', float('nan')):.2e}")
                lines.append(head + f"| {why} | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
