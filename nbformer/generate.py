"""Decoding: greedy, sampling and beam search over a decoding session (KV cache), the way
transformers' `generate` does it (5.x semantics, token for token for greedy and beam search).

    generate(model, prompt, max_new_tokens=None, **options)   -> text / ids / GenerationResult
    stream(model, prompt, **options)                          -> iterator of text deltas

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

Sessions: model computation goes through `model.session(n_rows, max_len, source_ids=, source_mask=)`
(the KV cache: start(ids, mask) -> (N, V) logits of the last column, step(next_ids) -> (N, V),
reorder(rows)). RecomputeSession below is the uncached reference with the same interface
(cache=False selects it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

NEG = np.float32(-1.0e9)  # transformers' "very large negative" beam-score mask
_CTX = 8  # prompt tokens decoded in front of the continuation so word-boundary spaces come out right


# ---------------------------------------------------------------------------- sessions
def _left_pad_positions(mask: np.ndarray) -> np.ndarray:
    """transformers' position ids for left-padded prompts: cumsum(mask) - 1, pads at 1 (never read)."""
    pos = np.cumsum(mask, axis=1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return pos


class RecomputeSession:
    """The uncached reference session: keeps ids / mask / positions and recomputes the whole
    prefix at every call (model.last_logits; encoder-decoders: model.seq2seq_logits).

        s = RecomputeSession(model, n_rows, max_len[, source_ids, source_mask])
        s.start(ids (N, T0) left-padded, mask (N, T0)) -> (N, V) float32 logits of the last column
        s.step(next_ids (N,)) -> (N, V);   s.reorder(rows (N,)): row i becomes old row rows[i]
    """

    def __init__(self, model, n_rows: int, max_len: int, source_ids=None, source_mask=None):
        self.model, self.n_rows, self.max_len = model, int(n_rows), int(max_len)
        self.src = None
        if model.config.arch == "encoder_decoder":
            if source_ids is None:
                raise InputError("session: an encoder-decoder model needs source_ids")
            self.src = model.prepare_source(source_ids, source_mask)
        self.ids = None

    def start(self, ids, mask=None):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ones(ids.shape, np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
        if ids.shape[0] != self.n_rows or ids.shape[1] > self.max_len:
            raise InputError(f"session: ids of shape {ids.shape} do not fit {self.n_rows} rows x {self.max_len}")
        self.ids, self.mask = ids, mask
        if self.src is not None:
            self.pos = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
        else:
            self.pos = _left_pad_positions(mask)
        return self._logits()

    def step(self, next_ids):
        if self.ids is None:
            raise InputError("session: call start() before step()")
        if self.ids.shape[1] >= self.max_len:
            raise InputError(f"session: all {self.max_len} positions are used (max_len)")
        nxt = np.asarray(next_ids, dtype=np.int64).reshape(self.n_rows, 1)
        self.ids = np.concatenate([self.ids, nxt], axis=1)
        self.mask = np.concatenate([self.mask, np.ones((self.n_rows, 1), np.uint8)], axis=1)
        self.pos = np.concatenate([self.pos, self.pos[:, -1:] + 1], axis=1)
        return self._logits()

    def reorder(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        self.ids, self.mask, self.pos = self.ids[rows], self.mask[rows], self.pos[rows]
        if self.src is not None:
            self.src = {k: np.ascontiguousarray(v[rows]) for k, v in self.src.items()}

    def _logits(self):
        N, T = self.ids.shape
        last = np.full(N, T - 1, dtype=np.int64)
        if self.src is not None:
            return self.model.seq2seq_logits(self.src, self.ids, last)
        inputs = self.model.prepare_inputs(self.ids, attention_mask=self.mask, position_ids=self.pos)
        return self.model.last_logits(inputs, last)


def open_session(model, n_rows, max_len, source_ids=None, source_mask=None, cache=True):
    """model.session(...) when the model has one and cache is on, else RecomputeSession."""
    seq2seq = model.config.arch == "encoder_decoder"
    if cache and hasattr(model, "session"):
        if seq2seq:
            return model.session(n_rows, max_len, source_ids=source_ids, source_mask=source_mask)
        return model.session(n_rows, max_len)
    return RecomputeSession(model, n_rows, max_len, source_ids, source_mask)


# ---------------------------------------------------------------------------- results
@dataclass
class GenerationResult:
    """What generate(..., return_dict=True) returns.

    output: what generate returns without return_dict (text, list of texts or ids).
    sequences: ids, (R, T) with R = batch * num_return_sequences: decoder-only prompt + continuation
        (right-padded like transformers), encoder-decoder the generated target without the start token.
    texts: the continuation texts (decoder-only: without the prompt), one per row, or None for ids prompts
        of a model without tokenizer.
    new_tokens: (R,) tokens generated per row until it finished (its EOS included).
    scores: (R,) beam scores (transformers' sequences_scores) or None without beams.
    finish_reasons: per row "eos", "stop" (a stop string) or "length".
    prompt_tokens: prompt columns (decoder-only, after padding / truncation) or source columns.
    time_to_first_token, total_time: seconds (from the call; the first token includes the prefill).
    """
    output: object
    sequences: np.ndarray
    texts: list | None
    new_tokens: np.ndarray
    scores: np.ndarray | None
    finish_reasons: list
    prompt_tokens: int
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of decoding after the first token."""
        n = int(self.new_tokens.sum())
        rows = len(self.new_tokens)
        dt = self.total_time - self.time_to_first_token
        return (n - rows) / dt if dt > 0 and n > rows else 0.0


# ---------------------------------------------------------------------------- options
_UNSET = object()
OPTIONS = ("attention_mask", "temperature", "do_sample", "top_k", "top_p", "repetition_penalty",
           "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
           "min_new_tokens", "min_length", "bad_words_ids", "forced_eos_token_id", "eos_token_id",
           "pad_token_id", "renormalize_logits", "stop", "stop_at_eos", "seed", "truncate", "cache", "on_text",
           "return_scores", "return_dict")


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_num(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_options(max_new_tokens, temperature, top_k, top_p):
    """The sampling options' checks (kept for callers of the old API)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if temperature is not None and (not _is_num(temperature) or not np.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_num(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def _token_list(value, name, V, allow_none=True):
    """None | id | list of ids -> list of ids (validated) or None."""
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name}: expected a token id")
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not vals or not all(_is_int(v) and 0 <= v < V for v in vals):
        raise InputError(f"{name}: expected a token id or a list of ids in [0, {V}), got {value!r}")
    return [int(v) for v in vals]


@dataclass
class _Spec:
    """The resolved request."""
    max_new: int
    sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    rep_penalty: float | None
    ngram: int
    num_beams: int
    length_penalty: float
    early_stopping: object
    nrs: int
    min_new: int
    min_length: int
    bad_single: list
    bad_multi: list
    forced_eos: list | None
    eos: list | None
    pad: int
    renormalize: bool
    stops: list
    seed: int
    truncate: bool
    cache: bool
    on_text: object
    return_scores: bool
    return_dict: bool


def _resolve(model, max_new_tokens, opts) -> _Spec:
    cfg = model.config
    V = cfg.vocab_size
    gen = dict((cfg.extra or {}).get("generation", {}) or {})

    def pick(name, gen_key=None):
        v = opts.get(name)
        return gen.get(gen_key or name) if v is None else v

    # sampling or not
    do_sample = opts.get("do_sample")
    temperature = opts.get("temperature")
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise InputError(f"do_sample: expected True, False or None, got {do_sample!r}")
    if temperature is not None and (not _is_num(temperature) or not np.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if do_sample is None and temperature is None:
        do_sample = bool(gen.get("do_sample", False))
        temperature = gen.get("temperature") if do_sample else None
    if do_sample is None:
        do_sample = temperature > 0
    if do_sample:
        if temperature is None:
            temperature = 1.0
        if temperature == 0:
            raise InputError("temperature: 0 means greedy decoding; do_sample=True needs temperature > 0")
    temperature = float(temperature) if do_sample else 0.0
    top_k = pick("top_k") if do_sample else opts.get("top_k")
    top_p = pick("top_p") if do_sample else opts.get("top_p")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_num(top_p) or not np.isfinite(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")

    rp = pick("repetition_penalty")
    if rp is not None and (not _is_num(rp) or not np.isfinite(rp) or rp <= 0):
        raise InputError(f"repetition_penalty: expected a number > 0 (1.0 = off), got {rp!r}")
    ngram = pick("no_repeat_ngram_size") or 0
    if not _is_int(ngram) or ngram < 0:
        raise InputError(f"no_repeat_ngram_size: expected an integer >= 0 (0 = off), got {ngram!r}")

    nb = opts.get("num_beams")
    if nb is None:
        nb = 1 if do_sample else gen.get("num_beams", 1)
    if not _is_int(nb) or nb < 1:
        raise InputError(f"num_beams: expected an integer >= 1, got {nb!r}")
    nb = int(nb)
    if nb > 1 and do_sample:
        raise InputError(f"num_beams: beam search ({nb} beams) cannot be combined with sampling "
                         f"(temperature {temperature}); pass temperature=0 or num_beams=1")
    lp = pick("length_penalty")
    lp = 1.0 if lp is None else lp
    if not _is_num(lp) or not np.isfinite(lp):
        raise InputError(f"length_penalty: expected a finite number, got {lp!r}")
    es = pick("early_stopping")
    es = False if es is None else es
    if isinstance(es, np.bool_):
        es = bool(es)
    if not (isinstance(es, bool) or es == "never"):
        raise InputError(f"early_stopping: expected True, False or 'never', got {es!r}")
    nrs = opts.get("num_return_sequences")
    nrs = 1 if nrs is None else nrs
    if not _is_int(nrs) or nrs < 1:
        raise InputError(f"num_return_sequences: expected an integer >= 1, got {nrs!r}")
    if nb > 1 and nrs > nb:
        raise InputError(f"num_return_sequences: {nrs} is more than num_beams = {nb}")
    if nb == 1 and not do_sample and nrs > 1:
        raise InputError(f"num_return_sequences: greedy decoding gives one sequence per prompt (got {nrs}); "
                         f"use num_beams >= {nrs} or sampling (temperature > 0)")

    # special tokens
    stop_at_eos = opts.get("stop_at_eos")
    stop_at_eos = True if stop_at_eos is None else stop_at_eos
    eos = opts.get("eos_token_id")
    if eos is None:
        eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos = _token_list(eos, "eos_token_id", V) if stop_at_eos else None
    pad = opts.get("pad_token_id")
    if pad is None:
        pad = gen.get("pad_token_id", cfg.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else (cfg.eos_token_id if cfg.eos_token_id is not None else 0)
    if not _is_int(pad) or not 0 <= pad < V:
        raise InputError(f"pad_token_id: expected a token id in [0, {V}), got {pad!r}")

    min_new = opts.get("min_new_tokens")
    min_new = gen.get("min_new_tokens", 0) if min_new is None else min_new
    if not _is_int(min_new or 0) or (min_new or 0) < 0:
        raise InputError(f"min_new_tokens: expected an integer >= 0, got {min_new!r}")
    min_len = pick("min_length") or 0
    if not _is_int(min_len) or min_len < 0:
        raise InputError(f"min_length: expected an integer >= 0, got {min_len!r}")

    bad = pick("bad_words_ids")
    bad_single, bad_multi = [], []
    if bad is not None:
        if (not isinstance(bad, (list, tuple)) or not bad or
                not all(isinstance(w, (list, tuple)) and w and all(_is_int(t) and 0 <= t < V for t in w) for w in bad)):
            raise InputError(f"bad_words_ids: expected a non-empty list of non-empty lists of token ids in "
                             f"[0, {V}), got {bad!r}")
        for w in bad:
            w = [int(t) for t in w]
            if len(w) == 1:
                if not (eos and w[0] in eos):  # transformers never bans an EOS on its own
                    bad_single.append(w[0])
            else:
                bad_multi.append(w)
    forced = _token_list(pick("forced_eos_token_id"), "forced_eos_token_id", V)
    renorm = pick("renormalize_logits")

    stops = opts.get("stop")
    if stops is None:
        stops = []
    elif isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop: expected a string or a list of non-empty strings, got {stops!r}")
    seed = opts.get("seed")
    seed = 0 if seed is None else seed
    if not _is_int(seed) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}")
    on_text = opts.get("on_text")
    if on_text is not None and not callable(on_text):
        raise InputError("on_text: expected a callable taking one str")
    if on_text is not None and (nb != 1 or int(nrs) != 1):
        raise InputError("on_text: streaming needs num_beams = 1 and num_return_sequences = 1")

    # length
    if max_new_tokens is None:
        max_new_tokens = gen.get("max_new_tokens")
    if max_new_tokens is None and gen.get("max_length") is not None:
        max_new_tokens = ("max_length", gen["max_length"])  # resolved once the prompt length is known
    if max_new_tokens is None:
        max_new_tokens = 32
    if not isinstance(max_new_tokens, tuple) and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    return _Spec(max_new=max_new_tokens, sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p,
                 rep_penalty=None if rp is None or rp == 1.0 else float(rp), ngram=int(ngram), num_beams=nb,
                 length_penalty=lp, early_stopping=es, nrs=int(nrs), min_new=int(min_new or 0),
                 min_length=int(min_len), bad_single=bad_single, bad_multi=bad_multi, forced_eos=forced, eos=eos,
                 pad=int(pad), renormalize=bool(renorm), stops=list(stops), seed=int(seed),
                 truncate=bool(opts.get("truncate") or False),
                 cache=True if opts.get("cache") is None else bool(opts.get("cache")), on_text=on_text,
                 return_scores=bool(opts.get("return_scores") or False),
                 return_dict=bool(opts.get("return_dict") or False))


# ---------------------------------------------------------------------------- prompts
@dataclass
class _Job:
    model: object
    spec: _Spec
    seq2seq: bool
    kind: str  # "text" | "texts" | "ids"
    prompts: list | None  # the prompt strings (text kinds)
    ids: np.ndarray  # decoder prompt (B, T0) left-padded (seq2seq: the start column)
    mask: np.ndarray
    src_ids: np.ndarray | None = None
    src_mask: np.ndarray | None = None
    tok: object = None

    @property
    def B(self):
        return self.ids.shape[0]


def _tokenizer_or_none(model):
    try:
        return model.tokenizer
    except Exception:
        return None


def _clip(ids, mask, n, keep_end):
    """Keep n columns of an ids prompt (and its mask) before validation; malformed input is left
    for model.prepare_inputs to report."""
    try:
        a = np.asarray(ids)
    except ValueError:
        return ids, mask
    if a.dtype == object or a.ndim not in (1, 2) or a.shape[-1] <= n:
        return ids, mask
    sl = slice(-n, None) if keep_end else slice(0, n)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != a.shape:
            return ids, mask
        mask = m[..., sl]
    return a[..., sl], mask


def _prepare(model, prompt, spec: _Spec, attention_mask) -> _Job:
    cfg = model.config
    seq2seq = cfg.arch == "encoder_decoder"
    if not seq2seq and (cfg.arch != "decoder" or not cfg.lm_head):
        raise InputError(f"generate: this model is an {cfg.arch} without a language-model head; only decoder "
                         f"and encoder-decoder models generate")
    if isinstance(prompt, str):
        kind, texts = "text", [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        kind, texts = "texts", list(prompt)
    elif isinstance(prompt, (list, tuple)) and not prompt:
        raise InputError("prompt: empty list")
    else:
        kind, texts = "ids", None
    if kind != "ids" and attention_mask is not None:
        raise InputError("attention_mask: only with a prompt of token ids (text prompts are padded here)")
    tok = model.tokenizer if kind != "ids" or spec.stops or spec.on_text else _tokenizer_or_none(model)
    limit = cfg.max_positions if cfg.positions != "none" else None

    if seq2seq:
        if kind == "ids":
            if spec.truncate and limit is not None:
                prompt, attention_mask = _clip(prompt, attention_mask, limit, keep_end=False)
            src = model.prepare_inputs(prompt, attention_mask)
            s_ids, s_mask = src["input_ids"], src["key_mask"]
        else:
            rows = [tok.encode(t, add_special_tokens=True) for t in texts]
            for i, r in enumerate(rows):
                if not r:
                    raise InputError(f"prompt{'' if kind == 'text' else f'[{i}]'}: empty source text")
            S = max(len(r) for r in rows)
            s_ids = np.full((len(rows), S), spec.pad, dtype=np.int64)
            s_mask = np.zeros((len(rows), S), dtype=np.uint8)
            for i, r in enumerate(rows):
                s_ids[i, :len(r)] = r
                s_mask[i, :len(r)] = 1
        if limit is not None and s_ids.shape[1] > limit:
            if not spec.truncate:
                raise InputError(f"prompt: the source has {s_ids.shape[1]} tokens, more than the model's {limit} "
                                 f"positions (pass truncate=True to keep the first {limit})")
            s_ids, s_mask = s_ids[:, :limit], s_mask[:, :limit]
        start = (cfg.extra or {}).get("generation", {}).get("decoder_start_token_id", cfg.decoder_start_token_id)
        if start is None:
            start = cfg.bos_token_id
        if start is None:
            raise InputError("decoder_start_token_id: the model config has none (nor a bos_token_id), so an "
                             "encoder-decoder cannot start decoding")
        B = s_ids.shape[0]
        job = _Job(model, spec, True, kind, texts, np.full((B, 1), int(start), dtype=np.int64),
                   np.ones((B, 1), dtype=np.uint8), np.ascontiguousarray(s_ids), np.ascontiguousarray(s_mask), tok)
    else:
        if kind == "ids":
            if spec.truncate and limit is not None and _is_int(spec.max_new) and spec.max_new < limit:
                prompt, attention_mask = _clip(prompt, attention_mask, limit - spec.max_new, keep_end=True)
            elif limit is not None and not spec.truncate:
                try:
                    n = np.shape(prompt)[-1] if np.ndim(prompt) in (1, 2) else 0
                except ValueError:  # ragged: model.prepare_inputs reports it
                    n = 0
                if n > limit:
                    raise InputError(f"input_ids: the prompt has {n} tokens, more than the model's {limit} "
                                     f"positions (pass truncate=True to keep the end of the prompt)")
            x = model.prepare_inputs(prompt, attention_mask)
            ids, mask = x["input_ids"], x["key_mask"]
            if not mask[:, -1].all():
                raise InputError("attention_mask: decoder prompts must be left-padded (the last column must be "
                                 "real tokens in every row)")
        else:
            rows = []
            for i, t in enumerate(texts):
                r = tok.encode(t, add_special_tokens=False)
                if not r:
                    if cfg.bos_token_id is None:
                        where = "prompt" if kind == "text" else f"prompt[{i}]"
                        raise InputError(f"{where}: empty text and the model has no bos_token_id to start from")
                    r = [cfg.bos_token_id]
                rows.append(r)
            if spec.truncate and limit is not None and _is_int(spec.max_new) and spec.max_new < limit:
                rows = [r[-(limit - spec.max_new):] for r in rows]  # keep the end of a too-long prompt
            longest = max(len(r) for r in rows)
            if limit is not None and longest > limit:
                raise InputError(f"prompt: {longest} tokens, more than the model's {limit} positions (pass "
                                 f"truncate=True to keep the end of the prompt)")
            T = max(len(r) for r in rows)
            ids = np.full((len(rows), T), spec.pad, dtype=np.int64)
            mask = np.zeros((len(rows), T), dtype=np.uint8)
            for i, r in enumerate(rows):
                ids[i, T - len(r):] = r
                mask[i, T - len(r):] = 1
            x = model.prepare_inputs(ids, mask)  # validates ids against the vocabulary
        job = _Job(model, spec, False, kind, texts, np.ascontiguousarray(ids), np.ascontiguousarray(mask), tok=tok)

    # max_new_tokens from a generation-config max_length (transformers: max_length counts the decoder prompt)
    T0 = job.ids.shape[1]
    if isinstance(spec.max_new, tuple):
        n = int(spec.max_new[1]) - T0
        if n < 1:
            raise InputError(f"max_new_tokens: the model's generation max_length {spec.max_new[1]} leaves no room "
                             f"after a {T0}-token prompt; pass max_new_tokens")
        if limit is not None:
            n = max(1, min(n, limit - T0))
        spec.max_new = n
    if limit is not None and T0 + spec.max_new > limit:
        if seq2seq or not spec.truncate or spec.max_new >= limit:
            hint = "" if seq2seq or spec.max_new >= limit else " (truncate=True keeps the end of the prompt)"
            what = "the decoder start token" if seq2seq else f"prompt of {T0} tokens"
            raise InputError(f"max_new_tokens: {what} + max_new_tokens {spec.max_new} exceeds the model's "
                             f"{limit} positions{hint}")
        keep = limit - spec.max_new
        job.ids, job.mask = np.ascontiguousarray(job.ids[:, -keep:]), np.ascontiguousarray(job.mask[:, -keep:])
    return job


# ---------------------------------------------------------------------------- logits processors
def _process(spec: _Spec, seqs, cur, T0, ignore, scores, max_length):
    """transformers' processors, in its order, on scores (N, V) float32 (modified in place).
    seqs[:, :cur]: every row so far (left padding included; `ignore` leading pads per row)."""
    N, V = scores.shape
    if spec.rep_penalty is not None:
        ids = seqs[:, :cur]
        cols = np.arange(cur)[None, :]
        ids = np.where(cols < ignore[:, None], V, ids)
        hit = np.zeros((N, V + 1), dtype=bool)
        hit[np.arange(N)[:, None], ids] = True
        hit = hit[:, :V]
        p = np.float32(spec.rep_penalty)
        pen = np.where(scores < 0, scores * p, scores / p)
        scores[hit] = pen[hit]
    if spec.ngram and cur >= spec.ngram:
        n = spec.ngram
        ids = seqs[:, :cur]
        prefix = ids[:, cur + 1 - n:]  # (N, n - 1)
        win = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (N, cur - n + 1, n)
        match = (win[:, :, :-1] == prefix[:, None, :]).all(axis=-1)
        r, w = np.nonzero(match)
        scores[r, win[r, w, -1]] = -np.inf
    if spec.bad_single:
        scores[:, spec.bad_single] = -np.inf
    for w in spec.bad_multi:
        k = len(w) - 1
        if k <= cur:
            rows = (seqs[:, cur - k:cur] == np.asarray(w[:-1])).all(axis=1)
            scores[rows, w[-1]] = -np.inf
    if spec.eos:
        if cur < spec.min_length or cur - T0 < spec.min_new:
            scores[:, spec.eos] = -np.inf
    if spec.forced_eos is not None and cur == max_length - 1:
        scores[:] = -np.inf
        scores[:, spec.forced_eos] = 0.0
    return scores


def _log_softmax(x):
    x = x.astype(np.float32, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(np.float32)
    z = x - m
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(z.astype(np.float64)), axis=-1, keepdims=True)).astype(np.float32)
    return z - lse


def _topk(x, k):
    """Descending top-k along the last axis; ties keep the lower index first. -> (values, indices).
    Large rows (beam candidates over B x K*V scores): argpartition finds the k-th value, then only
    the entries >= it (all its ties included, in index order) are stably sorted; a full stable
    argsort of 2 x 232k scores per step took 17 ms, most of a Marian beam step."""
    n = x.shape[-1]
    if n < 4096 or k * 64 > n:
        idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, idx, axis=-1), idx
    flat = x.reshape(-1, n)
    part = np.argpartition(flat, n - k, axis=-1)[:, n - k:]
    kth = np.take_along_axis(flat, part, axis=-1).min(axis=-1)
    idx = np.empty((flat.shape[0], k), dtype=np.int64)
    for r in range(flat.shape[0]):
        cand = np.flatnonzero(flat[r] >= kth[r])
        idx[r] = cand[np.argsort(-flat[r, cand], kind="stable")[:k]]
    idx = idx.reshape(x.shape[:-1] + (k,))
    return np.take_along_axis(x, idx, axis=-1), idx


def _gather(t, idx):
    """transformers' _gather_beams: t (B, K, ...) indexed by idx (B, k) on axis 1."""
    return t[np.arange(t.shape[0])[:, None], idx]


# ---------------------------------------------------------------------------- text helpers
class _Text:
    """Continuation text of rows from their generated ids (decoded after a few prompt tokens so
    leading spaces come out as they would inside the whole sequence)."""

    def __init__(self, job: _Job, rows_per_prompt: int):
        self.tok, self.job = job.tok, job
        self.ctx = []
        for b in range(job.B):
            if job.seq2seq:
                c = []
            else:
                real = job.ids[b][job.mask[b].astype(bool)].tolist()
                c = real[-_CTX:]
            self.ctx += [c] * rows_per_prompt
        self._head = {}

    def __call__(self, row, gen_ids) -> str:
        gen = [int(t) for t in gen_ids]
        ctx = self.ctx[row]
        if not ctx:
            return self.tok.decode(gen, skip_special_tokens=True)
        key = tuple(ctx)
        head = self._head.get(key)
        if head is None:
            head = self._head[key] = self.tok.decode(ctx, skip_special_tokens=True)
        full = self.tok.decode(ctx + gen, skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else self.tok.decode(gen, skip_special_tokens=True)


def _cut_at_stop(text, stops):
    """(text before the first stop string, whether one was found)."""
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text, False) if cut < 0 else (text[:cut], True)


class _Deltas:
    """Turns successive continuation texts into deltas that never need to be taken back."""

    def __init__(self, stops):
        self.stops, self.emitted = stops, ""

    def push(self, text, final=False) -> str:
        if not final:
            safe = text.rstrip("\ufffd")
            hold = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, len(safe)), 0, -1):
                    if safe.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = safe[:len(safe) - hold]
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            d = text[len(self.emitted):]
            self.emitted = text
            return d
        return ""


# ---------------------------------------------------------------------------- decoding loops
class _State:
    """Greedy / sampling state, shared with stream()."""

    def __init__(self, job: _Job):
        spec = job.spec
        self.job, self.spec = job, spec
        expand = spec.nrs  # sampling with num_return_sequences: every prompt row repeated
        self.expand = expand
        ids = np.repeat(job.ids, expand, axis=0)
        mask = np.repeat(job.mask, expand, axis=0)
        self.N, self.T0 = ids.shape
        self.max_length = self.T0 + spec.max_new
        self.seqs = np.full((self.N, self.max_length), spec.pad, dtype=np.int64)
        self.seqs[:, :self.T0] = ids
        self.mask = mask
        self.cur = self.T0
        self.ignore = np.zeros(self.N, np.int64) if job.seq2seq else np.argmax(mask != 0, axis=1).astype(np.int64)
        self.unfinished = np.ones(self.N, dtype=bool)
        self.reason = ["length"] * self.N
        self.n_new = np.zeros(self.N, dtype=np.int64)
        self.text = _Text(job, expand) if job.tok is not None else None
        self.cont = [""] * self.N  # continuation texts (kept current only when needed)
        self.src = None
        if job.seq2seq:
            self.src = (np.repeat(job.src_ids, expand, axis=0), np.repeat(job.src_mask, expand, axis=0))


def _run_greedy(job: _Job, st: _State, track_text: bool):
    """Greedy / sampling, one token per row per iteration (a generator: yields after each step)."""
    spec, model = job.spec, job.model
    src_ids, src_mask = st.src if st.src is not None else (None, None)
    session = open_session(model, st.N, st.max_length, src_ids, src_mask, spec.cache)
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    eos = np.asarray(spec.eos if spec.eos else [], dtype=np.int64)
    logits = session.start(st.seqs[:, :st.T0], st.mask)
    while True:
        scores = np.array(logits, dtype=np.float32, copy=True)
        scores = _process(spec, st.seqs, st.cur, st.T0, st.ignore, scores, st.max_length)
        u = rng.random(st.N)
        if spec.sample:
            nxt = np.empty(st.N, dtype=np.int64)
            for r in range(st.N):
                nxt[r] = model.sample(scores[r], spec.temperature, spec.top_k, spec.top_p, u[r]) \
                    if st.unfinished[r] else spec.pad
        else:
            nxt = np.argmax(scores, axis=1).astype(np.int64)
        nxt = np.where(st.unfinished, nxt, spec.pad)
        st.seqs[:, st.cur] = nxt
        st.cur += 1
        live = st.unfinished.copy()
        st.n_new[live] += 1
        if eos.size:
            hit = live & np.isin(nxt, eos)
            for r in np.nonzero(hit)[0]:
                st.reason[r] = "eos"
            st.unfinished &= ~hit
        if spec.stops or track_text:
            for r in np.nonzero(live)[0]:
                n = st.n_new[r] - (1 if st.reason[r] == "eos" else 0)
                st.cont[r] = st.text(r, st.seqs[r, st.T0:st.T0 + n])
                if spec.stops and st.unfinished[r]:
                    cut, found = _cut_at_stop(st.cont[r], spec.stops)
                    if found:
                        st.cont[r] = cut
                        st.reason[r] = "stop"
                        st.unfinished[r] = False
        yield
        if not st.unfinished.any() or st.cur >= st.max_length:
            return
        logits = session.step(st.seqs[:, st.cur - 1])


def _run_beam(job: _Job):
    """transformers 5.x `_beam_search`, step for step, in NumPy (float32 scores)."""
    spec, model = job.spec, job.model
    B, nb = job.B, spec.num_beams
    ids = np.repeat(job.ids, nb, axis=0)
    mask = np.repeat(job.mask, nb, axis=0)
    N, T0 = ids.shape
    max_length = T0 + spec.max_new
    eos = np.asarray(spec.eos if spec.eos else [], dtype=np.int64)
    n_eos = eos.size
    btk = max(2, 1 + n_eos) * nb
    top_mask = np.zeros(btk, dtype=bool)
    top_mask[:nb] = True
    lp, es = spec.length_penalty, spec.early_stopping
    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy)
    fill = (spec.pad if spec.pad else int(eos[0])) if n_eos else -1

    running_sequences = np.full((B, nb, max_length), fill, dtype=np.int64)
    running_sequences[:, :, :T0] = ids.reshape(B, nb, T0)
    sequences = running_sequences.copy()
    running_beam_scores = np.zeros((B, nb), dtype=np.float32)
    running_beam_scores[:, 1:] = NEG
    beam_scores = np.full((B, nb), NEG, dtype=np.float32)
    is_sent_finished = np.zeros((B, nb), dtype=bool)
    heur_unsat = np.ones((B, 1), dtype=bool)
    running_beam_indices = np.full((B, nb, max_length - T0), -1, dtype=np.int64)
    beam_indices = running_beam_indices.copy()
    ignore = np.zeros(N, np.int64) if job.seq2seq else np.argmax(mask != 0, axis=1).astype(np.int64)
    text = _Text(job, nb) if spec.stops else None

    src = (np.repeat(job.src_ids, nb, axis=0), np.repeat(job.src_mask, nb, axis=0)) if job.seq2seq else (None, None)
    session = open_session(model, N, max_length, src[0], src[1], spec.cache)
    logits = session.start(ids, mask)
    cur = T0
    t_first = None
    while True:
        flat_running = running_sequences[:, :, :cur].reshape(N, cur)
        log_probs = _log_softmax(np.asarray(logits, dtype=np.float32))
        log_probs = _process(spec, flat_running, cur, T0, ignore, log_probs, max_length)
        if spec.renormalize:
            log_probs = _log_softmax(log_probs)
        V = log_probs.shape[1]
        acc = (log_probs.reshape(B, nb, V) + running_beam_scores[:, :, None]).reshape(B, nb * V)

        # c. top-K continuations
        topk_log_probs, topk_indices = _topk(acc, btk)
        cur_beam = topk_indices // V
        topk_ids = topk_indices % V
        topk_running_beam_indices = _gather(running_beam_indices, cur_beam).copy()
        topk_running_sequences = _gather(running_sequences, cur_beam).copy()
        topk_running_sequences[:, :, cur] = topk_ids
        topk_running_beam_indices[:, :, cur - T0] = cur_beam + np.arange(B)[:, None] * nb

        # d. which candidates finish (max length, EOS, stop strings)
        hits = np.full((B, btk), cur + 1 >= max_length)
        if n_eos:
            hits |= np.isin(topk_ids, eos)
        if text is not None:
            for b in range(B):
                for k in range(btk):
                    if not hits[b, k]:
                        row = b * nb + int(cur_beam[b, k])
                        t = text(row, topk_running_sequences[b, k, T0:cur + 1])
                        hits[b, k] = _cut_at_stop(t, spec.stops)[1]

        # e. next running beams: the best num_beams candidates that did not finish
        trlp = topk_log_probs + hits.astype(np.float32) * NEG
        _, next_idx = _topk(trlp, nb)
        running_sequences = _gather(topk_running_sequences, next_idx)
        running_beam_scores = _gather(trlp, next_idx)
        running_beam_indices = _gather(topk_running_beam_indices, next_idx)

        # f. finished hypotheses: among the top num_beams candidates, scored with the length penalty
        did = hits & top_mask[None, :]
        tlp = topk_log_probs / np.float32((cur + 1 - T0) ** lp)
        full = np.all(is_sent_finished, axis=-1, keepdims=True) & (es is True)
        tlp = tlp + full.astype(np.float32) * NEG
        tlp = tlp + (~heur_unsat).astype(np.float32) * NEG
        tlp = tlp + (~did).astype(np.float32) * NEG
        merged_sequences = np.concatenate([sequences, topk_running_sequences], axis=1)
        merged_scores = np.concatenate([beam_scores, tlp], axis=1)
        merged_beam_indices = np.concatenate([beam_indices, topk_running_beam_indices], axis=1)
        merged_finished = np.concatenate([is_sent_finished, did], axis=1)
        _, keep = _topk(merged_scores, nb)
        sequences = _gather(merged_sequences, keep)
        beam_scores = _gather(merged_scores, keep)
        beam_indices = _gather(merged_beam_indices, keep)
        is_sent_finished = _gather(merged_finished, keep)

        # g. cache follows the running beams; stopping condition of the whole search
        rows = running_beam_indices[:, :, cur - T0].reshape(N)
        if t_first is None:
            t_first = time.perf_counter()
        cur += 1
        if es == "never" and lp > 0.0:
            best_len = max_length - T0
        else:
            best_len = cur - T0
        best_running = running_beam_scores[:, :1] / np.float32(best_len ** lp)
        worst_finished = np.where(is_sent_finished, np.min(beam_scores, axis=1, keepdims=True), NEG)
        heur_unsat = heur_unsat & np.any(best_running > worst_finished, axis=-1, keepdims=True)
        improvement_possible = bool(np.any(heur_unsat))
        exists_open_beam = not (bool(np.all(is_sent_finished)) and es is True)
        valid_continuations = not bool(np.all(hits))
        if not (improvement_possible and exists_open_beam and valid_continuations):
            break
        session.reorder(rows)
        logits = session.step(running_sequences[:, :, cur - 1].reshape(N))

    nrs = spec.nrs
    sequences = sequences[:, :nrs].reshape(B * nrs, max_length)
    beam_scores = beam_scores[:, :nrs].reshape(B * nrs)
    beam_indices = beam_indices[:, :nrs].reshape(B * nrs, -1)
    n_new = (beam_indices != -1).sum(axis=1)
    out = sequences[:, :T0 + int(n_new.max())]
    return out, beam_scores.astype(np.float32), n_new.astype(np.int64), t_first


