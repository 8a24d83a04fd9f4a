"""GPT-2 124M prefill: nbformer load(dir).forward(ids) vs transformers model(ids).logits, same process.

Random-init GPT2Config() (HF defaults: 12 layers, 768 wide, 50257 vocab, tied lm head), saved once
with save_pretrained(safe_serialization=True) under benchmarks/.cache/. B=1, T=256, logits for all
positions. Throughput in tokens/s (median of --repeat after --warmup, interleaved);
ratio = nbformer / torch (> 1: nbformer faster). Also reports max |logits difference|.

    python benchmarks/bench_gpt2_prefill.py [--threads 2] [--warmup 2] [--repeat 5] [--seq 256]
"""
from __future__ import annotations

import sys
import time

from common import CACHE_DIR, bench_args, ratio, round_ratios, set_threads, sgemm_rates, spread, timeit_pair, write_results

MODEL_DIR = CACHE_DIR / "gpt2-124m-random"


def ensure_model(path=MODEL_DIR):
    """Create the random GPT-2 checkpoint once (seeded, so the same weights every time)."""
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=5)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)  # before numpy import

    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    import nbformer

    path = ensure_model()
    t0 = time.perf_counter()
    nb = nbformer.load(path)
    nb_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t0

    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(0, nb.config.vocab_size, size=(B, T), dtype=np.int64)
    ids_t = torch.from_numpy(ids)

    def run_hf():
        with torch.inference_mode():
            return hf(ids_t).logits

    t0 = time.perf_counter()
    out_nb = nb.forward(ids)
    nb_first = time.perf_counter() - t0
    out_hf = run_hf().numpy()
    max_abs = float(np.max(np.abs(out_nb.astype(np.float64) - out_hf)))
    scale = float(np.max(np.abs(out_hf)))

    res = timeit_pair({"nbformer": lambda: nb.forward(ids), "torch": run_hf},
                      warmup=args.warmup, repeat=args.repeat)
    tps = {k: B * T / v["median_s"] for k, v in res.items()}
    r = ratio(tps["nbformer"], tps["torch"])
    r_best = res["torch"]["min_s"] / res["nbformer"]["min_s"]
    # GEMM-equivalent FLOPs of one forward: the linear layers and the LM head (2 per multiply-add)
    # and causal attention (half of 4 * T^2 * d per layer)
    cfg = nb.config
    d, L, V, F = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff
    flops = B * T * (2 * L * (4 * d * d + 2 * d * F) + 2 * d * V) + B * L * 2 * T * T * d
    rate = {k: flops / v["median_s"] / 1e9 for k, v in res.items()}
    peak = sgemm_rates()
    yard = max(peak.values())
    rows = [{"impl": "nbformer load().forward", "median s": res["nbformer"]["median_s"],
             "min s": res["nbformer"]["min_s"], "tokens/s": tps["nbformer"], "load s": nb_load},
            {"impl": "transformers GPT2LMHeadModel (torch)", "median s": res["torch"]["median_s"],
             "min s": res["torch"]["min_s"], "tokens/s": tps["torch"], "load s": hf_load},
            {"impl": "ratio nbformer/torch", "tokens/s": r, "ratio per round": spread(round_ratios(res))}]
    notes = [f"B={B}, T={T}, logits (B, T, {nb.config.vocab_size}) for all positions; random init, seed 0; "
             f"median of {args.repeat} after {args.warmup} warm-up runs, interleaved; torch under inference_mode "
             f"(attn_implementation {getattr(hf.config, '_attn_implementation', '?')})",
             "ratio per round: torch time / nbformer time of each interleaved round, median [min..max]",
             f"ratio of best runs (min s, less sensitive to other processes on the machine): {r_best:.2f}",
             f"effective rate ({flops / 1e9:.1f} GFLOP a forward: linear layers, LM head, causal attention): "
             f"nbformer {rate['nbformer']:.0f} GFLOP/s = {100 * rate['nbformer'] / yard:.0f} % of this machine's fp32 "
             f"GEMM rate, torch {rate['torch']:.0f} = {100 * rate['torch'] / yard:.0f} % (rate: torch.mm 2048^3 "
             f"{peak['torch_mm_2048']:.0f} GFLOP/s, nbformer matmul_nn {peak['nbformer_matmul']:.0f}; the higher); "
             f"80 % of that rate would be a ratio of {0.8 * yard / rate['torch']:.2f} to torch here",
             f"agreement: max |logits diff| = {max_abs:.2e} (max |logit| {scale:.2f})",
             f"nbformer first forward (cache load / compile, graph build): {nb_first:.2f} s"]
    md = write_results("gpt2_prefill", f"GPT-2 124M prefill, B={B}, T={T}",
                       ["impl", "median s", "min s", "tokens/s", "ratio per round", "load s"], rows, notes,
                       extra={"raw": res, "max_abs_logits_diff": max_abs, "max_abs_logit": scale,
                              "nb_first_forward_s": nb_first, "ratio": r, "ratio_best": r_best, "threads": threads,
                              "gflop_per_forward": flops / 1e9, "effective_gflops": rate, "sgemm_gflops": peak})
    print(md)
    if max_abs > 1e-3:
        print(f"WARNING: logits disagree (max |diff| = {max_abs:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
