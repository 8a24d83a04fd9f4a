"""`nbformer quantize`: a GPT-2 or Llama-family model -> a quantized GGUF file (Q8_0 / Q4_0 / Q4_1)
that llama.cpp, the `gguf` reader and `nbformer.load` accept (see nbformer.quant.gguf_writer)."""
from __future__ import annotations

import json

import click

from .common import fmt_bytes, friendly


@click.command()
@click.argument("model_path")
@click.option("--type", "-t", "qtype", required=True, type=click.Choice(["q8_0", "q4_0", "q4_1"], case_sensitive=False),
              help="block type of the linear weights")
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
              help="the .gguf file to write")
@click.option("--token-embedding", default="q8_0", show_default=True,
              type=click.Choice(["q8_0", "q4_0", "q4_1", "f16", "f32"], case_sensitive=False),
              help="type of token_embd (the tied output head reads it too); llama.cpp's own Q4_1 files use Q8_0")
@click.option("--name", default=None, help="general.name of the file (default: the model's)")
@click.option("--no-tokenizer", is_flag=True, help="write the weights without the tokenizer metadata")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
@friendly
def quantize(model_path, qtype, output, token_embedding, name, no_tokenizer, as_json):
    """Quantize MODEL_PATH (Hugging Face gpt2 / llama directory, nbformer checkpoint or GGUF) to a GGUF file."""
    from pathlib import Path

    from nbformer.errors import InputError
    from nbformer.quant.gguf_writer import write_quantized_gguf
    from nbformer.weights import load_checkpoint

    out = Path(output)
    if out.suffix != ".gguf":
        raise InputError(f"--output {output}: expected a file name ending in .gguf")
    if not out.parent.exists():
        raise InputError(f"--output {output}: the folder {out.parent} does not exist")
    ckpt = load_checkpoint(model_path)
    try:
        summary = write_quantized_gguf(ckpt, out, qtype.lower(), token_embedding.lower(), name=name,
                                       tokenizer=not no_tokenizer)
    except OSError as e:
        raise InputError(f"--output {output}: cannot write the file ({e.strerror or e})") from None
    if as_json:
        click.echo(json.dumps(summary))
        return
    counts = {}
    for t in summary["tensors"].values():
        counts[t] = counts.get(t, 0) + 1
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    click.echo(f"wrote {summary['path']}: {len(summary['tensors'])} tensors ({kinds}), {fmt_bytes(summary['bytes'])}")
