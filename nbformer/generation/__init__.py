"""Decoding: greedy, sampling and beam search over a decoding session (KV cache), the way
transformers' `generate` does it (5.x semantics, token for token for greedy and beam search).

    generate(model, prompt, max_new_tokens=None, **options)   -> text / ids / GenerationResult
    stream(model, prompt, **options)                          -> iterator of text deltas

The package, by job (this file holds the two entry points and the session they decode over):
    options.py     generate()'s options + the model's generation config -> Spec (validated)
    inputs.py      prompt -> Job: tokenized, padded, truncated id arrays
    processors.py  logits processors; log-softmax and top-k helpers
    greedy.py      the greedy / sampling loop; choose_next, the one place a token is chosen
    beam.py        beam search
    text.py        continuation text, stop strings, streaming deltas
    results.py     GenerationResult and generate()'s return value
nbformer.generate is another name for this package (the module it was split from).

Prompts
    decoder-only: a str (-> str: prompt + continuation), a list of str (-> list of str; tokenized
        without special tokens and LEFT-padded with pad_token_id, else eos, else 0), or ids (B, T)
        with an optional attention_mask (0 = padding; must be left padding) -> ids (B, T + n):
        prompt + continuation, rows that finished early padded on the right with pad_token_id
        (default: eos), exactly like transformers.
    encoder-decoder (Marian): the prompt is the SOURCE: str / list of str (tokenized with special
        tokens, right-padded) or ids (B, S) + attention_mask. Decoding starts from
        decoder_start_token_id; the result is the generated target only: text (special tokens
        skipped) or ids (B, n) without the start token.
    num_return_sequences > 1: ids get B * n rows (row b * n + i); a str prompt gives a list of
        n strs; a list of prompts gives a list of lists.

Choosing tokens
    greedy unless sampling is asked for: sampling happens when temperature > 0 (do_sample is implied
    by it; do_sample=True alone means temperature 1.0; do_sample=False forces greedy). temperature 0
    means greedy. Sampling applies temperature -> top-k -> top-p (transformers' order) and draws with
    one uniform number per row per step from NumPy's PCG64 stream seeded by `seed`: same seed and
    inputs, same tokens. transformers' global top_k=50 sampling default is NOT applied (top_k=None
    means no top-k) unless the model's generation config sets it.
    num_beams > 1: beam search, a replica of transformers 5.x `_beam_search`: the top
    max(2, 1 + n_eos) * num_beams candidates of log_softmax + beam score, finished hypotheses scored
    sum(logprobs) / (generated tokens) ** length_penalty (the prompt does not count, the EOS does),
    early_stopping True / False (transformers' heuristic) / "never", n-best with scores
    (return_scores=True or return_dict=True). Beam sampling is not supported (InputError).

Logits processors, in transformers' order: repetition_penalty (over every real token of the row so
far, prompt included for decoders, the start token for encoder-decoders; left padding ignored),
no_repeat_ngram_size, bad_words_ids (single tokens and sequences; an [eos] entry is ignored),
min_length / min_new_tokens (EOS banned before), forced_eos_token_id (EOS forced at the last
position), renormalize_logits (beam scores only). Beam search applies them to log-probabilities,
greedy / sampling to logits, like transformers.

Defaults: an option left as None comes from model.config.extra["generation"] (transformers key
names: num_beams, length_penalty, early_stopping, repetition_penalty, no_repeat_ngram_size,
bad_words_ids, forced_eos_token_id, min_length, min_new_tokens, max_new_tokens, max_length,
do_sample, temperature, top_k, top_p, eos/pad/decoder_start_token_id, renormalize_logits), then
from the model config, then the built-in defaults (greedy, 1 beam, length_penalty 1.0,
early_stopping False, max_new_tokens 32 when neither max_new_tokens nor max_length is known).
A generation-config num_beams is not used when the caller asks for sampling.

Stopping: per row at EOS (config / generation eos_token_id, int or list; stop_at_eos=False turns it
off), at any of the `stop` strings (the continuation text is searched, not the prompt; ids keep the
token that completed the stop string, text is cut right before the stop string), and after
max_new_tokens. prompt + max_new_tokens must fit the model's max_positions: an InputError says so,
unless truncate=True, which keeps the last tokens of a decoder prompt that fit (the first ones of an
encoder-decoder source); the returned text still starts with the whole prompt string.

Streaming: stream() yields text deltas of the continuation as tokens come (batch 1, no beams; the
on_text= callback option of generate() gets the same deltas). The whole continuation is decoded at
each step and the new suffix yielded, holding back a trailing U+FFFD (a character split across
tokens) and any tail that could be the start of a stop string, so the deltas join to exactly the
continuation generate() returns.

Sessions: model computation goes through `model.session(n_rows, max_len, source_ids=, source_mask=,
cache=)` (nbformer.kv_cache: start(ids, mask) -> (N, V) logits of the last column,
step(next_ids) -> (N, V), reorder(rows)). cache=False selects kv_cache.UncachedSession, the
uncached reference with the same interface, which recomputes the whole prefix at every call
(RecomputeSession is its old name here).
"""
from __future__ import annotations

import time

