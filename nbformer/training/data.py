"""Token streams for language-model training.

Batches are a pure function of (seed, step): the windows of step s come from
numpy's PCG64 seeded with (seed, s). Resuming at step s therefore needs no saved RNG state
and replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import InputError


def read_text(path) -> str:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: cannot read training text ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise InputError(f"{p}: the training text is empty")
    return text


class TokenData:
    """train/eval token streams (int32) with deterministic batching."""

    def __init__(self, ids: np.ndarray, eval_fraction: float = 0.05, where: str = "training text"):
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.size < 4:
            raise InputError(f"{where}: only {ids.size} tokens; need more text to train on")
        n_eval = int(round(ids.size * eval_fraction)) if eval_fraction > 0 else 0
        self.train = ids[: ids.size - n_eval]
        self.eval = ids[ids.size - n_eval:]
        self.where = where
        self.fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()[:16]

    def check(self, batch: int, seq: int):
        windows = self.train.size - seq
        if windows < 1:
            raise InputError(f"{self.where}: {self.train.size} training tokens are too few for --seq-len {seq} "
                             f"(need at least {seq + 1})")
        if windows < batch:
            raise InputError(f"{self.where}: --batch {batch} is larger than the data: only {windows} distinct "
                             f"windows of {seq + 1} tokens")

    def batch(self, seed: int, step: int, B: int, T: int):
        """-> inputs (B, T) int64 and next-token targets (B, T) int64 for this step."""
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        starts = rng.integers(0, self.train.size - T, size=B)
        idx = starts[:, None] + np.arange(T + 1)[None, :]
        w = self.train[idx].astype(np.int64)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def eval_windows(self, T: int, max_windows: int):
        """Non-overlapping windows of the eval split (fixed, so eval losses are comparable)."""
        src = self.eval if self.eval.size > T else self.train[-(T + 1) * max(1, max_windows):]
        n = min(max_windows, (src.size - 1) // T)
        if n < 1:
            return None
        w = np.stack([src[i * T: i * T + T + 1] for i in range(n)]).astype(np.int64)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) of the eval split under the train split's unigram distribution,
        add-one smoothed: the baseline a language model must beat."""
        V = int(max(self.train.max(), self.eval.max() if self.eval.size else 0)) + 1
        counts = np.bincount(self.train, minlength=V).astype(np.float64) + 1.0
        p = counts / counts.sum()
        target = self.eval if self.eval.size else self.train
        return float(-np.mean(np.log(p[target])))
