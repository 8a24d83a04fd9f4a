"""nbformer.generate vs transformers' generate (the oracle): greedy and beam search token for token,
logits processors, sampling determinism, stop strings, streaming, truncation and bad inputs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbformer  # noqa: E402
from nbformer.errors import InputError  # noqa: E402
from nbformer.generate import GenerationResult, RecomputeSession, stream  # noqa: E402

torch.set_num_threads(2)

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny test corpus",
          "numba kernels run transformers without torch", "once upon a time there was a small model",
          "caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 \u65e5\u672c\u8a9e \u0440\u0443\u0441\u0441\u043a\u0438\u0439"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Tiny random GPT-2 (vocab 100, 64 positions) saved as safetensors: (hf, nb)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2-gen")
    hf.save_pretrained(d, safe_serialization=True)
    return hf, nbformer.load(d)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """Tiny random GPT-2 with a byte-level BPE tokenizer.json (multi-byte characters split over tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("gpt2-text")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=None, eos_token_id=None)).save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return nbformer.load(d)


def hf_generate(hf, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(np.asarray(ids)),
                          attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask)), **kw)
    if isinstance(out, torch.Tensor):
        return out.numpy()
    return out.sequences.numpy(), out.sequences_scores.numpy()


def left_padded(rng, V, lengths, pad=0):
    T = max(lengths)
    ids = np.full((len(lengths), T), pad, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(1, V, n)
        mask[b, T - n:] = 1
    return ids, mask


def liked_token(hf, ids, mask, **kw):
    """A token the model generates in the middle of its output (used as EOS so EOS really happens)."""
    out = hf_generate(hf, ids, mask, max_new_tokens=10, min_new_tokens=10, **kw)
    out = out[0] if isinstance(out, tuple) else out
    gen = out[:, ids.shape[1]:]
    counts = np.bincount(gen[:, 2:6].ravel(), minlength=hf.config.vocab_size)
    counts[0] = 0
    return int(np.argmax(counts))


def eos_that_ends_a_beam(hf, ids, mask, **kw):
    """The first token that, used as EOS, ends one of transformers' returned hypotheses (a
    long-favouring length penalty keeps most EOS-ended hypotheses out of the n-best)."""
    for eos in range(1, hf.config.vocab_size):
        gen = hf_generate(hf, ids, mask, eos_token_id=eos, **kw)[:, ids.shape[1]:]
        if (gen == eos).any():
            return eos
    raise AssertionError("no token ends a hypothesis; change the prompt")


# ---------------------------------------------------------------- greedy
def test_greedy_matches_transformers_single_prompt(gpt2):
    hf, nb = gpt2
    p = np.array([[5, 17, 42, 8, 3]])
    got = nb.generate(p, max_new_tokens=20, stop_at_eos=False)
    want = hf_generate(hf, p, max_new_tokens=20, min_new_tokens=20)
    assert got.shape == (1, 25) and np.array_equal(got, want)


def test_greedy_batch_left_padded_with_eos(gpt2, rng):
    hf, nb = gpt2
    ids, mask = left_padded(rng, 100, [4, 7, 2])
    eos = liked_token(hf, ids, mask)
    got = nb.generate(ids, max_new_tokens=16, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    want = hf_generate(hf, ids, mask, max_new_tokens=16, eos_token_id=eos)
    assert np.array_equal(got, want)
    gen = got[:, ids.shape[1]:]
    assert (gen == eos).any(axis=1).sum() >= 1  # EOS really ends rows...
    first = [int(np.argmax(r == eos)) for r in gen if (r == eos).any()]
    assert any(f < gen.shape[1] - 1 for f in first)  # ... before the end, and the rest is padding
    # without an attention mask the padded rows would differ: the mask is really used
    assert not np.array_equal(nb.generate(ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=0), got)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(gpt2, rng, penalty):
    hf, nb = gpt2
    ids, mask = left_padded(rng, 100, [6, 3])
    got = nb.generate(ids, max_new_tokens=15, attention_mask=mask, repetition_penalty=penalty, stop_at_eos=False)
    want = hf_generate(hf, ids, mask, max_new_tokens=15, min_new_tokens=15, repetition_penalty=penalty)
    assert np.array_equal(got, want)
    if penalty > 1:  # the random model loves repeating itself; the penalty must change that
        assert not np.array_equal(got, nb.generate(ids, max_new_tokens=15, attention_mask=mask, stop_at_eos=False))


def test_processors_match_transformers(gpt2, rng):
    """no_repeat_ngram_size, bad_words_ids (single tokens and a sequence), min_new_tokens, forced EOS."""
    hf, nb = gpt2
    ids, mask = left_padded(rng, 100, [5, 3])
    eos = liked_token(hf, ids, mask)
    plain = nb.generate(ids, max_new_tokens=12, attention_mask=mask, stop_at_eos=False)
    gen = plain[:, ids.shape[1]:]
    bad = [[int(gen[0, 0])], [int(gen[1, 1]), int(gen[1, 2])], [eos]]
    kw = dict(no_repeat_ngram_size=2, bad_words_ids=bad, min_new_tokens=4, forced_eos_token_id=eos,
              eos_token_id=eos)
    for extra in ({}, {"num_beams": 3}):
        got = nb.generate(ids, max_new_tokens=12, attention_mask=mask, pad_token_id=0, **kw, **extra)
        want = hf_generate(hf, ids, mask, max_new_tokens=12, **kw, **extra)
        assert np.array_equal(got, want), extra
        assert got[0, ids.shape[1]] != bad[0][0]
        assert (got[:, -1] == eos).all() or (got == eos).any(axis=1).all()


# ---------------------------------------------------------------- beam search
@pytest.mark.parametrize("length_penalty", [0.6, 1.5])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_search_matches_transformers(gpt2, rng, length_penalty, early_stopping, with_eos):
    hf, nb = gpt2
    ids, mask = left_padded(rng, 100, [5, 3])
    kw = dict(num_beams=4, num_return_sequences=3, length_penalty=length_penalty, early_stopping=early_stopping)
    eos = eos_that_ends_a_beam(hf, ids, mask, max_new_tokens=12, **kw) if with_eos else None
    got, scores = nb.generate(ids, max_new_tokens=12, attention_mask=mask, return_scores=True, pad_token_id=0,
                              eos_token_id=eos, stop_at_eos=with_eos, **kw)
    want, want_scores = hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=eos,
                                    output_scores=True, return_dict_in_generate=True, **kw)
    assert got.shape == want.shape and np.array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4, rtol=1e-4)
    assert got.shape[0] == 2 * 3
    if with_eos:  # EOS ends some hypotheses; what follows it is filler (pad, or EOS as transformers writes it)
        gen = got[:, ids.shape[1]:]
        assert (gen == eos).any()
        for r in gen:
            if (r == eos).any():
                assert np.isin(r[int(np.argmax(r == eos)) + 1:], [0, eos]).all()


