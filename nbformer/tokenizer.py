"""Text <-> ids through the `tokenizers` library (tokenizer.json), with explicit truncation.

Padding and truncation settings stored inside tokenizer.json are switched off: nbformer pads
batches itself and truncates only where the caller asks (Embedder: max_seq_length).
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError, WeightsError


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises plain Exception subclasses with Rust messages
            raise WeightsError(f"{self.path}: cannot read tokenizer ({str(e).splitlines()[0][:200]})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self._max_len = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def set_truncation(self, max_length: int | None):
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length=int(max_length))
        self._max_len = max_length

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens: bool = True):
        """-> list of (ids, type_ids) per text."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"texts[{i}] must be a str, got {type(t).__name__}")
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [(e.ids, e.type_ids) for e in encs]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))