# ---------------------------------------------------------------------------- public
def _build_result(job: _Job, seqs, n_new, reasons, scores, conts, t0, t_first, rows_per_prompt):
    spec = job.spec
    T0 = job.ids.shape[1]
    R = seqs.shape[0]
    texts = None
    if job.tok is not None:
        text = _Text(job, rows_per_prompt)
        eos = set(spec.eos or [])
        texts = []
        for r in range(R):
            if conts is not None and conts[r] is not None:
                texts.append(conts[r])
                continue
            gen = seqs[r, T0:T0 + int(n_new[r])].tolist()
            if gen and gen[-1] in eos:
                gen = gen[:-1]
            t, found = _cut_at_stop(text(r, gen), spec.stops)
            if found and reasons[r] != "stop":
                reasons[r] = "stop"
            texts.append(t)
    if job.seq2seq:
        sequences = np.ascontiguousarray(seqs[:, 1:])
    else:
        sequences = seqs
    if job.kind == "ids":
        output = sequences
    else:
        if job.seq2seq:
            full = texts
        else:
            full = [job.prompts[r // rows_per_prompt] + texts[r] for r in range(R)]
        if rows_per_prompt > 1:
            full = [full[b * rows_per_prompt:(b + 1) * rows_per_prompt] for b in range(job.B)]
        output = full[0] if job.kind == "text" else full
    t_end = time.perf_counter()
    res = GenerationResult(output=output, sequences=sequences, texts=texts, new_tokens=np.asarray(n_new),
                           scores=scores, finish_reasons=list(reasons),
                           prompt_tokens=int(job.src_ids.shape[1] if job.seq2seq else T0),
                           time_to_first_token=(t_first or t_end) - t0, total_time=t_end - t0)
    if spec.return_dict:
        return res
    if spec.return_scores:
        return output, scores
    return output


def _split_options(options):
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"{unknown[0]}: unknown generate option (expected some of: {', '.join(OPTIONS)})")


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
    _split_options(options)
    spec = _resolve(model, max_new_tokens, options)
    job = _prepare(model, prompt, spec, options.get("attention_mask"))
    if spec.return_scores and spec.num_beams == 1:
        raise InputError("return_scores: sequence scores come from beam search; pass num_beams > 1 "
                         "(or return_dict=True for the other details)")
    if spec.on_text is not None:
        _check_streamable(job, "on_text")
    if spec.num_beams > 1:
        seqs, scores, n_new, t_first = _run_beam(job)
        reasons = []
        eos = set(spec.eos or [])
        T0 = job.ids.shape[1]
        for r in range(seqs.shape[0]):
            n = int(n_new[r])
            reasons.append("eos" if n and int(seqs[r, T0 + n - 1]) in eos else
                           "length" if n >= spec.max_new else "stop")
        return _build_result(job, seqs, n_new, reasons, scores, None, t0, t_first, spec.nrs)
    st = _State(job)
    deltas = _Deltas(spec.stops) if spec.on_text is not None else None
    t_first = None
    for _ in _run_greedy(job, st, track_text=deltas is not None):
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
    return _build_result(job, seqs, st.n_new, st.reason, None, conts, t0, t_first, st.expand)


def _check_streamable(job, name):
    if job.B != 1 or job.spec.num_beams != 1 or job.spec.nrs != 1:
        raise InputError(f"{name}: streaming needs one prompt, num_beams = 1 and num_return_sequences = 1")


def stream(model, prompt, max_new_tokens=None, **options):
    """Yield the continuation's text deltas as tokens are produced (batch 1, no beams); the same
    options as generate(). ''.join(deltas) equals the continuation generate() returns (decoder
    models: generate(text) == text + ''.join(stream(text)))."""
    _split_options(options)
    for bad in ("on_text", "return_scores", "return_dict"):
        if options.get(bad):
            raise InputError(f"{bad}: not an option of stream()")
    spec = _resolve(model, max_new_tokens, options)
    job = _prepare(model, prompt, spec, options.get("attention_mask"))
    if job.tok is None:
        job.tok = model.tokenizer
    _check_streamable(job, "stream")
    st = _State(job)
    deltas = _Deltas(spec.stops)
    for _ in _run_greedy(job, st, track_text=True):
        d = deltas.push(st.cont[0], final=not st.unfinished[0])
        if d:
            yield d
    d = deltas.push(st.cont[0], final=True)
    if d:
        yield d