def test_beam_search_single_prompt_and_result_object(gpt2):
    hf, nb = gpt2
    p = np.array([[11, 12, 13]])
    res = nb.generate(p, max_new_tokens=8, num_beams=4, num_return_sequences=4, stop_at_eos=False, return_dict=True)
    assert isinstance(res, GenerationResult)
    want, want_scores = hf_generate(hf, p, max_new_tokens=8, num_beams=4, num_return_sequences=4,
                                    output_scores=True, return_dict_in_generate=True)
    assert np.array_equal(res.sequences, want) and np.array_equal(res.output, want)
    np.testing.assert_allclose(res.scores, want_scores, atol=1e-4, rtol=1e-4)
    assert list(res.new_tokens) == [8] * 4 and res.finish_reasons == ["length"] * 4
    assert np.all(np.diff(res.scores) <= 0)  # best first


def test_kv_cache_session_matches_recompute(gpt2, rng):
    _, nb = gpt2
    if not hasattr(nb, "session"):
        pytest.skip("model.session (KV cache) not available")
    ids, mask = left_padded(rng, 100, [6, 2, 4])
    for kw in (dict(), dict(num_beams=3, num_return_sequences=2), dict(temperature=0.9, top_k=20, seed=3)):
        a = nb.generate(ids, max_new_tokens=10, attention_mask=mask, stop_at_eos=False, **kw)
        b = nb.generate(ids, max_new_tokens=10, attention_mask=mask, stop_at_eos=False, cache=False, **kw)
        assert np.array_equal(a, b), kw


