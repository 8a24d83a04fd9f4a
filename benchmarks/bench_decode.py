"""Autoregressive decoding with the KV cache vs transformers' generate, same process, 2 threads.

1. GPT-2 124M (random-init GPT2Config(), as bench_gpt2_prefill), B=1, prompt 16 tokens, 128 new
   tokens, greedy: nbformer `model.generate(ids, max_new_tokens=128)` vs HF `generate(...,
   do_sample=False)`; tokens/s of the whole call (prefill included), and the same as a fraction of
   the memory-bandwidth bound: bytes of weights (+ KV cache) read per token vs a measured copy
   bandwidth (Numba prange copy of 256 MiB, read + write bytes, 2 threads).
2. Marian-size encoder-decoder (MarianConfig: 6+6 layers, d=512, 8 heads, FFN 2048, vocab 58101,
   random init), 2 sources of 24 tokens, beam search num_beams=4, 48 new tokens, length_penalty 1.0.
3. The cost of one new token at context 64 / 256 / 1000 (GPT-2 124M): the KV-cache step vs
   recomputing the whole prefix (what decoding without a cache does).
4. Time to first token from the CLI (`nbformer generate`, default model, warm Numba cache): wall
   time from process start to the first generated text on stdout, and the in-process TTFT that
   `--json` reports.
Token agreement with transformers is checked and reported for 1 and 2.

    python benchmarks/bench_decode.py [--threads 2] [--warmup 1] [--repeat 3] [--skip-marian] [--skip-scaling] [--skip-cli]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import CACHE_DIR, REPO, bench_args, ratio, set_threads, timeit_pair, write_results

MARIAN_DIR = CACHE_DIR / "marian-6x6-512-random"


def ensure_marian(path=MARIAN_DIR):
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    import torch
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
                       encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                       decoder_ffn_dim=2048, activation_function="swish", scale_embedding=True,
                       max_position_embeddings=512, pad_token_id=58100, eos_token_id=0,
                       decoder_start_token_id=58100, forced_eos_token_id=0)
    model = MarianMTModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def copy_bandwidth(mib=256, repeat=5) -> float:
    """Bytes moved per second (read + write) by a parallel float32 copy."""
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def _copy(dst, src):
        for i in prange(src.size):
            dst[i] = src[i]

    a = np.ones(mib * 1024 * 1024 // 4, np.float32)
    b = np.empty_like(a)
    _copy(b, a)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _copy(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def weight_bytes_per_token(cfg, ctx: int) -> int:
    """Every parameter is read once per decoded token except the position table (one row) and
    the token embedding (one row, plus all of it again when it is the tied output projection);
    the KV cache adds n_layers * ctx * 2C floats."""
    from nbformer.weights.params import param_shapes

    n = 0
    for name, shape in param_shapes(cfg).items():
        size = 1
        for s in shape:
            size *= s
        if name in ("pos_emb", "dec.pos_emb"):
            size = shape[1]
        elif name == "tok_emb":
            size = size + shape[1] if cfg.tie_word_embeddings else shape[1]
        n += size
    layers = cfg.n_decoder_layers if cfg.arch == "encoder_decoder" else cfg.n_layers
    return 4 * (n + layers * ctx * 2 * cfg.d_model)


def bench_gpt2(args, rows, notes, extra):
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    import nbformer
    from bench_gpt2_prefill import ensure_model

    path = ensure_model()
    nb = nbformer.load(path)
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    P, N = 16, 128
    ids = np.random.default_rng(0).integers(0, nb.config.vocab_size, size=(1, P), dtype=np.int64)
    ids_t = torch.from_numpy(ids)

    def run_nb():
        return nb.generate(ids, max_new_tokens=N)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=N, do_sample=False,
                               pad_token_id=nb.config.eos_token_id)

    a, b = run_nb(), run_hf().numpy()
    same = a.shape == b.shape and bool((a == b).all())
    new = a.shape[1] - P
    res = timeit_pair({"nbformer": run_nb, "transformers": run_hf}, warmup=args.warmup, repeat=args.repeat)
    tps = {k: new / v["median_s"] for k, v in res.items()}
    bw = copy_bandwidth()
    per_tok = weight_bytes_per_token(nb.config, P + N // 2)
    bound = bw / per_tok
    r = ratio(tps["nbformer"], tps["transformers"])
    rows += [{"case": "GPT-2 124M greedy, prompt 16, 128 new", "impl": "nbformer generate (KV cache)",
              "median s": res["nbformer"]["median_s"], "tokens/s": tps["nbformer"],
              "vs bandwidth bound": tps["nbformer"] / bound},
             {"case": "", "impl": "transformers generate", "median s": res["transformers"]["median_s"],
              "tokens/s": tps["transformers"], "vs bandwidth bound": tps["transformers"] / bound},
             {"case": "", "impl": "ratio nbformer/transformers", "tokens/s": r}]
    notes += [f"GPT-2: {new} new tokens per call (EOS never hit), tokens identical to transformers: {same}; "
              f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write), {per_tok / 1e6:.0f} MB read per token "
              f"(weights + KV cache at mean context {P + N // 2}) -> bound {bound:.1f} tokens/s"]
    extra["gpt2"] = {"raw": res, "ratio": r, "same_tokens": same, "copy_bandwidth_Bps": bw,
                     "bytes_per_token": per_tok, "bound_tokens_per_s": bound}
    return same


def bench_marian(args, rows, notes, extra):
    import numpy as np
    import torch
    from transformers import MarianMTModel

    import nbformer

    path = ensure_marian()
    nb = nbformer.load(path)
    hf = MarianMTModel.from_pretrained(path, dtype=torch.float32).eval()
    B, S, N, K = 2, 24, 48, 4
    src = np.random.default_rng(1).integers(1, 58100, size=(B, S), dtype=np.int64)
    src_t = torch.from_numpy(src)

    def run_nb():
        return nb.generate(src, max_new_tokens=N, num_beams=K, length_penalty=1.0)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(src_t, attention_mask=torch.ones_like(src_t), max_new_tokens=N, num_beams=K,
                               length_penalty=1.0, do_sample=False)

    a, b = np.asarray(run_nb()), run_hf().numpy()
    b = b[:, 1:]  # transformers returns the decoder start token too
    same = a.shape == b.shape and bool((a == b).all())
    res = timeit_pair({"nbformer": run_nb, "transformers": run_hf}, warmup=args.warmup, repeat=args.repeat)
    toks = B * a.shape[1]
    tps = {k: toks / v["median_s"] for k, v in res.items()}
    r = ratio(tps["nbformer"], tps["transformers"])
    rows += [{"case": f"Marian 6+6 d512 beam {K}, {B} sources x {S}, {N} new",
              "impl": "nbformer generate (KV cache)", "median s": res["nbformer"]["median_s"],
              "tokens/s": tps["nbformer"]},
             {"case": "", "impl": "transformers generate", "median s": res["transformers"]["median_s"],
              "tokens/s": tps["transformers"]},
             {"case": "", "impl": "ratio nbformer/transformers", "tokens/s": r}]
    notes += [f"Marian: output tokens per call {toks} (best beam per source), identical to transformers: {same}"]
    extra["marian"] = {"raw": res, "ratio": r, "same_tokens": same}
    return same


def bench_scaling(args, rows, notes, extra):
    """Cost of one new token vs context length: the KV-cache step against recomputing the prefix
    (RecomputeSession, what decoding without a cache does): O(T) vs O(T^2) attention and O(1) vs O(T)
    projections per token."""
    import numpy as np

    import nbformer
    from bench_gpt2_prefill import ensure_model
    from nbformer.generate import RecomputeSession

    nb = nbformer.load(ensure_model())
    rng = np.random.default_rng(2)
    steps = 4
    out = {}
    for ctx in (64, 256, 1000):
        ids = rng.integers(0, nb.config.vocab_size, size=(1, ctx), dtype=np.int64)
        mask = np.ones_like(ids)
        per = {}
        for name, make in (("KV cache", lambda: nb.session(1, ctx + steps + 1)),
                           ("recompute", lambda: RecomputeSession(nb, 1, ctx + steps + 1))):
            best = float("inf")
            for _ in range(max(1, args.repeat)):
                sess = make()
                sess.start(ids, mask)
                sess.step(np.array([1]))  # warm
                t0 = time.perf_counter()
                for k in range(steps):
                    sess.step(np.array([2 + k]))
                best = min(best, (time.perf_counter() - t0) / steps)
            per[name] = best
        out[ctx] = per
        rows.append({"case": f"GPT-2 124M, one new token at context {ctx}" if ctx == 64 else f"... at context {ctx}",
                     "impl": "KV-cache step", "median s": per["KV cache"], "tokens/s": 1 / per["KV cache"],
                     "vs bandwidth bound": None})
        rows.append({"case": "", "impl": "recompute the prefix (no cache)", "median s": per["recompute"],
                     "tokens/s": 1 / per["recompute"], "vs bandwidth bound": None})
    c = {k: v["KV cache"] for k, v in out.items()}
    r = {k: v["recompute"] for k, v in out.items()}
    notes.append(f"per-token cost 64 -> 1000 context: KV cache x{c[1000] / c[64]:.2f}, recompute x{r[1000] / r[64]:.1f} "
                 f"(best of {max(1, args.repeat)} x {steps} steps)")
    extra["scaling"] = {str(k): v for k, v in out.items()}
    return True


def bench_cli_ttft(args, rows, notes, extra):
    """Process start -> first generated character on stdout, warm Numba cache (one untimed run first)."""
    prompt = "And God said"
    cmd = [sys.executable, "-m", "cli.main", "generate", prompt, "--max-new-tokens", "8", "--seed", "1"]
    env = dict(os.environ)
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True)  # warm the cache
    firsts, totals = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        seen, first = b"", None
        while True:
            ch = p.stdout.read(1)
            if not ch:
                break
            seen += ch
            if first is None and len(seen) > len(prompt):
                first = time.perf_counter() - t0
        p.wait()
        totals.append(time.perf_counter() - t0)
        firsts.append(first if first is not None else float("nan"))
    out = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    try:
        obj = json.loads(out.stdout)
        inproc = {k: obj[k] for k in ("time_to_first_token_s", "tokens_per_s", "tokens") if k in obj}
    except ValueError:
        inproc = {}
    firsts.sort()
    totals.sort()
    rows += [{"case": "CLI time to first token (warm cache)", "impl": "nbformer generate, default model",
              "median s": firsts[len(firsts) // 2], "tokens/s": None}]
    notes += [f"CLI: `{' '.join(cmd[1:])}`; process start -> first generated text {firsts[len(firsts) // 2]:.2f} s "
              f"(median of {len(firsts)}), whole command {totals[len(totals) // 2]:.2f} s; in-process timings "
              f"from --json: {inproc}"]
    extra["cli"] = {"first_token_s": firsts, "total_s": totals, "json_timings": inproc}
    return True


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=3)
    p.add_argument("--skip-marian", action="store_true")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    rows, notes, extra = [], [], {"threads": threads}
    ok = True
    if not args.skip_gpt2:
        ok &= bench_gpt2(args, rows, notes, extra)
    if not args.skip_marian:
        ok &= bench_marian(args, rows, notes, extra)
    if not args.skip_scaling:
        ok &= bench_scaling(args, rows, notes, extra)
    if not args.skip_cli:
        ok &= bench_cli_ttft(args, rows, notes, extra)
    notes.append(f"median of {args.repeat} interleaved runs after {args.warmup} warm-up; ratios > 1: nbformer faster")
    md = write_results("decode", "Decoding with the KV cache vs transformers generate",
                       ["case", "impl", "median s", "tokens/s", "vs bandwidth bound"], rows, notes, extra=extra)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
