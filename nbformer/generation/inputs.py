"""Input preparation: a prompt (text, list of texts or ids) + Spec -> Job, the padded id arrays the
decoding loops start from.

Decoder-only prompts are tokenized without special tokens and LEFT-padded with the pad token
(positions then count real tokens only, like transformers with an attention mask); an ids prompt
must already be left-padded. Encoder-decoder prompts are the SOURCE: tokenized with special tokens
and right-padded; the decoder starts from decoder_start_token_id. The model's positions bound
prompt + max_new_tokens: an InputError unless truncate=True, which keeps the end of a decoder
prompt (the start of an encoder-decoder source).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .options import Spec, is_int


@dataclass
class Job:
    """One generate() call's prepared inputs."""
    model: object
    spec: Spec
    seq2seq: bool
    kind: str  # "text" | "texts" | "ids"
    prompts: list | None  # the prompt strings (text kinds)
    ids: np.ndarray  # decoder prompt (B, T0) left-padded (seq2seq: the start column)
    mask: np.ndarray  # (B, T0) uint8, 0 = padding
    src_ids: np.ndarray | None = None  # encoder-decoder source (B, S), right-padded
    src_mask: np.ndarray | None = None  # (B, S) uint8
    tok: object = None  # the tokenizer (None: ids prompt of a model without one)

    @property
    def B(self):
        return self.ids.shape[0]

    def repeated_source(self, rows_per_prompt: int):
        """(source ids, source mask) with every prompt's row repeated rows_per_prompt times (beams or
        samples: row b * rows_per_prompt + i), or (None, None) for a decoder-only model."""
        if not self.seq2seq:
            return None, None
        return (np.repeat(self.src_ids, rows_per_prompt, axis=0), np.repeat(self.src_mask, rows_per_prompt, axis=0))


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



def prompt_ids(tok, text: str, decoder_only: bool) -> list:
    """Token ids of a text prompt. A decoder-only model gets what its tokenizer puts before the text
    (the BOS of Llama / sentencepiece-style tokenizers, as transformers' tokenizer(text) and llama.cpp
    give it) but never what it appends after (an EOS would end the text the model is to continue);
    GPT-2-style tokenizers add nothing. Encoder-decoder prompts are the plain text's ids."""
    plain = tok.encode(text, add_special_tokens=False)
    if not decoder_only or not plain:
        return plain
    full = tok.encode(text, add_special_tokens=True)
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k] + plain
    return plain

def prepare(model, prompt, spec: Spec, attention_mask) -> Job:
    """Tokenize / validate / pad / truncate the prompt; also turns a generation-config max_length
    into spec.max_new now that the prompt length is known."""
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
        job = Job(model, spec, True, kind, texts, np.full((B, 1), int(start), dtype=np.int64),
                  np.ones((B, 1), dtype=np.uint8), np.ascontiguousarray(s_ids), np.ascontiguousarray(s_mask), tok)
    else:
        if kind == "ids":
            if spec.truncate and limit is not None and is_int(spec.max_new) and spec.max_new < limit:
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
                r = prompt_ids(tok, t, cfg.arch == "decoder")
                if not r:
                    if cfg.bos_token_id is None:
                        where = "prompt" if kind == "text" else f"prompt[{i}]"
                        raise InputError(f"{where}: empty text and the model has no bos_token_id to start from")
                    r = [cfg.bos_token_id]
                rows.append(r)
            if spec.truncate and limit is not None and is_int(spec.max_new) and spec.max_new < limit:
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
        job = Job(model, spec, False, kind, texts, np.ascontiguousarray(ids), np.ascontiguousarray(mask), tok=tok)

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
