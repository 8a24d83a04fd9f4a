"""`nbformer train`: train or fine-tune a decoder or an encoder-decoder from a text / pairs file."""
from __future__ import annotations

import click

from .common import device_option, friendly


PRESETS = {  # d_model, layers, heads, d_ff
    "tiny": (128, 4, 4, 512),
    "small": (256, 4, 4, 1024),
    "base": (512, 6, 8, 2048),
    "seq2seq": (128, 2, 4, 512),  # encoder-decoder: 2 encoder + 2 decoder layers
    "transformer-base": (512, 6, 8, 2048),  # the original Transformer base model (6 + 6 layers)
}


@click.command()
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
@click.option("--sync-every", default=0, show_default=True, type=int,
              help="read the loss and gradient norm back every N steps (0: every step on the CPU, every 10 on a "
                   "GPU, where each read waits for the device)")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.safetensors (bit-identical)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@device_option
@friendly
def train(text_file, out_dir, model_path, arch, eval_file, eval_pairs, tokenizer_path, vocab_size, preset, d_model,
          layers, decoder_layers, heads, d_ff, norm, activation, positions, batch_size, seq_len, steps, lr, schedule,
          warmup, optimizer, weight_decay, clip, dropout, label_smoothing, seed, eval_every, save_every, sync_every,
          resume, quiet, device):
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
        m = nbformer.load(model_path, device="cpu")  # host weights to start from; the trainer puts them on --device
        from nbformer.quant.binding import refuse_training

        refuse_training(m.ckpt, f"--model {model_path}")
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
                        eval_pairs=eval_pairs, sync_every=sync_every)
    if params is None:
        params = init_params(cfg, seed)
    trainer = Trainer(cfg, params, data, opts, out, tok.to_json(), device=device, progress=not quiet)
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
