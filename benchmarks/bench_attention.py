"""Attention forward on the CPU: nbformer's tiled kernel vs torch scaled_dot_product_attention.

B=1, NH=12, HS=64, T=1024 by default (--T 256 1024 4096 for more), causal and not, same process,
same thread count for both (numba prange pool / torch intra-op pool). Timed in alternating
blocks (3 rounds of: one untimed call, a short pause, then --repeat/3 timed calls, per side),
median reported. Not interleaved call by call: numba's and torch's OpenMP pools each spin after
a parallel region, and alternating single calls made torch ~3x slower (measured).
GFLOP/s use 4*B*NH*T*T*HS (half of that when causal).
nbformer reads q/k/v from one fused (B, T, 3C) QKV buffer, as the model graph does; torch gets
contiguous (B, NH, T, HS) tensors of the same values. ratio = nbformer / torch GFLOP/s.

Memory (--mem, on by default): in a fresh subprocess per (impl, T), after a warm-up at T=128
(compile, BLAS buffers, thread pools), the peak-RSS counter (VmHWM) is reset through
/proc/self/clear_refs and the extra resident memory of one call at T is read back. Inputs and
outputs are allocated before the reset, so the number is the call's own working memory.

    python benchmarks/bench_attention.py [--threads 2] [--out benchmarks/results] [--T 1024]
                                         [--repeat 7] [--sweep] [--no-mem]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common
from common import bench_args, set_threads, summarize, write_results

B, NH, HS = 1, 12, 64
SWEEP = [(64, 64), (128, 128), (128, 256), (256, 128), (256, 256), (256, 512), (512, 256)]


def time_blocks(fns: dict, repeat: int, rounds: int = 3) -> dict:
    """name -> summary; each round runs every fn as a block (see module doc)."""
    import time

    times = {k: [] for k in fns}
    per = max(1, -(-repeat // rounds))
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            time.sleep(0.05)
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: summarize(v) for k, v in times.items()}


def make_inputs(T, seed=0):
    import numpy as np

    C = NH * HS
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    mask = np.ones((B, T), np.uint8)
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    return qkv, mask, out, lse


def torch_inputs(qkv):
    import torch

    C = NH * HS
    t = torch.from_numpy(qkv.reshape(B, qkv.shape[1], 3, NH, HS).transpose(2, 0, 3, 1, 4).copy())
    return t[0].contiguous(), t[1].contiguous(), t[2].contiguous()  # (B, NH, T, HS) each


def nb_call(qkv, mask, out, lse, causal, blocks=None):
    from nbformer.kernels.cpu.attention import attention_forward

    C = NH * HS
    kw = {} if blocks is None else {"block_q": blocks[0], "block_k": blocks[1]}
    return lambda: attention_forward(out, lse, qkv, 0, qkv, C, 2 * C, mask, NH, HS, causal, HS ** -0.5, **kw)


# ------------------------------------------------------------------ memory (subprocess side)
def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def mem_child(impl, T, causal, threads):
    set_threads(threads, torch=(impl == "torch"))
    import numpy as np

    if impl == "torch":
        import torch

        def setup(t):
            q, k, v = torch_inputs(make_inputs(t)[0])
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        def setup(t):
            return nb_call(*make_inputs(t), causal)

    setup(128)()  # compile / initialise everything at a small size
    fn = setup(T)  # inputs and outputs of the measured size, allocated before the reset
    res = fn()
    del res
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError as e:
        print(json.dumps({"error": f"cannot reset peak RSS: {e}"}))
        return
    base = _rss_kib("VmRSS")
    res = fn()
    peak = _rss_kib("VmHWM")
    del res
    np.asarray(0)
    print(json.dumps({"impl": impl, "T": T, "causal": causal, "rss_before_kib": base, "peak_kib": peak,
                      "extra_kib": peak - base}))


def measure_memory(threads, Ts=(1024, 4096)):
    rows = []
    for impl in ("nbformer", "torch"):
        for T in Ts:
            cmd = [sys.executable, __file__, "--_mem-child", impl, str(T), "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                               cwd=str(common.BENCH_DIR), env=dict(os.environ))
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode != 0 or not lines:
                rows.append({"impl": impl, "T": T, "error": (r.stderr or r.stdout)[-400:]})
                continue
            rows.append(json.loads(lines[-1]))
    return rows


def scratch_bytes(bq, bk):
    """Analytic per-thread scratch of the kernel, independent of T: Q^T (HS x (bq+8)),
    S^T/P^T tile (bk x (bq+8)), V tile (bk x HS), accumulator (bq x HS), 5 row vectors."""
    return 4 * (HS * (bq + 8) + bk * (bq + 8) + bk * HS + bq * HS + 5 * bq)


# ------------------------------------------------------------------ main
def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=7)
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--T", type=int, nargs="+", default=[1024])
    p.add_argument("--sweep", action="store_true", help="also time nbformer at several block sizes")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-RSS measurement")
    p.add_argument("--_mem-child", nargs=2, metavar=("IMPL", "T"), help=argparse_hidden())
    args = p.parse_args(argv)
    if args._mem_child:
        return mem_child(args._mem_child[0], int(args._mem_child[1]), False, args.threads)

    threads = set_threads(args.threads)  # before numpy import
    import numpy as np
    import torch

    from nbformer.kernels.cpu import attention as A

    sig = A.attention_forward.__defaults__  # (block_q, block_k)
    default_blocks = (sig[0], sig[1])
    rows, sweep_rows, checks = [], [], []
    for T in args.T:
        qkv, mask, out, lse = make_inputs(T)
        q, k, v = torch_inputs(qkv)
        for causal in (False, True):
            flops = A.attention_flops(B, NH, T, T, HS, causal)
            nb = nb_call(qkv, mask, out, lse, causal)
            th = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            for _ in range(args.warmup):
                nb(), th()
            res = time_blocks({"nbformer": nb, "torch": th}, args.repeat)
            ref = th().transpose(1, 2).reshape(B, T, NH * HS).numpy()
            nb()
            err = float(np.abs(out - ref).max())
            checks.append({"T": T, "causal": causal, "max_abs_diff_vs_torch": err})
            tn, tt = res["nbformer"]["median_s"], res["torch"]["median_s"]
            rows.append({"T": T, "causal": causal, "nbformer ms": tn * 1e3, "torch ms": tt * 1e3,
                         "nbformer GFLOP/s": flops / tn / 1e9, "torch GFLOP/s": flops / tt / 1e9,
                         "ratio": tt / tn, "max |diff|": err,
                         "nb min ms": res["nbformer"]["min_s"] * 1e3, "torch min ms": res["torch"]["min_s"] * 1e3})
            print(f"T={T} causal={causal}: nbformer {tn * 1e3:.2f} ms, torch {tt * 1e3:.2f} ms, "
                  f"ratio {tt / tn:.2f}, max|diff| {err:.1e}", flush=True)
            if args.sweep:
                fns = {f"{bq}x{bk}": nb_call(qkv, mask, out, lse, causal, (bq, bk)) for bq, bk in SWEEP}
                sres = time_blocks(fns, args.repeat)
                for name, s in sres.items():
                    sweep_rows.append({"T": T, "causal": causal, "blocks": name, "ms": s["median_s"] * 1e3,
                                       "GFLOP/s": flops / s["median_s"] / 1e9})
                    print(f"    {name}: {s['median_s'] * 1e3:.2f} ms", flush=True)

    mem_rows = []
    if not args.no_mem:
        mem_rows = measure_memory(args.threads)
        for r in mem_rows:
            r["scores matrix (T^2) MiB"] = NH * r["T"] ** 2 * 4 / 2 ** 20
            if "extra_kib" in r:
                r["extra MiB"] = r["extra_kib"] / 1024
            if r["impl"] == "nbformer":
                r["analytic scratch MiB"] = args.threads * scratch_bytes(*default_blocks) / 2 ** 20

    common.RESULTS_DIR = Path(args.out)
    notes = [
        f"B={B}, NH={NH}, HS={HS}, float32; nbformer blocks (block_q, block_k) = {default_blocks}; "
        f"{args.threads} threads each; median of {args.repeat} runs (alternating blocks) after {args.warmup} warm-up.",
        "ratio = torch time / nbformer time (= nbformer GFLOP/s / torch GFLOP/s; > 1: nbformer faster).",
        "FLOPs: 4*B*NH*T*T*HS, half of that for causal.",
    ]
    if mem_rows:
        notes.append("Memory: extra peak RSS of one non-causal call at T after a warm-up at T=128, in a fresh "
                     "process (VmHWM reset via /proc/self/clear_refs; inputs/outputs allocated before). "
                     "'analytic scratch' = threads x per-work-item scratch of the kernel (independent of T); "
                     "'scores matrix' = what a materialised NH x T x T float32 score matrix would take.")
        mem_md = common.md_table(["impl", "T", "extra MiB", "analytic scratch MiB", "scores matrix (T^2) MiB"],
                                 mem_rows)
        notes.append("Memory table:\n\n" + mem_md + "\n")
    if sweep_rows:
        notes.append("Block-size sweep (nbformer only):\n\n"
                     + common.md_table(["T", "causal", "blocks", "ms", "GFLOP/s"], sweep_rows) + "\n")
    cols = ["T", "causal", "nbformer ms", "torch ms", "nbformer GFLOP/s", "torch GFLOP/s", "ratio", "max |diff|"]
    text = write_results("attention", "Attention forward (CPU): nbformer vs torch SDPA", cols, rows, notes,
                         extra={"memory": mem_rows, "sweep": sweep_rows, "checks": checks,
                                "threads": threads, "blocks": default_blocks})
    print(text)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
