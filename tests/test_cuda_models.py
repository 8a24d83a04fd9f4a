"""Whole models on CUDA against the same models on the CPU: BERT, GPT-2, Marian and the seeds'
encoder-decoder (tiny random configs), forward within 1e-5, greedy / beam-search / seeded sampled
generation token-identical, sentence embeddings of a tiny BERT with cosine >= 0.999999.

Without a GPU these run under Numba's CUDA simulator (tests/conftest.py) with tiny tiles, so the
multi-tile and tail paths of every kernel run; with NBFORMER_TEST_GPU=1 on a GPU machine the same
tests run on the device with the real tile sizes."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

import nbformer  # noqa: E402
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.kernels.cuda._jit import SIMULATOR  # noqa: E402
from nbformer.model import Model  # noqa: E402
from nbformer.training.recipes import seq2seq_config  # noqa: E402
from nbformer.weights import Checkpoint  # noqa: E402
from nbformer.weights.params import param_shapes  # noqa: E402

from cuda_tiles import tiny_cuda_tiles  # noqa: E402,F401  (fixture)
from test_generate import text_model  # noqa: E402,F401  (fixture: a tiny GPT-2 with a byte-level BPE tokenizer)

pytestmark = pytest.mark.usefixtures("tiny_cuda_tiles")


def _random_ckpt(cfg: ModelConfig, seed=0, name="tiny") -> Checkpoint:
    rng = np.random.default_rng(seed)
    params = {}
    for k, shape in param_shapes(cfg).items():
        if k.endswith(".w") and len(shape) == 1:  # LayerNorm gains near 1
            params[k] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            params[k] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return Checkpoint(cfg, params, [], Path(name))


def _pair(cfg, seed=0):
    ckpt = _random_ckpt(cfg, seed)
    return Model(ckpt, device="cpu"), Model(ckpt, device="cuda")


GPT2 = ModelConfig(arch="decoder", vocab_size=37, d_model=16, n_heads=2, n_layers=2, d_ff=24, max_positions=40,
                   norm="pre", activation="gelu_tanh", final_layernorm=True, family="gpt2")
BERT = ModelConfig(arch="encoder", vocab_size=45, d_model=12, n_heads=3, n_layers=2, d_ff=20, max_positions=24,
                   norm="post", activation="gelu", type_vocab_size=2, embedding_layernorm=True, lm_head=False,
                   layer_norm_eps=1e-12, pad_token_id=0, family="bert")
GEN = GPT2.replace(n_layers=1)
SEEDS = seq2seq_config(vocab_size=29, d_model=16, enc_layers=1, dec_layers=2, heads=2, d_ff=24, max_positions=32)
SEEDS_PRE = seq2seq_config(vocab_size=29, d_model=16, enc_layers=2, dec_layers=1, heads=4, d_ff=24, norm="pre",
                           activation="gelu", max_positions=32)


def _close(a, b, atol=1e-5, what="output"):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= atol, f"{what}: CUDA vs CPU max |diff| {err:.3e} > {atol}"


# ---------------------------------------------------------------- forward
def test_decoder_forward_matches_cpu():
    cpu, gpu = _pair(GPT2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, GPT2.vocab_size, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0  # left padding
    _close(gpu.forward(ids, mask), cpu.forward(ids, mask), what="GPT-2 logits")
    one = rng.integers(0, GPT2.vocab_size, (1, 1))  # a single token
    _close(gpu.forward(one), cpu.forward(one), what="GPT-2 logits, T = 1")


def test_encoder_forward_matches_cpu():
    cpu, gpu = _pair(BERT, seed=2)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, BERT.vocab_size, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 1:] = 0  # padded down to one token
    mask[2, 5:] = 0
    types = rng.integers(0, 2, (3, 9))
    _close(gpu.forward(ids, mask, token_type_ids=types), cpu.forward(ids, mask, token_type_ids=types),
           what="BERT hidden states")


@pytest.mark.parametrize("cfg", [SEEDS, SEEDS_PRE], ids=["post-LN", "pre-LN"])
def test_seeds_encoder_decoder_forward_matches_cpu(cfg):
    cpu, gpu = _pair(cfg, seed=4)
    rng = np.random.default_rng(5)
    src = rng.integers(2, cfg.vocab_size, (2, 6))
    smask = np.ones((2, 6), np.int64)
    smask[0, 4:] = 0
    dec = rng.integers(2, cfg.vocab_size, (2, 5))
    _close(gpu.forward(src, smask, decoder_input_ids=dec), cpu.forward(src, smask, decoder_input_ids=dec),
           what="encoder-decoder logits")


# ---------------------------------------------------------------- generation
def test_decoder_greedy_beam_and_sampled_generation_match_cpu():
    """Greedy, seeded top-k / top-p sampling (the device sampler) and beam search on a one-layer GPT-2
    (the forward tests above cover the layer stack; the simulator runs one Python thread per CUDA
    thread, so generation tests stay short)."""
    cpu, gpu = _pair(GEN, seed=6)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, GEN.vocab_size, (2, 5))
    for opts in ({}, {"temperature": 0.9, "top_k": 8, "top_p": 0.9, "seed": 3}):
        a = gpu.generate(ids, max_new_tokens=4, **opts)
        b = cpu.generate(ids, max_new_tokens=4, **opts)
        np.testing.assert_array_equal(a, b, err_msg=f"generate {opts}")
    a = gpu.generate(ids[:1], max_new_tokens=3, num_beams=3, num_return_sequences=2)
    b = cpu.generate(ids[:1], max_new_tokens=3, num_beams=3, num_return_sequences=2)
    np.testing.assert_array_equal(a, b, err_msg="beam search, one row")


def test_text_streaming_and_stop_strings_match_cpu(text_model):
    """Text in, text out on CUDA: streamed deltas join to the final text, a stop string cuts it, and
    both are what the CPU gives (sampled, seeded)."""
    gpu = Model(text_model.ckpt, device="cuda")
    opts = {"stop": [" the"], "temperature": 0.8, "seed": 2}
    want = text_model.generate("once upon a time", max_new_tokens=3, **opts)
    assert gpu.generate("once upon a time", max_new_tokens=3, **opts) == want
    assert "once upon a time" + "".join(nbformer.stream(gpu, "once upon a time", max_new_tokens=3, **opts)) == want


def test_cuda_session_keeps_the_cache_on_the_device_and_matches_cpu():
    cpu, gpu = _pair(GPT2, seed=8)
    rng = np.random.default_rng(9)
    ids = rng.integers(0, GPT2.vocab_size, (2, 4))
    sc, sg = cpu.session(2, 12), gpu.session(2, 12)
    assert not isinstance(sg.cache.buffer, np.ndarray)  # a device buffer
    _close(sg.start(ids), sc.start(ids), what="prefill logits")
    for _ in range(3):
        nxt = rng.integers(0, GPT2.vocab_size, 2)
        _close(sg.step(nxt), sc.step(nxt), what="step logits")
    sc.reorder([1, 1])
    sg.reorder([1, 1])
    nxt = rng.integers(0, GPT2.vocab_size, 2)
    _close(sg.step(nxt), sc.step(nxt), what="logits after a beam reorder")


def test_seeds_model_beam_translation_matches_cpu():
    """Beam search on the seeds' encoder-decoder (encoder-decoder greedy decoding: the Marian test)."""
    cpu, gpu = _pair(SEEDS, seed=10)
    src = np.random.default_rng(11).integers(2, SEEDS.vocab_size, (2, 5))
    a = gpu.generate(src, max_new_tokens=4, num_beams=2)
    b = cpu.generate(src, max_new_tokens=4, num_beams=2)
    np.testing.assert_array_equal(a, b, err_msg="translate, 2 beams")


