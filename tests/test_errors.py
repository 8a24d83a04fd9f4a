"""Every user-facing failure is an NbformerError whose message names the file / tensor /
argument at fault and what was expected: never a crash, a NumPy traceback or wrong numbers."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

import nbformer
from nbformer import ConfigError, Embedder, InputError, NbformerError, WeightsError
from nbformer.defaults import default_embedder_path

V_BERT, V_GPT = 100, 320
SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny test corpus",
             "numba kernels run transformers without torch", "once upon a time there was a small model"]


# ---------------------------------------------------------------- fixtures
def _train_bpe(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=V_BERT, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40)).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2")
    tok = _train_bpe(V_GPT)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def bert(bert_dir):
    return nbformer.load(bert_dir)


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return nbformer.load(gpt2_dir)


@pytest.fixture(scope="module")
def embedder():
    return Embedder(default_embedder_path())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _raises(exc_type, fn, *parts):
    """fn() raises exc_type (an NbformerError) whose one-line message contains every part."""
    with pytest.raises(exc_type) as ei:
        fn()
    assert isinstance(ei.value, NbformerError)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, f"{p!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- model directories and config.json
def test_missing_path(tmp_path):
    p = tmp_path / "nope"
    _raises(WeightsError, lambda: nbformer.load(p), str(p), "no such file")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises(ConfigError, lambda: nbformer.load(tmp_path), str(tmp_path), "config.json")


def test_unknown_model_type(tmp_path, bert_dir):
    d = _copy(bert_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "falcon"  # (was "llama", supported since issue 12)
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(ConfigError, lambda: nbformer.load(d), str(d / "config.json"), "falcon", "bert", "gpt2", "llama")


def test_config_not_json(tmp_path, bert_dir):
    d = _copy(bert_dir, tmp_path / "m")
    (d / "config.json").write_text("{\"model_type\": \"bert\", oops")
    _raises(ConfigError, lambda: nbformer.load(d), str(d / "config.json"), "not valid JSON")


def test_config_missing_required_key(tmp_path, bert_dir):
    d = _copy(bert_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(ConfigError, lambda: nbformer.load(d), str(d / "config.json"), "hidden_size")


# ---------------------------------------------------------------- corrupt weight files
def _with_weights(tmp_path, bert_dir, data: bytes):
    d = _copy(bert_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(data)
    return d, d / "model.safetensors"


def test_truncated_safetensors(tmp_path, bert_dir):
    data = (bert_dir / "model.safetensors").read_bytes()
    d, f = _with_weights(tmp_path, bert_dir, data[: len(data) // 2])
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "truncated")


def test_truncated_inside_header(tmp_path, bert_dir):
    data = (bert_dir / "model.safetensors").read_bytes()
    d, f = _with_weights(tmp_path, bert_dir, data[:100])
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "header length")


@pytest.mark.parametrize("n", [0, 5, 4096])
def test_garbage_header(tmp_path, bert_dir, n):
    data = np.random.default_rng(n).integers(0, 256, size=max(n, 1), dtype=np.uint8).tobytes()[:n]
    d, f = _with_weights(tmp_path, bert_dir, data)
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "safetensors")


def test_garbage_json_with_plausible_length(tmp_path, bert_dir):
    body = np.random.default_rng(7).integers(128, 256, size=200, dtype=np.uint8).tobytes()
    d, f = _with_weights(tmp_path, bert_dir, (200).to_bytes(8, "little") + body)
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "not valid JSON")


def test_header_entry_lies_about_size(tmp_path, bert_dir):
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    d, f = _with_weights(tmp_path, bert_dir, len(hdr).to_bytes(8, "little") + hdr + bytes(64))
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "'x'", "[4, 4]", "64")


def test_git_lfs_pointer(tmp_path, bert_dir):
    ptr = (b"version https://git-lfs.github.com/spec/v1\n"
           b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 123\n")
    d, f = _with_weights(tmp_path, bert_dir, ptr)
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "git-lfs")


def test_html_page(tmp_path, bert_dir):
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    d, f = _with_weights(tmp_path, bert_dir, html)
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "HTML")


def test_native_checkpoint_that_is_html(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"<html><body>rate limited</body></html>" * 4)
    _raises(WeightsError, lambda: nbformer.load(f), str(f), "HTML")


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pytorch_bin_only_is_never_unpickled(tmp_path, bert_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(bert_dir / "config.json", d / "config.json")
    marker = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    msg = _raises(WeightsError, lambda: nbformer.load(d), str(d), "model.safetensors", "pickle")
    assert "not read" in msg or "never" in msg
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_never_unpickled(tmp_path, bert_dir):
    marker = tmp_path / "UNPICKLED"
    d, f = _with_weights(tmp_path, bert_dir, pickle.dumps(_Boom(str(marker)), protocol=2))
    _raises(WeightsError, lambda: nbformer.load(d), str(f), "pickle")
    assert not marker.exists()


# ---------------------------------------------------------------- tensors vs config
def test_missing_tensor(tmp_path, bert_dir):
    from safetensors.numpy import load_file, save_file

    d = _copy(bert_dir, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    gone = "encoder.layer.0.attention.self.key.weight"
    del t[gone]
    save_file(t, str(d / "model.safetensors"))
    _raises(WeightsError, lambda: nbformer.load(d), str(d / "model.safetensors"), gone, "missing")


def test_missing_tensor_gpt2(tmp_path, gpt2_dir):
    from safetensors.numpy import load_file, save_file

    d = _copy(gpt2_dir, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    gone = "transformer.ln_f.bias"
    del t[gone]
    save_file(t, str(d / "model.safetensors"))
    _raises(WeightsError, lambda: nbformer.load(d), gone, "missing")


def test_shape_disagrees_with_config(tmp_path, bert_dir):
    d = _copy(bert_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(WeightsError, lambda: nbformer.load(d), "encoder.layer.0.intermediate.dense.weight",
            "(64, 32)", "(48, 32)")


def test_shape_disagrees_with_config_gpt2_conv1d(tmp_path, gpt2_dir):
    d = _copy(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_inner"] = 48  # the file holds c_fc.weight as Conv1D (in, out) = (32, 128)
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(WeightsError, lambda: nbformer.load(d), "h.0.mlp.c_fc.weight", "(32, 128)", "(32, 48)")


def test_shape_disagrees_vocab(tmp_path, bert_dir):
    d = _copy(bert_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = V_BERT + 1
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(WeightsError, lambda: nbformer.load(d), "embeddings.word_embeddings.weight",
            f"({V_BERT}, 32)", f"({V_BERT + 1}, 32)")


def test_non_finite_weights(tmp_path, bert_dir):
    from safetensors.numpy import load_file, save_file

    d = _copy(bert_dir, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    t["embeddings.LayerNorm.weight"][3] = np.nan
    save_file(t, str(d / "model.safetensors"))
    _raises(WeightsError, lambda: nbformer.load(d), "embeddings.LayerNorm.weight", "NaN")


# ---------------------------------------------------------------- Model.forward inputs
@pytest.mark.parametrize("bad", [-1, V_BERT, V_BERT + 1000])
def test_forward_id_out_of_vocab(bert, bad):
    _raises(InputError, lambda: bert.forward([[1, 2, bad, 3]]), "input_ids", bad, V_BERT)


def test_forward_float_ids(bert):
    _raises(InputError, lambda: bert.forward(np.array([[1.0, 2.5, 3.0]])), "input_ids", "integer")
    _raises(InputError, lambda: bert.forward(np.array([[1.0, np.nan]])), "input_ids", "integer")
    _raises(InputError, lambda: bert.forward(np.array([[1.0, 2.0]])), "input_ids", "integer")


def test_forward_non_numeric_ids(bert):
    _raises(InputError, lambda: bert.forward([["a", "b"]]), "input_ids")


def test_forward_ragged(bert):
    _raises(InputError, lambda: bert.forward([[1, 2, 3], [4, 5]]), "input_ids", "different lengths")


def test_forward_bad_rank(bert):
    _raises(InputError, lambda: bert.forward(np.ones((1, 2, 3), dtype=np.int64)), "input_ids", "(1, 2, 3)")


def test_forward_empty(bert):
    _raises(InputError, lambda: bert.forward(np.zeros((1, 0), dtype=np.int64)), "input_ids")


def test_attention_mask_wrong_shape(bert):
    _raises(InputError, lambda: bert.forward([[1, 2, 3]], attention_mask=[[1, 1]]),
            "attention_mask", "(1, 2)", "(1, 3)")
    _raises(InputError, lambda: bert.forward([[1, 2, 3], [4, 5, 6]], attention_mask=[[1, 1, 1]]),
            "attention_mask", "(1, 3)", "(2, 3)")


@pytest.mark.parametrize("mask", [[[1, 2, 1]], [[1, -1, 1]], [[1.0, 0.5, 1.0]]])
def test_attention_mask_values(bert, mask):
    _raises(InputError, lambda: bert.forward([[1, 2, 3]], attention_mask=mask), "attention_mask", "0", "1")


def test_forward_too_long(bert, gpt2):
    _raises(InputError, lambda: bert.forward(np.ones((1, 41), dtype=np.int64)), "input_ids", 41, 40)
    _raises(InputError, lambda: gpt2.forward(np.ones((2, 33), dtype=np.int64)), "input_ids", 33, 32)


def test_forward_at_limits_works(bert):
    out = bert.forward(np.full((1, 40), V_BERT - 1, dtype=np.int64))
    assert out.shape == (1, 40, 32) and out.dtype == np.float32 and np.isfinite(out).all()


def test_integer_dtypes_agree(bert):
    ids = np.array([[1, 2, 3, 99]])
    ref = bert.forward(ids.astype(np.int64))
    for dt in (np.int32, np.uint8, np.int16):
        np.testing.assert_array_equal(bert.forward(ids.astype(dt)), ref)
    np.testing.assert_array_equal(bert.forward([1, 2, 3, 99]), ref)  # (T,) is a batch of one


def test_unsupported_device(bert_dir):
    for dev in ("tpu", "cuda:99", ""):
        _raises(InputError, lambda: nbformer.load(bert_dir, device=dev), "device", repr(dev))


# ---------------------------------------------------------------- Embedder
def test_embedder_truncates_long_text(embedder):
    tok = embedder.tokenizer
    words = ["hello", "world", "music", "river", "green", "house"]
    for w in words:  # each word is one word-piece, so a token prefix is a word prefix
        assert len(tok.encode(w, add_special_tokens=False)) == 1
    text = " ".join(words[i % len(words)] for i in range(1000))
    assert embedder.max_seq_length == 256
    assert len(tok.encode_batch([text])[0][0]) == 256  # [CLS] + 254 words + [SEP]
    short = " ".join(text.split()[:254])
    e_long, e_short = embedder.encode([text, short])
    assert np.isfinite(e_long).all()
    np.testing.assert_allclose(e_long, e_short, atol=1e-6)
    assert not np.allclose(e_long, embedder.encode(" ".join(text.split()[:200])), atol=1e-4)


def test_embedder_empty_list(embedder):
    out = embedder.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_embedder_empty_string(embedder):
    out = embedder.encode([""])
    assert out.shape == (1, 384) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert abs(np.linalg.norm(out[0]) - 1.0) < 1e-5
    single = embedder.encode("")
    assert single.shape == (384,)


@pytest.mark.parametrize("texts,where", [([1, "a"], "texts[0]"), (["a", None], "texts[1]"),
                                         (["a", b"bytes"], "texts[1]"), (123, "texts"), (None, "texts")])
def test_embedder_non_str(embedder, texts, where):
    _raises(InputError, lambda: embedder.encode(texts), where, "str")


def test_embedder_bad_batch_size(embedder):
    _raises(InputError, lambda: embedder.encode(["a"], batch_size=0), "batch_size")


def test_embedder_on_decoder(gpt2_dir):
    _raises(ConfigError, lambda: Embedder(gpt2_dir), str(gpt2_dir), "encoder", "decoder")


def test_embedder_missing_model(tmp_path):
    _raises(NbformerError, lambda: Embedder(tmp_path / "nothing"), str(tmp_path / "nothing"))


# ---------------------------------------------------------------- generate
@pytest.mark.parametrize("kw,name", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
])
def test_generate_bad_options(gpt2, kw, name):
    opts = dict(max_new_tokens=2, temperature=0.7, seed=0)
    opts.update(kw)
    _raises(InputError, lambda: gpt2.generate([[1, 2, 3]], **opts), name, repr(kw[name]))


def test_generate_past_positions(gpt2):
    _raises(InputError, lambda: gpt2.generate([list(range(10))], max_new_tokens=23), "10", "23", "32")
    out = gpt2.generate([list(range(10))], max_new_tokens=22)  # exactly fills the table
    assert out.shape == (1, 32)


def test_generate_text_past_positions(gpt2):
    _raises(InputError, lambda: gpt2.generate("hello world", max_new_tokens=40), "40", "32")


def test_generate_bad_prompt_ids(gpt2):
    _raises(InputError, lambda: gpt2.generate([[1, 2, V_GPT]], max_new_tokens=2), "input_ids", V_GPT)
    _raises(InputError, lambda: gpt2.generate([[1, 2], [3]], max_new_tokens=2), "input_ids")


def test_encoder_cannot_generate(bert):
    _raises(InputError, lambda: bert.generate([[1, 2, 3]], max_new_tokens=2), "encoder")


def test_text_prompt_without_tokenizer(tmp_path, gpt2_dir):
    d = _copy(gpt2_dir, tmp_path / "m")
    os.remove(d / "tokenizer.json")
    m = nbformer.load(d)
    _raises(InputError, lambda: m.generate("hello", max_new_tokens=2), "tokenizer.json")


def test_corrupt_tokenizer(tmp_path, gpt2_dir):
    d = _copy(gpt2_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{not json")
    m = nbformer.load(d)
    _raises(WeightsError, lambda: m.generate("hello", max_new_tokens=2), str(d / "tokenizer.json"))
