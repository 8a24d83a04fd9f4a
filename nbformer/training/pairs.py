"""Sentence pairs (source<TAB>target) for encoder-decoder training.

Each line of a UTF-8 TSV file is one pair. Sources are encoded with the tokenizer's special
tokens (an appended </s>, as Marian does), targets without, then teacher-forced the way
transformers' MarianMTModel is: decoder input = [start] + target, labels = target + [</s>],
padding ignored by the loss (-100). Batches are a pure function of (seed, step), like TokenData.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .data import read_text

IGNORE = -100


def read_pairs(path) -> list:
    """-> [(source, target), ...]; any malformed line is an InputError naming file:line."""
    text = read_text(path)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline ending the file
    pairs = []
    for n, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if "\t" not in line:
            what = "an empty line" if not line.strip() else "no TAB"
            raise InputError(f"{path}:{n}: {what}; expected 'source<TAB>target'")
        src, tgt = line.split("\t", 1)
        if "\t" in tgt:
            raise InputError(f"{path}:{n}: more than one TAB; expected 'source<TAB>target'")
        if not src.strip():
            raise InputError(f"{path}:{n}: empty source")
        if not tgt.strip():
            raise InputError(f"{path}:{n}: empty target")
        pairs.append((src, tgt))
    return pairs


class PairData:
    """Tokenized pairs with fixed padded shapes: sources (S columns), decoder inputs / labels (T).

    pairs: [(src, tgt)]; eval_pairs: a held-out list, or None to hold out eval_fraction of pairs.
    """
    seq2seq = True

    def __init__(self, pairs, tok, start_id: int, eos_id: int, pad_id: int, max_positions: int,
                 eval_pairs=None, eval_fraction: float = 0.05, where: str = "training pairs",
                 eval_where: str | None = None):
        if len(pairs) < 2:
            raise InputError(f"{where}: only {len(pairs)} pair(s); need more to train on")
        self.where, self.start, self.eos, self.pad = where, int(start_id), int(eos_id), int(pad_id)
        if eval_pairs is None:
            n_eval = int(round(len(pairs) * eval_fraction)) if eval_fraction > 0 else 0
            n_eval = min(n_eval, len(pairs) - 1)
            pairs, eval_pairs = pairs[:len(pairs) - n_eval], pairs[len(pairs) - n_eval:]
            eval_where = where
        self.train_text = pairs
        self.eval_text = eval_pairs
        src, tgt = self._encode(tok, pairs, where, max_positions)
        esrc, etgt = self._encode(tok, eval_pairs, eval_where or where, max_positions) if eval_pairs else ([], [])
        self.S = max(len(r) for r in src + esrc)
        self.T = max(len(r) for r in tgt + etgt) + 1  # + the start token in front / the EOS label behind
        self.train = self._pack(src, tgt)
        self.eval = self._pack(esrc, etgt) if esrc else None
        h = hashlib.sha256()
        for a in self.train:
            h.update(a.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @staticmethod
    def _encode(tok, pairs, where, max_positions):
        src = [ids for ids, _ in tok.encode_batch([s for s, _ in pairs], add_special_tokens=True)]
        tgt = [ids for ids, _ in tok.encode_batch([t for _, t in pairs], add_special_tokens=False)]
        for i, (a, b) in enumerate(zip(src, tgt)):
            for side, ids in (("source", a), ("target", b)):
                n = len(ids) + (1 if side == "target" else 0)
                if n > max_positions:
                    raise InputError(f"{where}: pair {i + 1}: the {side} is {n} tokens, more than the model's "
                                     f"{max_positions} positions")
        return src, tgt

    def _pack(self, src, tgt):
        n = len(src)
        s_ids = np.full((n, self.S), self.pad, np.int64)
        s_mask = np.zeros((n, self.S), np.uint8)
        d_in = np.full((n, self.T), self.pad, np.int64)
        labels = np.full((n, self.T), IGNORE, np.int64)
        for i, (a, b) in enumerate(zip(src, tgt)):
            s_ids[i, :len(a)] = a
            s_mask[i, :len(a)] = 1
            d_in[i, 0] = self.start
            d_in[i, 1:len(b) + 1] = b
            labels[i, :len(b)] = b
            labels[i, len(b)] = self.eos
        return s_ids, s_mask, d_in, labels

    @property
    def n_train(self) -> int:
        return self.train[0].shape[0]

    @property
    def n_eval(self) -> int:
        return 0 if self.eval is None else self.eval[0].shape[0]

    def check(self, batch: int, seq: int | None = None):
        if batch > self.n_train:
            raise InputError(f"{self.where}: --batch {batch} is larger than the {self.n_train} training pairs")

    def batch(self, seed: int, step: int, B: int):
        """-> (src_ids (B, S), src_mask (B, S), decoder inputs (B, T), labels (B, T)) for this step."""
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        idx = rng.integers(0, self.n_train, size=B)
        return tuple(np.ascontiguousarray(a[idx]) for a in self.train)

    def eval_batch(self, n: int):
        """The first n held-out pairs (fixed, so eval numbers are comparable), or None."""
        if self.eval is None:
            return None
        return tuple(np.ascontiguousarray(a[:n]) for a in self.eval)

    def target_tokens(self) -> int:
        return int((self.train[3] != IGNORE).sum())
