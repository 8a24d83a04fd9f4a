"""Exact match of a trained encoder-decoder on held-out pairs, decoded from text with nbformer.

    python scripts/seq2seq_eval.py MODEL TEST.tsv [--beams 1] [--batch 256] [--json]

MODEL is the folder `nbformer train` wrote (its model.safetensors + tokenizer.json) or a model
file. Each source is translated from its text (tokenized, encoded, decoded to text again) and
compared with the target string: the number a user of `nbformer translate` would get.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbformer  # noqa: E402
from nbformer.training.pairs import read_pairs  # noqa: E402


def exact_match(model, pairs, beams=1, batch=256, max_new_tokens=None):
    """-> (fraction of exact matches, [(source, target, got)] misses, seconds)."""
    if max_new_tokens is None:
        tok = model.tokenizer
        max_new_tokens = 2 * max(len(tok.encode(t, add_special_tokens=False)) for _, t in pairs) + 2
    misses, t0 = [], time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        got = model.generate([s for s, _ in chunk], max_new_tokens=max_new_tokens, num_beams=beams)
        misses += [(s, t, g) for (s, t), g in zip(chunk, got) if g != t]
    return 1.0 - len(misses) / len(pairs), misses, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("test")
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    path = Path(a.model)
    if path.is_dir() and (path / "model.safetensors").exists():
        path = path / "model.safetensors"
    model = nbformer.load(path)
    pairs = read_pairs(a.test)
    em, misses, secs = exact_match(model, pairs, a.beams, a.batch)
    if a.json:
        print(json.dumps({"model": str(path), "test": a.test, "pairs": len(pairs), "beams": a.beams,
                          "exact_match": em, "misses": [list(m) for m in misses[:20]], "seconds": round(secs, 2)}))
    else:
        print(f"{a.test}: exact match {100 * em:.2f}% ({len(pairs) - len(misses)}/{len(pairs)}), beams {a.beams}, "
              f"{secs:.1f} s")
        for s, t, g in misses[:10]:
            print(f"  {s!r}: expected {t!r}, got {g!r}")


if __name__ == "__main__":
    main()