def test_marian_forward_and_generation_match_cpu(tmp_path):
    """Marian's own parts (scaled embeddings, sinusoidal positions, final_logits_bias, swish) at one
    layer each side: logits, then greedy decoding."""
    from test_marian import PAD, make_marian

    _, d = make_marian(tmp_path, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24)
    cpu, gpu = nbformer.load(d, device="cpu"), nbformer.load(d, device="cuda")
    rng = np.random.default_rng(12)
    src = rng.integers(1, PAD, (2, 6))
    dec = rng.integers(1, PAD, (2, 4))
    _close(gpu.forward(src, decoder_input_ids=dec), cpu.forward(src, decoder_input_ids=dec), what="Marian logits")
    np.testing.assert_array_equal(gpu.generate(src, max_new_tokens=3), cpu.generate(src, max_new_tokens=3),
                                  err_msg="Marian greedy")


# ---------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    words = "the a cat dog sat on mat ran fast slow red blue numba kernels run on gpus today".split()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))],
                            trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                     "[SEP]", "[MASK]"],
                                                      show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=12, num_hidden_layers=2,
                                  num_attention_heads=3, intermediate_size=20, max_position_embeddings=24)
    d = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return d


def test_embeddings_match_cpu(tiny_bert_dir):
    texts = ["the cat sat on the mat", "numba kernels run on gpus", "a", "red dog ran fast today on the mat"]
    a = nbformer.Embedder(tiny_bert_dir, device="cuda").encode(texts)
    b = nbformer.Embedder(tiny_bert_dir, device="cpu").encode(texts)
    cos = np.sum(a.astype(np.float64) * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999999, cos
    _close(a, b, what="embeddings")


# ---------------------------------------------------------------- bits
def test_cuda_runs_are_bit_identical():
    _, gpu = _pair(GPT2, seed=13)
    ids = np.random.default_rng(14).integers(0, GPT2.vocab_size, (2, 6))
    np.testing.assert_array_equal(gpu.forward(ids), gpu.forward(ids))


@pytest.mark.skipif(SIMULATOR, reason="real GPU only: a realistic GPT-2 size is far too slow for the simulator")
def test_gpt2_small_size_on_a_real_gpu():
    cfg = ModelConfig(arch="decoder", vocab_size=5000, d_model=256, n_heads=4, n_layers=4, d_ff=1024,
                      max_positions=512, norm="pre", activation="gelu_tanh", final_layernorm=True)
    cpu, gpu = _pair(cfg, seed=15)
    for k, v in cpu.ckpt.params.items():  # realistic magnitudes, so logits are not saturated
        v *= 0.1
    cpu, gpu = Model(cpu.ckpt, "cpu"), Model(cpu.ckpt, "cuda")
    ids = np.random.default_rng(16).integers(0, cfg.vocab_size, (4, 300))
    _close(gpu.forward(ids), cpu.forward(ids), atol=2e-4, what="logits at T = 300")
    np.testing.assert_array_equal(gpu.generate(ids[:, :20], max_new_tokens=16),
                                  cpu.generate(ids[:, :20], max_new_tokens=16))
