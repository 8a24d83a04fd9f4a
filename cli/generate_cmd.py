"""`nbformer generate` and `nbformer translate`: decoding with streaming, batches from --input, JSON results."""
from __future__ import annotations

import json
import sys

import click

from .common import device_option, friendly, no_compile_progress


@click.command()
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
@device_option
@friendly
def generate(prompt, model_path, max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
             num_beams, length_penalty, num_return, stops, ignore_eos, truncate, seed, input_file, batch_size, as_json,
             verbose, device):
    """Continue PROMPT with a decoder model (GPT-2 style), streaming the text as it comes.

    With an encoder-decoder model PROMPT is the source and the output its translation, as in
    `nbformer translate`."""
    if as_json:
        no_compile_progress()
    import nbformer
    from nbformer.errors import InputError

    prompts, labels = _gather_prompts([] if prompt is None else [prompt], input_file, "PROMPT")
    if batch_size < 1:
        raise InputError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if model_path is None:
        from nbformer.defaults import default_generator_path

        model_path = default_generator_path()
    m = nbformer.load(model_path, device=device)
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


@click.command()
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
@device_option
@friendly
def translate(texts, model_path, input_file, num_beams, length_penalty, num_return, max_new_tokens,
              repetition_penalty, no_repeat_ngram_size, truncate, batch_size, as_json, verbose, device):
    """Translate TEXTS (and the lines of --input) with an encoder-decoder model (Marian)."""
    if as_json:
        no_compile_progress()
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
    m = nbformer.load(model_path, device=device)
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