from ..errors import InputError
from .beam import beam_finish_reasons, run_beam
from .greedy import GreedyState, choose_next, run_greedy
from .inputs import Job, prepare
from .options import OPTIONS, Spec, check_option_names, check_options, resolve
from .results import GenerationResult, build_result
from .text import TextDeltas

__all__ = ["generate", "stream", "GenerationResult", "check_options", "OPTIONS", "open_session", "choose_next",
           "Spec", "RecomputeSession"]


def open_session(model, n_rows, max_len, source_ids=None, source_mask=None, cache=True):
    """model.session(..., cache=cache) (the KV cache, or kv_cache.UncachedSession for cache=False);
    a model without a session method gets an UncachedSession."""
    if hasattr(model, "session"):
        return model.session(n_rows, max_len, source_ids=source_ids, source_mask=source_mask, cache=cache)
    from ..kv_cache import UncachedSession

    return UncachedSession(model, n_rows, max_len, source_ids, source_mask)


def _open_for(job: Job, rows_per_prompt: int):
    """A session for job's prompts, each repeated rows_per_prompt times (beams or samples), with
    room for spec.max_new tokens. It calls this module's open_session at call time, so replacing
    nbformer.generate.open_session (the tests slow every step down this way) reaches both loops."""
    src_ids, src_mask = job.repeated_source(rows_per_prompt)
    return open_session(job.model, job.B * rows_per_prompt, job.ids.shape[1] + job.spec.max_new,
                        src_ids, src_mask, job.spec.cache)


def _check_streamable(job, name):
    if job.B != 1 or job.spec.num_beams != 1 or job.spec.nrs != 1:
        raise InputError(f"{name}: streaming needs one prompt, num_beams = 1 and num_return_sequences = 1")


def generate(model, prompt, max_new_tokens=None, **options):
    """Generate from `prompt` (see the module docstring for prompts, options and results).

    Options: attention_mask, temperature, do_sample, top_k, top_p, repetition_penalty,
    no_repeat_ngram_size, num_beams, length_penalty, early_stopping, num_return_sequences,
    min_new_tokens, min_length, bad_words_ids, forced_eos_token_id, eos_token_id, pad_token_id,
    renormalize_logits, stop, stop_at_eos (default True), seed (default 0), truncate (default
    False), cache (default True: the model's KV-cache session), on_text (callable getting text
    deltas; batch 1, no beams), return_scores (beam search: (output, scores)), return_dict
    (a GenerationResult).
    """
    t0 = time.perf_counter()
    check_option_names(options)
    spec = resolve(model, max_new_tokens, options)
    job = prepare(model, prompt, spec, options.get("attention_mask"))
    if spec.return_scores and spec.num_beams == 1:
        raise InputError("return_scores: sequence scores come from beam search; pass num_beams > 1 "
                         "(or return_dict=True for the other details)")
    if spec.on_text is not None:
        _check_streamable(job, "on_text")
    if spec.num_beams > 1:
        seqs, scores, n_new, t_first = run_beam(job, _open_for(job, spec.num_beams))
        reasons = beam_finish_reasons(job, seqs, n_new)
        return build_result(job, seqs, n_new, reasons, scores, None, t0, t_first, spec.nrs)
    st = GreedyState(job)
    deltas = TextDeltas(spec.stops) if spec.on_text is not None else None
    t_first = None
    for _ in run_greedy(job, st, _open_for(job, st.expand), track_text=deltas is not None):
        if t_first is None:
            t_first = time.perf_counter()
        if deltas is not None:
            d = deltas.push(st.cont[0], final=not st.unfinished[0])
            if d:
                spec.on_text(d)
    seqs = st.seqs[:, :st.cur]
    conts = None
    if deltas is not None:
        conts = [st.cont[0]]
        d = deltas.push(st.cont[0], final=True)
        if d:
            spec.on_text(d)
    return build_result(job, seqs, st.n_new, st.reason, None, conts, t0, t_first, st.expand)


def stream(model, prompt, max_new_tokens=None, **options):
    """Yield the continuation's text deltas as tokens are produced (batch 1, no beams); the same
    options as generate(). ''.join(deltas) equals the continuation generate() returns (decoder
    models: generate(text) == text + ''.join(stream(text)))."""
    check_option_names(options)
    for bad in ("on_text", "return_scores", "return_dict"):
        if options.get(bad):
            raise InputError(f"{bad}: not an option of stream()")
    spec = resolve(model, max_new_tokens, options)
    job = prepare(model, prompt, spec, options.get("attention_mask"))
    if job.tok is None:
        job.tok = model.tokenizer
    _check_streamable(job, "stream")
    st = GreedyState(job)
    deltas = TextDeltas(spec.stops)
    for _ in run_greedy(job, st, _open_for(job, st.expand), track_text=True):
        d = deltas.push(st.cont[0], final=not st.unfinished[0])
        if d:
            yield d
    d = deltas.push(st.cont[0], final=True)
    if d:
        yield d


def __getattr__(name):
    if name == "RecomputeSession":  # the old name of the uncached reference session; kv_cache loads on use
        from ..kv_cache import UncachedSession

        return UncachedSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
