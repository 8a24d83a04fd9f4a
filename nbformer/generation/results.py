"""Results: GenerationResult and turning the decoding loops' ids into what generate() returns.

decoder-only ids prompt -> ids (B, T + n): prompt + continuation, rows that finished early padded
on the right with pad_token_id; text prompts -> prompt + continuation text. Encoder-decoders ->
the generated target only: ids (B, n) without the start token, or text (special tokens skipped).
num_return_sequences > 1: ids get B * n rows (row b * n + i); a str prompt gives a list of n strs;
a list of prompts gives a list of lists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .inputs import Job
from .text import ContinuationText, cut_at_stop


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


def build_result(job: Job, seqs, n_new, reasons, scores, conts, t0, t_first, rows_per_prompt):
    """generate()'s return value: the output alone, (output, scores) with return_scores, or a
    GenerationResult with return_dict.

    seqs (R, T0 + n) prompt + generated ids; n_new (R,) tokens per row (EOS included); reasons: per
    row finish reason (a stop string found in the final text turns it into "stop"); scores (R,) or
    None; conts: per row continuation text already known (streaming) or None; t0 / t_first:
    perf_counter at the call and at the first token; rows_per_prompt: beams or samples returned per
    prompt."""
    spec = job.spec
    T0 = job.ids.shape[1]
    R = seqs.shape[0]
    texts = None
    if job.tok is not None:
        text = ContinuationText(job, rows_per_prompt)
        eos = set(spec.eos or [])
        texts = []
        for r in range(R):
            if conts is not None and conts[r] is not None:
                texts.append(conts[r])
                continue
            gen = seqs[r, T0:T0 + int(n_new[r])].tolist()
            if gen and gen[-1] in eos:
                gen = gen[:-1]
            t, found = cut_at_stop(text(r, gen), spec.stops)
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