def test_recompute_session_interface(gpt2):
    hf, nb = gpt2
    ids = np.array([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    s = RecomputeSession(nb, 2, 8)
    first = s.start(ids, mask)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(np.array([[0, 0, 0, 1], [0, 1, 2, 3]]))).logits[:, -1].numpy()
    np.testing.assert_allclose(first, ref, atol=1e-4)
    s.reorder(np.array([1, 1]))
    out = s.step(np.array([7, 8]))
    assert out.shape == (2, 100) and not np.allclose(out[0], out[1])


# ---------------------------------------------------------------- sampling
def test_sampling_is_seeded(gpt2):
    _, nb = gpt2
    p = np.array([[1, 2, 3]])
    kw = dict(max_new_tokens=40, temperature=1.5, stop_at_eos=False)
    a = nb.generate(p, seed=7, **kw)
    assert np.array_equal(a, nb.generate(p, seed=7, **kw))
    assert not np.array_equal(a, nb.generate(p, seed=8, **kw))
    greedy = nb.generate(p, max_new_tokens=40, stop_at_eos=False)
    assert np.array_equal(nb.generate(p, seed=5, top_k=1, **kw), greedy)
    assert np.array_equal(nb.generate(p, do_sample=False, **kw), greedy)  # do_sample=False forces greedy
    many = nb.generate(p, seed=7, num_return_sequences=3, **kw)
    assert many.shape == (3, 43) and len({r.tobytes() for r in many}) > 1


def test_sampling_follows_temperature_top_k_top_p(gpt2):
    """First tokens drawn over many seeds: inside the top-k / nucleus set of transformers' logits at
    that temperature, and as frequent as their renormalised probabilities."""
    hf, nb = gpt2
    p = np.array([[1, 2, 3]])
    with torch.no_grad():
        logits = hf(torch.from_numpy(p)).logits[0, -1].double().numpy()
    T = 0.05  # sharp enough that a handful of tokens carry the mass
    probs = np.exp((logits - logits.max()) / T)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    seeds = range(300)

    def draws(**kw):
        return np.array([nb.generate(p, max_new_tokens=1, temperature=T, seed=s, stop_at_eos=False, **kw)[0, -1]
                         for s in seeds])

    top3 = draws(top_k=3)
    assert set(top3) <= set(order[:3]) and len(set(top3)) > 1
    q = probs[order[:3]] / probs[order[:3]].sum()
    for tok, want in zip(order[:3], q):
        assert abs(np.mean(top3 == tok) - want) < 0.1, (tok, want)
    nucleus = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)  # smallest set with mass >= 0.6
    got = draws(top_p=0.6)
    assert set(got) <= set(order[:nucleus])
    assert len(set(draws())) >= len(set(got))  # no truncation: at least as many distinct tokens


