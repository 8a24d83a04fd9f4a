"""Whole-model parity: random-init transformers models (the oracle) vs nbformer, and vs the
float64 reference forward over nbformer's canonical parameters."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbformer  # noqa: E402
import reference as ref  # noqa: E402
from conftest import assert_close  # noqa: E402

torch.set_num_threads(2)

BERT_CONFIGS = {
    "bert-gelu-h16": dict(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, max_position_embeddings=300),
    "bert-relu-h80": dict(vocab_size=123, hidden_size=160, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=200, max_position_embeddings=300, hidden_act="relu"),
    "bert-geluNew-3heads": dict(vocab_size=77, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                                intermediate_size=128, max_position_embeddings=300, hidden_act="gelu_new",
                                type_vocab_size=3),
}
GPT2_CONFIGS = {
    "gpt2-h16": dict(vocab_size=257, n_positions=300, n_embd=48, n_layer=2, n_head=3),
    "gpt2-h64-1head-untied": dict(vocab_size=101, n_positions=300, n_embd=64, n_layer=2, n_head=1,
                                  tie_word_embeddings=False),
    "gpt2-h32-relu-inner": dict(vocab_size=150, n_positions=300, n_embd=64, n_layer=3, n_head=2, n_inner=80,
                                activation_function="relu"),
}


def _save(tmp_path_factory, name, model):
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module", params=list(BERT_CONFIGS))
def bert(request, tmp_path_factory):
    torch.manual_seed(0)
    m = transformers.BertModel(transformers.BertConfig(**BERT_CONFIGS[request.param])).eval()
    return m, nbformer.load(_save(tmp_path_factory, request.param, m))


@pytest.fixture(scope="module", params=list(GPT2_CONFIGS))
def gpt2(request, tmp_path_factory):
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[request.param])).eval()
    return m, nbformer.load(_save(tmp_path_factory, request.param, m))


def _padded_batch(rng, V, B, T, first_id=0):
    ids = rng.integers(first_id, V, (B, T))
    mask = np.ones((B, T), np.int64)
    lengths = np.linspace(T, 1, B).astype(int)  # the last row is padded down to a single token
    for b, n in enumerate(lengths):
        mask[b, n:] = 0
    return ids, mask


@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 33), (2, 130), (1, 257)])
def test_bert_matches_transformers(bert, rng, B, T):
    hf, nb = bert
    V, TV = hf.config.vocab_size, hf.config.type_vocab_size
    ids, mask = _padded_batch(rng, V, B, T)
    tt = rng.integers(0, TV, (B, T))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
    got = nb.forward(ids, attention_mask=mask, token_type_ids=tt)
    assert got.dtype == np.float32
    assert_close(got, want, atol=1e-4, rtol=0, what="hidden state vs transformers")
    want64 = ref.model_forward(nb.config, nb.ckpt.params, ids, mask, tt)
    assert_close(got, want64, atol=2e-5, rtol=2e-5, what="hidden state vs float64 reference")


@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 33), (2, 130), (1, 257)])
def test_gpt2_matches_transformers(gpt2, rng, B, T):
    hf, nb = gpt2
    ids, mask = _padded_batch(rng, hf.config.vocab_size, B, T)  # right padding
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = nb.forward(ids, attention_mask=mask)
    real = mask.astype(bool)
    assert_close(got[real], want[real], atol=1e-4, rtol=0, what="logits vs transformers")
    want64 = ref.model_forward(nb.config, nb.ckpt.params, ids, mask)
    assert_close(got[real], want64[real], atol=5e-5, rtol=2e-5, what="logits vs float64 reference")


def test_gpt2_padding_does_not_change_real_tokens(gpt2, rng):
    _, nb = gpt2
    ids, mask = _padded_batch(rng, nb.config.vocab_size, 2, 20)
    batch = nb.forward(ids, attention_mask=mask)
    n = int(mask[1].sum())
    alone = nb.forward(ids[1:, :n])
    assert_close(batch[1, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_gpt2_greedy_generate_matches_transformers(gpt2, rng):
    hf, nb = gpt2
    prompt = rng.integers(0, hf.config.vocab_size, (1, 5))
    got = nb.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           pad_token_id=0).numpy()
    assert np.array_equal(got, want)


def test_sampling_is_seeded(gpt2):
    _, nb = gpt2
    p = np.array([[1, 2, 3]])
    a = nb.generate(p, max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_at_eos=False)
    b = nb.generate(p, max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_at_eos=False)
    c = nb.generate(p, max_new_tokens=10, temperature=1.0, seed=8, stop_at_eos=False)
    assert np.array_equal(a, b)
    assert a.shape == c.shape == (1, 13)
    assert np.array_equal(a[:, :3], p)


def test_forward_is_deterministic(bert, rng):
    _, nb = bert
    ids, mask = _padded_batch(rng, nb.config.vocab_size, 3, 40)
    a = nb.forward(ids, attention_mask=mask)
    b = nb.forward(ids, attention_mask=mask)
    assert np.array_equal(a, b)


def test_one_dimensional_ids_are_a_batch_of_one(gpt2):
    _, nb = gpt2
    assert nb.forward([3, 4, 5]).shape == (1, 3, nb.config.vocab_size)
