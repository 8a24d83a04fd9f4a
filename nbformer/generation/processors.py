"""Logits processors, in transformers' order, and the log-softmax / top-k helpers.

repetition_penalty (over every real token of the row so far, prompt included for decoders, the
start token for encoder-decoders; left padding ignored), no_repeat_ngram_size, bad_words_ids
(single tokens and sequences; an [eos] entry is ignored), min_length / min_new_tokens (EOS banned
before), forced_eos_token_id (EOS forced at the last position). Beam search applies them to
log-probabilities, greedy / sampling to logits, like transformers. Which of them are active is
summed up by Spec.needs_host_logits.
"""
from __future__ import annotations

import numpy as np

from .options import Spec


def apply_processors(spec: Spec, seqs, cur, T0, ignore, scores, max_length):
    """transformers' processors, in its order, on scores (N, V) float32 (modified in place).
    seqs[:, :cur]: every row so far (left padding included; `ignore` leading pads per row)."""
    N, V = scores.shape
    if spec.rep_penalty is not None:
        ids = seqs[:, :cur]
        cols = np.arange(cur)[None, :]
        ids = np.where(cols < ignore[:, None], V, ids)  # left padding -> column V, dropped below
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


def log_softmax(x):
    """log_softmax over the last axis, float32 out (the sum of exponentials in float64; a row that
    is all -inf stays -inf instead of becoming NaN)."""
    x = x.astype(np.float32, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(np.float32)
    z = x - m
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(z.astype(np.float64)), axis=-1, keepdims=True)).astype(np.float32)
    return z - lse


def topk(x, k):
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
