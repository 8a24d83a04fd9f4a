"""Continuation text: decoding generated ids to text, stop strings, and the deltas streaming emits.

The whole continuation is decoded at each step (after a few prompt tokens, so word-boundary spaces
come out as inside the whole sequence) and the new suffix yielded, holding back a trailing U+FFFD
(a character split across tokens) and any tail that could be the start of a stop string, so the
deltas join to exactly the continuation generate() returns. A stop string cuts the text right
before it.
"""
from __future__ import annotations

from .inputs import Job

CONTEXT_TOKENS = 8  # prompt tokens decoded in front of the continuation so word-boundary spaces come out right


class ContinuationText:
    """Continuation text of rows from their generated ids (decoded after a few prompt tokens so
    leading spaces come out as they would inside the whole sequence)."""

    def __init__(self, job: Job, rows_per_prompt: int):
        self.tok, self.job = job.tok, job
        self.ctx = []  # per row: the last CONTEXT_TOKENS real prompt ids (none for encoder-decoders)
        for b in range(job.B):
            if job.seq2seq:
                c = []
            else:
                real = job.ids[b][job.mask[b].astype(bool)].tolist()
                c = real[-CONTEXT_TOKENS:]
            self.ctx += [c] * rows_per_prompt
        self._head = {}  # context ids -> their decoded text, cut off the front of each decode

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


def cut_at_stop(text, stops):
    """(text before the first stop string, whether one was found)."""
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text, False) if cut < 0 else (text[:cut], True)


class TextDeltas:
    """Turns successive continuation texts into deltas that never need to be taken back."""

    def __init__(self, stops):
        self.stops, self.emitted = stops, ""

    def push(self, text, final=False) -> str:
        if not final:
            safe = text.rstrip("\ufffd")
            hold = 0  # length of the longest tail that starts some stop string
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
