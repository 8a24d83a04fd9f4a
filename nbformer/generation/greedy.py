"""Greedy decoding and sampling: one token per row per step over a decoding session.

Greedy unless sampling is asked for (options.resolve decides). Sampling applies temperature ->
top-k -> top-p (transformers' order) and draws with one uniform number per row per step from
NumPy's PCG64 stream seeded by `seed`: same seed and inputs, same tokens. Rows stop at EOS, at a
stop string (the continuation text is searched, not the prompt) or after max_new_tokens.
num_return_sequences > 1 (sampling only) repeats every prompt row that many times.

choose_next() is the single place a token is chosen from a step's logits.
"""
from __future__ import annotations

import numpy as np

from .inputs import Job
from .options import Spec
from .processors import apply_processors
from .text import ContinuationText, cut_at_stop


class GreedyState:
    """Greedy / sampling state, shared with stream()."""

    def __init__(self, job: Job):
        spec = job.spec
        self.job, self.spec = job, spec
        expand = spec.nrs  # sampling with num_return_sequences: every prompt row repeated
        self.expand = expand
        ids = np.repeat(job.ids, expand, axis=0)
        mask = np.repeat(job.mask, expand, axis=0)
        self.N, self.T0 = ids.shape
        self.max_length = self.T0 + spec.max_new
        self.seqs = np.full((self.N, self.max_length), spec.pad, dtype=np.int64)  # prompt + tokens so far
        self.seqs[:, :self.T0] = ids
        self.mask = mask  # (N, T0) prompt mask
        self.cur = self.T0  # columns of seqs filled
        # leading pads per row (repetition penalty skips them); encoder-decoders have none
        self.ignore = np.zeros(self.N, np.int64) if job.seq2seq else np.argmax(mask != 0, axis=1).astype(np.int64)
        self.unfinished = np.ones(self.N, dtype=bool)
        self.reason = ["length"] * self.N
        self.n_new = np.zeros(self.N, dtype=np.int64)
        self.text = ContinuationText(job, expand) if job.tok is not None else None
        self.cont = [""] * self.N  # continuation texts (kept current only when needed)


def choose_next(model, spec: Spec, scores, u, live=None) -> np.ndarray:
    """The next token of every row -> (N,) int64 ids.

    scores: (N, V) the step's logits after the logits processors; u: (N,) uniforms in [0, 1), one
    per row (drawn every step, greedy too, so the random stream does not depend on the mode);
    live: (N,) bool, rows still generating (None: all); finished rows get spec.pad and are not
    sampled. Greedy takes the argmax (lowest id on ties); sampling calls model.sample per row
    (temperature -> top-k -> top-p, then u picks the token).

    This is where a device-side sampler plugs in: when spec.needs_host_logits is False the scores
    are the session's logits untouched, so they may stay on the device and only the (N,) ids come
    back to the host."""
    N = scores.shape[0]
    live = np.ones(N, dtype=bool) if live is None else live
    if not isinstance(scores, np.ndarray):  # logits left on the device: choose there, copy back N ids
        t = spec.temperature if spec.sample else 0.0
        nxt = model.sample_rows(scores, t, spec.top_k, spec.top_p, u)
    elif spec.sample:
        nxt = np.empty(N, dtype=np.int64)
        for r in range(N):
            nxt[r] = model.sample(scores[r], spec.temperature, spec.top_k, spec.top_p, u[r]) if live[r] else spec.pad
    else:
        nxt = np.argmax(scores, axis=1).astype(np.int64)
    return np.where(live, nxt, spec.pad)


def run_greedy(job: Job, st: GreedyState, session, track_text: bool):
    """Greedy / sampling, one token per row per iteration (a generator: yields after each step).
    session: a fresh decoding session of st.N rows and st.max_length positions (not started);
    track_text: keep st.cont current for every live row (streaming), not only for stop strings."""
    spec, model = job.spec, job.model
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    eos = np.asarray(spec.eos if spec.eos else [], dtype=np.int64)
    # on a GPU with no host-side processor the logits stay on the device and only the chosen ids
    # cross the bus; the CPU's logits are host arrays already
    dev = getattr(model, "dev", None)
    kw = {"on_device": True} if dev is not None and dev.kind != "cpu" and not spec.needs_host_logits else {}
    logits = session.start(st.seqs[:, :st.T0], st.mask, **kw)  # (N, V) of the last prompt column
    while True:
        if spec.needs_host_logits:  # processors edit a host copy in place
            scores = apply_processors(spec, st.seqs, st.cur, st.T0, st.ignore,
                                      np.array(logits, dtype=np.float32, copy=True), st.max_length)
        else:  # no processor active: choose_next is the only reader
            scores = logits
        u = rng.random(st.N)
        nxt = choose_next(model, spec, scores, u, st.unfinished)
        st.seqs[:, st.cur] = nxt
        st.cur += 1
        live = st.unfinished.copy()  # rows that produced a token this step
        st.n_new[live] += 1
        if eos.size:
            hit = live & np.isin(nxt, eos)
            for r in np.nonzero(hit)[0]:
                st.reason[r] = "eos"
            st.unfinished &= ~hit
        if spec.stops or track_text:
            for r in np.nonzero(live)[0]:
                n = st.n_new[r] - (1 if st.reason[r] == "eos" else 0)  # the EOS is not text
                st.cont[r] = st.text(r, st.seqs[r, st.T0:st.T0 + n])
                if spec.stops and st.unfinished[r]:
                    cut, found = cut_at_stop(st.cont[r], spec.stops)
                    if found:
                        st.cont[r] = cut
                        st.reason[r] = "stop"
                        st.unfinished[r] = False
        yield
        if not st.unfinished.any() or st.cur >= st.max_length:
            return
        logits = session.step(st.seqs[:, st.cur - 1], **kw)
