"""Autoregressive generation for decoder models (recomputes the prefix each step; no KV cache yet).

Sampling follows transformers' order: temperature -> top-k -> top-p, then a draw from a
NumPy PCG64 stream seeded by `seed`, one uniform number per row per step, so the same seed,
prompt and options give the same tokens.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


def check_options(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def generate(model, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_at_eos=True):
    cfg = model.config
    if cfg.arch != "decoder" or not cfg.lm_head:
        raise InputError(f"generate: model is a {cfg.arch} without a language-model head; "
                         f"only decoder models generate here")
    check_options(max_new_tokens, temperature, top_k, top_p)
    as_text = isinstance(prompt, str)
    if as_text:
        tok = model.tokenizer
        ids = np.asarray([tok.encode(prompt, add_special_tokens=False)], dtype=np.int64)
        if ids.shape[1] == 0:
            if cfg.bos_token_id is None:
                raise InputError("prompt: empty text and the model has no bos_token_id to start from")
            ids = np.asarray([[cfg.bos_token_id]], dtype=np.int64)
    else:
        ids = model.prepare_inputs(prompt)["input_ids"]
    B, T0 = ids.shape
    if T0 + max_new_tokens > cfg.max_positions:
        raise InputError(f"prompt of {T0} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{cfg.max_positions} positions")
    rng = np.random.Generator(np.random.PCG64(seed))
    eos = cfg.eos_token_id if stop_at_eos else None
    done = np.zeros(B, dtype=bool)
    seqs = ids
    for _ in range(max_new_tokens):
        T = seqs.shape[1]
        inputs = model.prepare_inputs(seqs)
        logits = model.last_logits(inputs, np.full(B, T - 1))
        u = rng.random(B)
        nxt = np.empty(B, dtype=np.int64)
        for b in range(B):
            if done[b]:
                nxt[b] = eos
            else:
                nxt[b] = model.sample(logits[b], temperature, top_k, top_p, u[b])
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
        if eos is not None:
            done |= nxt == eos
            if done.all():
                break
    if as_text:
        return model.tokenizer.decode(seqs[0].tolist(), skip_special_tokens=True)
    return seqs
