"""Text <-> ids through the `tokenizers` library (tokenizer.json), with explicit truncation.

Padding and truncation settings stored inside tokenizer.json are switched off: nbformer pads
batches itself and truncates only where the caller asks (Embedder: max_seq_length).
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError, WeightsError


class Tokenizer:
    def __init__(self, path=None, json_text: str | None = None, where: str | None = None):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path) if path is not None else None
        where = where or str(self.path)
        try:
            self._tok = _Tok.from_str(json_text) if json_text is not None else _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises plain Exception subclasses with Rust messages
            raise WeightsError(f"{where}: cannot read tokenizer ({str(e).splitlines()[0][:200]})") from None
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

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (padding/truncation switched off)."""
        return self._tok.to_str()

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))


def train_bpe(texts, vocab_size: int, special_tokens=("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on an iterable of strings with the `tokenizers` library."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257 + len(special_tokens):
        raise InputError(f"vocab_size: expected an integer >= {257 + len(special_tokens)} for a byte-level BPE, "
                         f"got {vocab_size!r}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(json_text=tok.to_str(), where="trained tokenizer")


SEQ2SEQ_SPECIALS = ("<pad>", "</s>")  # ids 0 and 1: padding / decoder start, and end of sequence


def train_seq2seq_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE shared by source and target (Marian style): <pad> = 0 (also the decoder
    start token), </s> = 1, appended to every encoding that asks for special tokens."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import processors

    base = train_bpe(texts, vocab_size, special_tokens=SEQ2SEQ_SPECIALS)
    tok = _Tok.from_str(base.to_json())
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(json_text=tok.to_str(), where="trained tokenizer")
