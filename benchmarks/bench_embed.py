"""all-MiniLM-L6-v2 sentence embeddings: nbformer Embedder vs sentence-transformers, same process.

Cases (--cases): varied (256 deterministic English-like sentences of 5-20 words), uniform20 (256
sentences of 19-21 tokens: all about the same length), words5 (5-word sentences), tokens128 (texts of
about 128 tokens); batch 64, both sides normalised.
Throughput in sentences/s (median of --repeat after --warmup); ratio = nbformer / torch (> 1: nbformer faster).
Also checks the embeddings agree (max cosine deviation 1 - cos, expected ~1e-6).

    python benchmarks/bench_embed.py [--threads 2] [--warmup 2] [--repeat 5] [--n 256] [--batch 64] [--cases ...]
"""
from __future__ import annotations

import random
import sys
import time

from common import bench_args, ratio, set_threads, sgemm_rates, timeit_pair, write_results

_SUBJECTS = ["the cat", "a small dog", "my neighbour", "the old man", "our teacher", "the committee",
             "a young engineer", "the river", "this company", "the children", "a stranger", "the weather",
             "the new government", "her brother", "the orchestra", "a quiet student", "the farmer", "the city"]
_VERBS = ["walked to", "looked at", "talked about", "painted", "repaired", "forgot", "discovered", "bought",
          "sold", "remembered", "described", "ignored", "visited", "cleaned", "wrote about", "photographed",
          "carried", "measured", "explained", "opened"]
_OBJECTS = ["the market", "a red bicycle", "the broken window", "an old map", "the train station",
            "the mountain trail", "a cup of coffee", "the quarterly report", "the garden", "a long letter",
            "the museum", "the football match", "a strange noise", "the kitchen table", "the harbour",
            "the final exam", "a wooden boat", "the evening news"]
_TAILS = ["yesterday", "before breakfast", "in the rain", "after a long day at work", "with great care",
          "for the first time", "without saying a word", "near the old bridge", "during the summer holidays",
          "because nobody else would", "while the sun was setting", "again", "on Tuesday morning",
          "as quickly as possible", "in front of everyone", "and then went home", "last winter"]
_EXTRA = ["very", "quite", "surprisingly", "really", "slowly", "happily", "carefully", "suddenly"]


