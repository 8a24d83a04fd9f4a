"""all-MiniLM-L6-v2 sentence embeddings: nbformer Embedder vs sentence-transformers, same process.

256 deterministic English-like sentences of 5-20 words, batch 64, both sides normalised.
Throughput in sentences/s (median of --repeat after --warmup); ratio = nbformer / torch (> 1: nbformer faster).
Also checks the embeddings agree (max cosine deviation 1 - cos, expected ~1e-6).

    python benchmarks/bench_embed.py [--threads 2] [--warmup 2] [--repeat 5] [--n 256] [--batch 64]
"""
from __future__ import annotations

import random
import sys
import time

from common import bench_args, ratio, set_threads, timeit_pair, write_results

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


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=5)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)  # before numpy import

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from nbformer import Embedder
    from nbformer.defaults import default_embedder_path

    path = default_embedder_path()
    texts = make_sentences(args.n)
    t0 = time.perf_counter()
    nb = Embedder(path)
    nb_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = SentenceTransformer(str(path), device="cpu")
    st_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    e_nb = nb.encode(texts, batch_size=args.batch)
    nb_first = time.perf_counter() - t0  # includes Numba cache load / compile + graph builds
    e_st = st.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True)
    e_st = np.asarray(e_st, dtype=np.float32)

    def unit(a):
        a = a.astype(np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cos = np.sum(unit(e_nb) * unit(e_st), axis=1)
    max_cos_dev = float(np.max(np.abs(1.0 - cos)))
    max_abs = float(np.max(np.abs(e_nb.astype(np.float64) - e_st)))

    res = timeit_pair({
        "nbformer": lambda: nb.encode(texts, batch_size=args.batch),
        "torch": lambda: st.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True),
    }, warmup=args.warmup, repeat=args.repeat)
    n = len(texts)
    tok = nb.tokenizer.encode_batch(texts)
    lens = [len(ids) for ids, _ in tok]
    sps = {k: n / v["median_s"] for k, v in res.items()}
    r_best = res["torch"]["min_s"] / res["nbformer"]["min_s"]
    rows = [{"impl": "nbformer Embedder", "median s": res["nbformer"]["median_s"], "min s": res["nbformer"]["min_s"],
             "sentences/s": sps["nbformer"], "load s": nb_load},
            {"impl": "sentence-transformers (torch)", "median s": res["torch"]["median_s"],
             "min s": res["torch"]["min_s"], "sentences/s": sps["torch"], "load s": st_load},
            {"impl": "ratio nbformer/torch", "sentences/s": ratio(sps["nbformer"], sps["torch"])}]
    notes = [f"{n} sentences, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / n:.1f}), batch {args.batch}, "
             f"normalised; median of {args.repeat} after {args.warmup} warm-up runs, interleaved",
             f"ratio of best runs (min s, less sensitive to other processes on the machine): {r_best:.2f}",
             f"agreement: max(1 - cos) = {max_cos_dev:.2e}, max |diff| = {max_abs:.2e}",
             f"nbformer first encode (cache load / compile, graph builds): {nb_first:.2f} s"]
    md = write_results("embed", "Embedding: all-MiniLM-L6-v2, 256 sentences, batch 64",
                       ["impl", "median s", "min s", "sentences/s", "load s"], rows, notes,
                       extra={"raw": res, "max_cos_dev": max_cos_dev, "max_abs_diff": max_abs,
                              "nb_first_encode_s": nb_first, "ratio": ratio(sps["nbformer"], sps["torch"]), "ratio_best": r_best,
                              "threads": threads})
    print(md)
    if max_cos_dev > 1e-4:
        print(f"WARNING: embeddings disagree (max 1 - cos = {max_cos_dev:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