# ---------------------------------------------------------------- text, stop strings, streaming
def test_text_in_text_out_and_batches(text_model):
    m = text_model
    one = m.generate("hello world", max_new_tokens=8)
    assert isinstance(one, str) and one.startswith("hello world") and len(one) > len("hello world")
    both = m.generate(["hello world", "once upon a time there"], max_new_tokens=8)
    assert isinstance(both, list) and both[0] == one
    assert both[1] == m.generate("once upon a time there", max_new_tokens=8)
    beams = m.generate("hello", max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert isinstance(beams, list) and len(beams) == 2 and all(b.startswith("hello") for b in beams)


def test_stop_strings(text_model):
    m = text_model
    prompt = "the quick"
    full = m.generate(prompt, max_new_tokens=20)
    cont = full[len(prompt):]
    stop = cont[5:7]
    assert len(stop) == 2
    cut = cont.index(stop)
    got = m.generate(prompt, max_new_tokens=20, stop=[stop, "\u2603never"])
    assert got == prompt + cont[:cut]
    res = m.generate(prompt, max_new_tokens=20, stop=stop, return_dict=True)
    assert res.finish_reasons == ["stop"] and res.new_tokens[0] < 20
    assert stop in m.tokenizer.decode(res.sequences[0].tolist())  # ids keep the completing token
    beams = m.generate(prompt, max_new_tokens=20, stop=stop, num_beams=2)
    assert stop not in beams[len(prompt):]


@pytest.mark.parametrize("prompt", ["hello world", "caf\u00e9 \u4e2d", "once"])
def test_stream_deltas_join_to_the_text(text_model, prompt):
    m = text_model
    for kw in (dict(), dict(temperature=1.0, seed=2), dict(stop=["e", "th"])):
        full = m.generate(prompt, max_new_tokens=24, **kw)
        deltas = list(stream(m, prompt, max_new_tokens=24, **kw))
        assert prompt + "".join(deltas) == full, kw
        assert all(deltas) and all(not d.endswith("\ufffd") for d in deltas[:-1])
        seen = []
        assert m.generate(prompt, max_new_tokens=24, on_text=seen.append, **kw) == full
        assert seen == deltas


def test_truncate(gpt2, rng):
    _, nb = gpt2
    p = rng.integers(1, 100, (1, 60))
    with pytest.raises(InputError, match="64"):
        nb.generate(p, max_new_tokens=10)
    got = nb.generate(p, max_new_tokens=10, truncate=True, stop_at_eos=False)
    assert got.shape == (1, 64) and np.array_equal(got[:, :54], p[:, -54:])
    assert np.array_equal(got, nb.generate(p[:, -54:], max_new_tokens=10, stop_at_eos=False))
    with pytest.raises(InputError, match="max_new_tokens"):
        nb.generate(p, max_new_tokens=64, truncate=True)


# ---------------------------------------------------------------- encoder-decoder
def test_encoder_decoder_matches_transformers(tmp_path):
    # init_std 0.3 and no_repeat_ngram_size make a random Marian's output depend on its source and
    # vary from token to token (with the default 0.02 every source decodes to the same repeats)
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=59,
                                    eos_token_id=0, decoder_start_token_id=59, forced_eos_token_id=0, init_std=0.3)
    hf = transformers.MarianMTModel(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    nb = nbformer.load(tmp_path)
    src = np.array([[5, 17, 42, 8, 0], [7, 9, 3, 0, 59], [11, 12, 13, 14, 0]])
    mask = (src != 59).astype(np.int64)
    mid = dict(eos_token_id=42, forced_eos_token_id=42)  # a token the model emits mid-sentence: EOS ends rows early
    for kw in (dict(num_beams=1), dict(num_beams=1, no_repeat_ngram_size=1),
               dict(num_beams=1, no_repeat_ngram_size=1, **mid),
               dict(num_beams=4, num_return_sequences=2, length_penalty=0.6, no_repeat_ngram_size=1),
               dict(num_beams=4, num_return_sequences=3, length_penalty=1.5, no_repeat_ngram_size=1, **mid),
               dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=1, early_stopping=True, **mid),
               dict(num_beams=3, bad_words_ids=[[59]], repetition_penalty=1.2)):
        got = nb.generate(src, max_new_tokens=12, attention_mask=mask, **kw)
        want = hf_generate(hf, src, mask, max_new_tokens=12, pad_token_id=59, **kw)
        assert np.array_equal(got, want[:, 1:]), kw  # nbformer returns the target without the start token
        eos = kw.get("eos_token_id", 0)
        assert (got == eos).any(axis=1).all(), kw  # every row ends in EOS (forced at the length limit)
        if kw.get("no_repeat_ngram_size"):
            assert len({r.tobytes() for r in got}) > 1, kw  # the sources really steer the output
        if "eos_token_id" in kw:
            assert min(int(np.argmax(r == eos)) for r in got) < 11, kw
        assert np.array_equal(got, nb.generate(src, max_new_tokens=12, attention_mask=mask, cache=False, **kw))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,name", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.2), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, temperature=0.7), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=0), "num_return_sequences"), (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(bad_words_ids=[[1000]]), "bad_words_ids"), (dict(bad_words_ids=[1, 2]), "bad_words_ids"),
    (dict(forced_eos_token_id=-1), "forced_eos_token_id"), (dict(eos_token_id=100), "eos_token_id"),
    (dict(min_new_tokens=-1), "min_new_tokens"), (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(seed=-1), "seed"), (dict(stop=[""]), "stop"), (dict(stop=5), "stop"),
    (dict(max_new_tokens=61), "max_new_tokens"), (dict(return_scores=True), "return_scores"),
    (dict(on_text=print, num_beams=2), "on_text"), (dict(tempreature=1.0), "tempreature"),
    (dict(attention_mask=[[1, 1, 0, 0]]), "attention_mask"),
])
def test_bad_options_name_the_argument(gpt2, kw, name):
    _, nb = gpt2
    kw.setdefault("max_new_tokens", 4)
    with pytest.raises(InputError, match=name):
        nb.generate(np.array([[1, 2, 3, 4]]), **kw)