def make_sentences(n: int = 256, seed: int = 0, lo: int = 5, hi: int = 20) -> list:
    """n varied sentences of lo..hi words, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target = rng.randint(lo, hi)
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_EXTRA)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}".split()
        while len(words) < target:
            words += rng.choice(_TAILS + _OBJECTS).split() if rng.random() < 0.7 else [rng.choice(_EXTRA)]
        words = words[:target]
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])
        out.append(s)
    return out


def make_uniform(tokenizer, n: int, lo_tok: int, hi_tok: int, seed: int = 1) -> list:
    """n sentences whose token count (with [CLS]/[SEP]) lies in [lo_tok, hi_tok]: all about the same length."""
    out, k = [], 0
    while len(out) < n:
        cand = make_sentences(4 * n, seed=seed + k, lo=max(1, lo_tok - 6), hi=hi_tok)
        for text, (ids, _) in zip(cand, tokenizer.encode_batch(cand)):
            if lo_tok <= len(ids) <= hi_tok and len(out) < n:
                out.append(text)
        k += 1
    return out


def make_long(tokenizer, n: int, tokens: int, seed: int = 2) -> list:
    """n texts of about `tokens` tokens each (sentences joined, cut to fit)."""
    rng = random.Random(seed)
    out = []
    pool = make_sentences(40 * n, seed=seed)
    while len(out) < n:
        words = []
        while True:
            words += rng.choice(pool).split()
            text = " ".join(words)
            if len(tokenizer.encode_batch([text])[0][0]) >= tokens:
                break
        while len(tokenizer.encode_batch([" ".join(words)])[0][0]) > tokens:
            words.pop()
        out.append(" ".join(words))
    return out


CASES = ("varied", "uniform20", "words5", "tokens128")


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=5)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)  # before numpy import

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from nbformer import Embedder
    from nbformer.defaults import default_embedder_path

    path = default_embedder_path()
    t0 = time.perf_counter()
    nb = Embedder(path)
    nb_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = SentenceTransformer(str(path), device="cpu")
    st_load = time.perf_counter() - t0
    tk = nb.tokenizer
    texts_of = {"varied": lambda: make_sentences(args.n),
                "uniform20": lambda: make_uniform(tk, args.n, 19, 21),
                "words5": lambda: make_sentences(args.n, seed=3, lo=5, hi=5),
                "tokens128": lambda: make_long(tk, args.n, 128)}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in texts_of]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected some of {list(texts_of)}")

    def unit(a):
        a = a.astype(np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cfg = nb.model.config
    d, L, F = cfg.d_model, cfg.n_layers, cfg.d_ff

    def gflop(lens):  # the model's FLOPs on the real (unpadded) tokens: linear layers and attention
        return sum(n * 2 * L * (4 * d * d + 2 * d * F) + L * 4 * n * n * d for n in lens) / 1e9

    rows, notes, raw, worst, rates = [], [], {}, 0.0, []
    first = None
    for case in cases:
        texts = texts_of[case]()
        t0 = time.perf_counter()
        e_nb = nb.encode(texts, batch_size=args.batch)
        if first is None:
            first = time.perf_counter() - t0  # includes Numba cache load / compile + graph builds
        e_st = np.asarray(st.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True),
                          dtype=np.float32)
        cos = np.sum(unit(e_nb) * unit(e_st), axis=1)
        dev = float(np.max(np.abs(1.0 - cos)))
        worst = max(worst, dev)
        res = timeit_pair({
            "nbformer": lambda: nb.encode(texts, batch_size=args.batch),
            "torch": lambda: st.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True),
        }, warmup=args.warmup, repeat=args.repeat)
        n = len(texts)
        lens = [len(ids) for ids, _ in tk.encode_batch(texts)]
        sps = {k: n / v["median_s"] for k, v in res.items()}
        per_round = [b / a for a, b in zip(res["nbformer"]["times_s"], res["torch"]["times_s"])]
        rows += [{"case": f"{case}: {n} texts, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / n:.1f})",
                  "impl": "nbformer Embedder", "median s": res["nbformer"]["median_s"], "min s": res["nbformer"]["min_s"],
                  "sentences/s": sps["nbformer"]},
                 {"case": "", "impl": "sentence-transformers (torch)", "median s": res["torch"]["median_s"],
                  "min s": res["torch"]["min_s"], "sentences/s": sps["torch"]},
                 {"case": "", "impl": "ratio nbformer/torch", "sentences/s": ratio(sps["nbformer"], sps["torch"]),
                  "ratio per round": f"{np.median(per_round):.2f} [{min(per_round):.2f}..{max(per_round):.2f}]"}]
        g = gflop(lens)
        rates.append(f"{case} {g / res['nbformer']['median_s']:.0f} / {g / res['torch']['median_s']:.0f}")
        raw[case] = {"gflop": g, "res": res, "max_cos_dev": dev, "ratio": ratio(sps["nbformer"], sps["torch"]),
                     "ratio_per_round": per_round, "lengths": [min(lens), max(lens), sum(lens) / n]}
    peak = sgemm_rates()
    notes = [f"batch {args.batch}, normalised; median of {args.repeat} after {args.warmup} warm-up runs, interleaved; "
             f"'ratio per round' = torch time / nbformer time of each interleaved round, median [min..max]",
             f"agreement: max(1 - cos) over all cases = {worst:.2e}",
             f"effective GFLOP/s (nbformer / torch; the model's FLOPs on the real tokens, no padding): "
             f"{', '.join(rates)}; this machine's fp32 GEMM rate: torch.mm 2048^3 {peak['torch_mm_2048']:.0f}, "
             f"nbformer matmul_nn {peak['nbformer_matmul']:.0f} GFLOP/s",
             f"load: nbformer {nb_load:.2f} s, sentence-transformers {st_load:.2f} s; nbformer first encode "
             f"(cache load / compile, graph builds) {first:.2f} s"]
    md = write_results("embed", f"Embedding: all-MiniLM-L6-v2, batch {args.batch}",
                       ["case", "impl", "median s", "min s", "sentences/s", "ratio per round"], rows, notes,
                       extra={"raw": raw, "threads": threads, "sgemm_gflops": peak})
    print(md)
    if worst > 1e-4:
        print(f"WARNING: embeddings disagree (max 1 - cos = {worst:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
