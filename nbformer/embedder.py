"""Sentence embeddings with sentence-transformers semantics (truncation, pooling, normalisation)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError
from .batching import plan_batches
from .graph.build import build_embed

from .defaults import default_embedder_path


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None


def _pooling_mode(cfg: dict, where: Path) -> str:
    modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                              ("max", "pooling_mode_max_tokens"), ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
                              ("lasttoken", "pooling_mode_lasttoken")) if cfg.get(key)]
    if len(modes) != 1:
        raise ConfigError(f"{where}: expected exactly one pooling mode, found {modes or 'none'}")
    return modes[0]


class Embedder:
    """Embedder(path).encode(texts) -> (N, C) float32, like SentenceTransformer(path).encode(texts)."""

    def __init__(self, path=None, device=None, batch_size: int = 32, max_seq_length: int | None = None):
        from . import load

        d = Path(path) if path is not None else default_embedder_path()
        self.model = load(d, device=device)
        cfg = self.model.config
        if cfg.arch != "encoder":
            raise ConfigError(f"{d}: Embedder needs an encoder model, this one is {cfg.arch}")
        self.pooling, self.normalize_module = "mean", False
        st_max = None
        root = d if d.is_dir() else d.parent
        if (root / "modules.json").exists():
            for m in _read(root / "modules.json"):
                kind = str(m.get("type", ""))
                if kind.endswith("Pooling"):
                    pc = root / m.get("path", "") / "config.json"
                    self.pooling = _pooling_mode(_read(pc), pc)
                elif kind.endswith("Normalize"):
                    self.normalize_module = True
        # the encoder may sit in a sub-folder (0_Transformer/) that holds its own configs
        tdir = self.model.ckpt.model_dir or root
        cfg_dirs = [tdir, root] if tdir != root else [root]
        tok_max = None
        for r in reversed(cfg_dirs):  # the encoder's own folder wins
            if (r / "sentence_bert_config.json").exists():
                st_max = _read(r / "sentence_bert_config.json").get("max_seq_length")
            if (r / "tokenizer_config.json").exists():
                tok_max = _read(r / "tokenizer_config.json").get("model_max_length")
        if max_seq_length is not None:
            if not isinstance(max_seq_length, int) or max_seq_length < 1:
                raise InputError(f"max_seq_length: expected a positive integer, got {max_seq_length!r}")
            limit = max_seq_length
        elif isinstance(st_max, int) and st_max > 0:
            limit = st_max
        elif isinstance(tok_max, int) and 0 < tok_max < 10 ** 9:
            limit = tok_max
        else:
            limit = cfg.max_positions
        self.max_seq_length = min(limit, cfg.max_positions)
        self.tokenizer = self.model.tokenizer
        self.tokenizer.set_truncation(self.max_seq_length)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.dim = cfg.d_model

    def encode(self, texts, normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
        """texts: a str or a list of str -> (N, C) float32 (a str gives (C,)).

        normalize=True L2-normalises every row (what the model's Normalize module does);
        normalize=False returns the raw pooled vectors.
        """
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise InputError(f"texts: expected a str or a list of str, got {type(texts).__name__}")
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or bs < 1:
            raise InputError(f"batch_size: expected a positive integer, got {bs!r}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        enc = self.tokenizer.encode_batch(texts)
        order = np.argsort([-len(ids) for ids, _ in enc], kind="stable")  # similar lengths share a batch
        cfg = self.model.config
        # at most bs texts per batch, cut where padding costs more than another batch (nbformer/batching.py)
        for start, end in plan_batches([len(enc[i][0]) for i in order], bs):
            rows = order[start:end]
            B, T = len(rows), max(len(enc[i][0]) for i in rows)
            ids = np.full((B, T), cfg.pad_token_id or 0, dtype=np.int64)
            types = np.zeros((B, T), dtype=np.int64)
            mask = np.zeros((B, T), dtype=np.uint8)
            for r, i in enumerate(rows):
                n = len(enc[i][0])
                ids[r, :n], types[r, :n], mask[r, :n] = enc[i][0], enc[i][1], 1
            inputs = self.model.prepare_inputs(ids, mask, types if cfg.type_vocab_size else None)
            ex = self.model.executor(("embed", B, T, self.pooling, normalize),
                                     lambda: build_embed(cfg, B, T, self.pooling, normalize))
            out[rows] = ex.run(inputs, copy_outputs=False)[ex.graph.outputs[0]]
        return out[0] if single else out