def test_bad_prompts(gpt2, text_model, tmp_path):
    _, nb = gpt2
    with pytest.raises(InputError, match="bos_token_id"):
        text_model.generate("", max_new_tokens=3)
    with pytest.raises(InputError, match="prompt"):
        text_model.generate([], max_new_tokens=3)
    with pytest.raises(InputError, match="input_ids"):
        nb.generate(np.array([[1, 200]]), max_new_tokens=3)
    with pytest.raises(InputError, match="stream"):
        list(stream(text_model, ["a", "b"], max_new_tokens=3))
    with pytest.raises(InputError, match="stream"):
        list(stream(text_model, "a", max_new_tokens=3, num_beams=2))
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path, safe_serialization=True)
    with pytest.raises(InputError, match="encoder"):
        nbformer.load(tmp_path).generate(np.array([[1, 2]]), max_new_tokens=3)


# ---------------------------------------------------------------- text prompts: what the tokenizer adds
def _template_tokenizer(single):
    """A tiny word-level tokenizer whose post-processor wraps a text as `single` says."""
    import json as _json

    from nbformer.tokenizer import Tokenizer

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    doc = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in (("<s>", 0), ("</s>", 1))],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
           "post_processor": {"type": "TemplateProcessing", "single": single, "pair": single,
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                                                 "</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    return Tokenizer(json_text=_json.dumps(doc))


@pytest.mark.parametrize("template,want", [
    ([{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], [0, 3, 4]),
    ([{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
      {"SpecialToken": {"id": "</s>", "type_id": 0}}], [0, 3, 4]),
    ([{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}], [3, 4]),
    ([{"Sequence": {"id": "A", "type_id": 0}}], [3, 4]),
])
def test_decoder_text_prompts_keep_the_bos_a_tokenizer_adds_never_an_eos(template, want):
    """Llama / sentencepiece-style tokenizers put BOS before a text (transformers' tokenizer(text) and
    llama.cpp both feed it): a decoder's text prompt keeps it, but not an appended EOS (the model is to
    continue the text); an encoder-decoder's decoder prompt gets the plain ids."""
    from nbformer.generation.inputs import prompt_ids

    tok = _template_tokenizer(template)
    assert prompt_ids(tok, "hello world", decoder_only=True) == want
    assert prompt_ids(tok, "hello world", decoder_only=False) == [3, 4]
    assert prompt_ids(tok, "", decoder_only=True) == []  # empty: the caller starts from bos_token_id
