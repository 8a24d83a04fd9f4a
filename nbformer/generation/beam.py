"""Beam search: a replica of transformers 5.x `_beam_search`, step for step, in NumPy.

The top max(2, 1 + n_eos) * num_beams candidates of log_softmax + beam score, finished hypotheses
scored sum(logprobs) / (generated tokens) ** length_penalty (the prompt does not count, the EOS
does), early_stopping True / False (transformers' heuristic) / "never", n-best with scores. The
logits processors act on log-probabilities here (renormalize_logits: log_softmax again after
them). Beam sampling is not supported (options.resolve refuses it).
"""
from __future__ import annotations

import time

import numpy as np

from .inputs import Job
from .processors import apply_processors, log_softmax, topk
from .text import ContinuationText, cut_at_stop

NEG = np.float32(-1.0e9)  # transformers' "very large negative" beam-score mask


def _gather(t, idx):
    """transformers' _gather_beams: t (B, K, ...) indexed by idx (B, k) on axis 1."""
    return t[np.arange(t.shape[0])[:, None], idx]


def run_beam(job: Job, session):
    """transformers 5.x `_beam_search`, step for step, in NumPy (float32 scores).
    session: a fresh decoding session of B * num_beams rows and T0 + max_new positions (not started).
    -> (sequences (B * nrs, T0 + n) right-padded, scores (B * nrs,) float32, new tokens (B * nrs,)
    int64, time of the first token), the nrs best hypotheses of prompt b in rows b * nrs + i."""
    spec = job.spec
    B, nb = job.B, spec.num_beams
    ids = np.repeat(job.ids, nb, axis=0)
    mask = np.repeat(job.mask, nb, axis=0)
    N, T0 = ids.shape
    max_length = T0 + spec.max_new
    eos = np.asarray(spec.eos if spec.eos else [], dtype=np.int64)
    n_eos = eos.size
    btk = max(2, 1 + n_eos) * nb  # candidates kept per prompt each step
    top_mask = np.zeros(btk, dtype=bool)  # the first num_beams candidates may become finished hypotheses
    top_mask[:nb] = True
    lp, es = spec.length_penalty, spec.early_stopping
    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy)
    fill = (spec.pad if spec.pad else int(eos[0])) if n_eos else -1

    running_sequences = np.full((B, nb, max_length), fill, dtype=np.int64)
    running_sequences[:, :, :T0] = ids.reshape(B, nb, T0)
    sequences = running_sequences.copy()  # (B, nb, max_length) finished hypotheses
    running_beam_scores = np.zeros((B, nb), dtype=np.float32)
    running_beam_scores[:, 1:] = NEG  # identical beams at the start: only the first one expands
    beam_scores = np.full((B, nb), NEG, dtype=np.float32)
    is_sent_finished = np.zeros((B, nb), dtype=bool)
    heur_unsat = np.ones((B, 1), dtype=bool)
    running_beam_indices = np.full((B, nb, max_length - T0), -1, dtype=np.int64)
    beam_indices = running_beam_indices.copy()
    ignore = np.zeros(N, np.int64) if job.seq2seq else np.argmax(mask != 0, axis=1).astype(np.int64)
    text = ContinuationText(job, nb) if spec.stops else None

    logits = session.start(ids, mask)
    cur = T0
    t_first = None
    while True:
        flat_running = running_sequences[:, :, :cur].reshape(N, cur)
        log_probs = log_softmax(np.asarray(logits, dtype=np.float32))  # (N, V)
        log_probs = apply_processors(spec, flat_running, cur, T0, ignore, log_probs, max_length)
        if spec.renormalize:
            log_probs = log_softmax(log_probs)
        V = log_probs.shape[1]
        acc = (log_probs.reshape(B, nb, V) + running_beam_scores[:, :, None]).reshape(B, nb * V)

        # c. top-K continuations
        topk_log_probs, topk_indices = topk(acc, btk)  # (B, btk)
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
                        hits[b, k] = cut_at_stop(t, spec.stops)[1]

        # e. next running beams: the best num_beams candidates that did not finish
        trlp = topk_log_probs + hits.astype(np.float32) * NEG
        _, next_idx = topk(trlp, nb)
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
        _, keep = topk(merged_scores, nb)
        sequences = _gather(merged_sequences, keep)
        beam_scores = _gather(merged_scores, keep)
        beam_indices = _gather(merged_beam_indices, keep)
        is_sent_finished = _gather(merged_finished, keep)

        # g. cache follows the running beams; stopping condition of the whole search
        rows = running_beam_indices[:, :, cur - T0].reshape(N)  # session row each running beam came from
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


def beam_finish_reasons(job: Job, seqs, n_new) -> list:
    """Per returned hypothesis: "eos" (it ends with an EOS), "length" (max_new tokens) or "stop"
    (a stop string ended it)."""
    spec = job.spec
    eos = set(spec.eos or [])
    T0 = job.ids.shape[1]
    reasons = []
    for r in range(seqs.shape[0]):
        n = int(n_new[r])
        reasons.append("eos" if n and int(seqs[r, T0 + n - 1]) in eos else
                       "length" if n >= spec.max_new else "stop")
    return reasons
