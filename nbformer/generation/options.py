"""Option resolution: generate()'s keyword options + the model's generation config -> one Spec.

An option left as None comes from model.config.extra["generation"] (transformers key names), then
from the model config, then the built-in defaults (greedy, 1 beam, length_penalty 1.0,
early_stopping False, max_new_tokens 32 when neither max_new_tokens nor max_length is known).
Every option is validated here, so the decoding loops can trust the Spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

# every keyword generate() accepts besides prompt and max_new_tokens
OPTIONS = ("attention_mask", "temperature", "do_sample", "top_k", "top_p", "repetition_penalty",
           "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
           "min_new_tokens", "min_length", "bad_words_ids", "forced_eos_token_id", "eos_token_id",
           "pad_token_id", "renormalize_logits", "stop", "stop_at_eos", "seed", "truncate", "cache", "on_text",
           "return_scores", "return_dict")


def is_int(x):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_num(x):
    """A real number (Python or NumPy), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_option_names(options):
    """InputError for the first keyword that is not one of OPTIONS."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"{unknown[0]}: unknown generate option (expected some of: {', '.join(OPTIONS)})")


def check_options(max_new_tokens, temperature, top_k, top_p):
    """The sampling options' checks (kept for callers of the old API)."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if temperature is not None and (not is_num(temperature) or not np.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise InputError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not is_num(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def _token_list(value, name, V, allow_none=True):
    """None | id | list of ids -> list of ids (validated) or None."""
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name}: expected a token id")
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not vals or not all(is_int(v) and 0 <= v < V for v in vals):
        raise InputError(f"{name}: expected a token id or a list of ids in [0, {V}), got {value!r}")
    return [int(v) for v in vals]


@dataclass
class Spec:
    """The resolved request."""
    max_new: int | tuple  # ("max_length", n) until inputs.prepare knows the prompt length, then an int
    sample: bool
    temperature: float  # 0.0 when greedy
    top_k: int | None
    top_p: float | None
    rep_penalty: float | None  # None when off (also for a penalty of 1.0)
    ngram: int  # no_repeat_ngram_size, 0 = off
    num_beams: int
    length_penalty: float
    early_stopping: object  # True | False | "never"
    nrs: int  # num_return_sequences
    min_new: int
    min_length: int
    bad_single: list  # banned single tokens
    bad_multi: list  # banned token sequences (length >= 2): the last token is banned after the others
    forced_eos: list | None
    eos: list | None  # None when stop_at_eos=False
    pad: int
    renormalize: bool
    stops: list  # stop strings
    seed: int
    truncate: bool
    cache: bool
    on_text: object
    return_scores: bool
    return_dict: bool

    @property
    def needs_host_logits(self) -> bool:
        """Whether each step's (N, V) logits must be on the host as a NumPy array: a logits processor
        (repetition penalty, no-repeat n-gram, bad words, min length / forced EOS) reads or edits them,
        or beam search ranks them. When False, only the token choice (greedy.choose_next) reads them,
        so a device-side sampler may keep them on the device. The one place this is decided."""
        min_length_active = bool(self.eos) and (self.min_length > 0 or self.min_new > 0)
        return (self.rep_penalty is not None or self.ngram > 0 or bool(self.bad_single) or bool(self.bad_multi)
                or min_length_active or self.forced_eos is not None or self.num_beams > 1)


def resolve(model, max_new_tokens, opts) -> Spec:
    """generate()'s options (a dict, names already checked) -> Spec; InputError for a bad value."""
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
    if temperature is not None and (not is_num(temperature) or not np.isfinite(temperature) or temperature < 0):
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
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise InputError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not is_num(top_p) or not np.isfinite(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")

    rp = pick("repetition_penalty")
    if rp is not None and (not is_num(rp) or not np.isfinite(rp) or rp <= 0):
        raise InputError(f"repetition_penalty: expected a number > 0 (1.0 = off), got {rp!r}")
    ngram = pick("no_repeat_ngram_size") or 0
    if not is_int(ngram) or ngram < 0:
        raise InputError(f"no_repeat_ngram_size: expected an integer >= 0 (0 = off), got {ngram!r}")

    nb = opts.get("num_beams")
    if nb is None:
        nb = 1 if do_sample else gen.get("num_beams", 1)  # a generation-config num_beams does not apply to sampling
    if not is_int(nb) or nb < 1:
        raise InputError(f"num_beams: expected an integer >= 1, got {nb!r}")
    nb = int(nb)
    if nb > 1 and do_sample:
        raise InputError(f"num_beams: beam search ({nb} beams) cannot be combined with sampling "
                         f"(temperature {temperature}); pass temperature=0 or num_beams=1")
    lp = pick("length_penalty")
    lp = 1.0 if lp is None else lp
    if not is_num(lp) or not np.isfinite(lp):
        raise InputError(f"length_penalty: expected a finite number, got {lp!r}")
    es = pick("early_stopping")
    es = False if es is None else es
    if isinstance(es, np.bool_):
        es = bool(es)
    if not (isinstance(es, bool) or es == "never"):
        raise InputError(f"early_stopping: expected True, False or 'never', got {es!r}")
    nrs = opts.get("num_return_sequences")
    nrs = 1 if nrs is None else nrs
    if not is_int(nrs) or nrs < 1:
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
    if not is_int(pad) or not 0 <= pad < V:
        raise InputError(f"pad_token_id: expected a token id in [0, {V}), got {pad!r}")

    min_new = opts.get("min_new_tokens")
    min_new = gen.get("min_new_tokens", 0) if min_new is None else min_new
    if not is_int(min_new or 0) or (min_new or 0) < 0:
        raise InputError(f"min_new_tokens: expected an integer >= 0, got {min_new!r}")
    min_len = pick("min_length") or 0
    if not is_int(min_len) or min_len < 0:
        raise InputError(f"min_length: expected an integer >= 0, got {min_len!r}")

    bad = pick("bad_words_ids")
    bad_single, bad_multi = [], []
    if bad is not None:
        if (not isinstance(bad, (list, tuple)) or not bad or
                not all(isinstance(w, (list, tuple)) and w and all(is_int(t) and 0 <= t < V for t in w) for w in bad)):
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
    if not is_int(seed) or seed < 0:
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
    if not isinstance(max_new_tokens, tuple) and (not is_int(max_new_tokens) or max_new_tokens < 1):
        raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    return Spec(max_new=max_new_tokens, sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p,
                rep_penalty=None if rp is None or rp == 1.0 else float(rp), ngram=int(ngram), num_beams=nb,
                length_penalty=lp, early_stopping=es, nrs=int(nrs), min_new=int(min_new or 0),
                min_length=int(min_len), bad_single=bad_single, bad_multi=bad_multi, forced_eos=forced, eos=eos,
                pad=int(pad), renormalize=bool(renorm), stops=list(stops), seed=int(seed),
                truncate=bool(opts.get("truncate") or False),
                cache=True if opts.get("cache") is None else bool(opts.get("cache")), on_text=on_text,
                return_scores=bool(opts.get("return_scores") or False),
                return_dict=bool(opts.get("return_dict") or False))
