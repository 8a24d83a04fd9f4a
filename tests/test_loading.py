"""Positive loading paths: HF dirs, sentence-transformers dirs, sharded checkpoints, nbformer's
own checkpoints, F16/BF16 tensors, inverse name mapping, and no torch / no unpickling."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_close

import nbformer
from nbformer.defaults import default_embedder_path
from nbformer.weights import load_checkpoint, save_native
from nbformer.weights.safetensors_io import SafetensorsFile

IDS = np.array([[5, 17, 3, 88, 42, 1, 0, 9], [7, 7, 7, 2, 60, 31, 99, 4]], dtype=np.int64)  # (B, T)
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], dtype=np.int64)


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """Random-init HF BERT and GPT-2 saved as safetensors, plus their torch outputs on IDS."""
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=40)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=None, eos_token_id=None)).eval()
    bd, gd = tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("gpt2")
    bert.save_pretrained(bd, safe_serialization=True)
    gpt2.save_pretrained(gd, safe_serialization=True)
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(IDS), torch.tensor(MASK)
        b_out = bert(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
        g_out = gpt2(input_ids=t_ids).logits.numpy()
    return {"bert": (bd, b_out), "gpt2": (gd, g_out)}


def _hf_tensors(d):
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def _forward(model, kind):
    return model.forward(IDS, attention_mask=MASK) if kind == "bert" else model.forward(IDS)


def _check_vs_torch(model, kind, ref):
    out = _forward(model, kind)
    if kind == "bert":  # padded positions of an encoder are not meaningful
        out, ref = out[MASK.astype(bool)], ref[MASK.astype(bool)]
    assert_close(out, ref, atol=1e-4, rtol=0, what=f"{kind} output")


# ---------------------------------------------------------------- HF directories
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_dir(oracles, kind):
    d, ref = oracles[kind]
    m = nbformer.load(d)
    assert m.config.family == kind
    assert m.config.arch == ("encoder" if kind == "bert" else "decoder")
    _check_vs_torch(m, kind, ref)
    m_str = nbformer.load(str(d))  # str and Path both work
    np.testing.assert_array_equal(_forward(m_str, kind), _forward(m, kind))


def test_hf_dir_with_model_prefix(oracles, tmp_path):
    """BertForXxx checkpoints prefix the encoder tensors with 'bert.'."""
    from safetensors.numpy import save_file

    d, ref = oracles["bert"]
    out = tmp_path / "prefixed"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    save_file({"bert." + k: v for k, v in _hf_tensors(d).items()}, str(out / "model.safetensors"))
    _check_vs_torch(nbformer.load(out), "bert", ref)


def test_hf_safetensors_file_beside_config(oracles):
    d, ref = oracles["gpt2"]
    _check_vs_torch(nbformer.load(d / "model.safetensors"), "gpt2", ref)


# ---------------------------------------------------------------- sentence-transformers directories
def test_sentence_transformers_dir():
    d = default_embedder_path()
    m = nbformer.load(d)
    assert m.config.family == "bert" and m.config.d_model == 384 and m.config.n_layers == 6
    assert m.num_parameters == 22_565_376
    assert m.ckpt.tokenizer_file is not None
    emb = nbformer.Embedder(d)
    v = emb.encode(["a sentence", "another one"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_sentence_transformers_subfolder_layout(tmp_path):
    """Older sentence-transformers save the encoder in 0_Transformer/ (named by modules.json)."""
    src = default_embedder_path()
    root = tmp_path / "st"
    sub = root / "0_Transformer"
    sub.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json"):
        if (src / name).exists():
            os.symlink(src / name, sub / name)
    shutil.copytree(src / "1_Pooling", root / "1_Pooling")
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    m = nbformer.load(root)
    assert m.config.d_model == 384
    emb, ref = nbformer.Embedder(root), nbformer.Embedder(src)
    assert emb.max_seq_length == ref.max_seq_length == 256  # sentence_bert_config.json in the sub-folder
    texts = ["short text", " ".join(["word"] * 400)]
    np.testing.assert_allclose(emb.encode(texts), ref.encode(texts), atol=1e-6)


# ---------------------------------------------------------------- sharded checkpoints
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_sharded_dir(oracles, tmp_path, kind):
    from safetensors.numpy import save_file

    d, ref = oracles[kind]
    t = _hf_tensors(d)
    names = sorted(t)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: t[k] for k in keys}, str(out / fname))
        weight_map.update({k: fname for k in keys})
    total = sum(v.nbytes for v in t.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert not (out / "model.safetensors").exists()
    sharded, single = nbformer.load(out), nbformer.load(d)
    assert sharded.ckpt.params.keys() == single.ckpt.params.keys()
    for k in single.ckpt.params:
        np.testing.assert_array_equal(sharded.ckpt.params[k], single.ckpt.params[k], err_msg=k)
    np.testing.assert_array_equal(_forward(sharded, kind), _forward(single, kind))
    _check_vs_torch(sharded, kind, ref)


def test_sharded_dir_missing_shard(oracles, tmp_path):
    from safetensors.numpy import save_file

    d, _ = oracles["bert"]
    t = _hf_tensors(d)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    save_file(t, str(out / "model-00001-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
        "pooler.dense.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(nbformer.WeightsError, match="model-00002-of-00002.safetensors"):
        nbformer.load(out)


# ---------------------------------------------------------------- nbformer native checkpoints
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_native_round_trip(oracles, tmp_path, kind):
    d, ref = oracles[kind]
    ck = load_checkpoint(d)
    path = tmp_path / "native.safetensors"
    save_native(path, ck.config, ck.params, metadata={"note": "round trip"})
    m = nbformer.load(path)
    assert m.config == ck.config
    assert m.ckpt.metadata.get("note") == "round trip"
    assert m.ckpt.params.keys() == ck.params.keys()
    for k, v in ck.params.items():
        np.testing.assert_array_equal(m.ckpt.params[k], v, err_msg=k)
    np.testing.assert_array_equal(_forward(m, kind), _forward(nbformer.load(d), kind))
    _check_vs_torch(m, kind, ref)
    # native checkpoints map names by identity
    back = m.ckpt.to_checkpoint_names(m.ckpt.params)
    assert back.keys() == ck.params.keys()


# ---------------------------------------------------------------- dtypes
def _bf16_bits(a32):
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(a32, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _write_safetensors(path, tensors: dict, metadata=None):
    """Hand-written safetensors file: tensors = name -> (dtype string, shape, raw bytes)."""
    header, blobs, off = {}, [], 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_bf16_and_f16_tensors(tmp_path, rng):
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float32)
    bits = _bf16_bits(a)
    f = tmp_path / "mixed.safetensors"
    _write_safetensors(f, {"bf": ("BF16", a.shape, bits.astype("<u2").tobytes()),
                           "h": ("F16", b.shape, b.astype("<f2").tobytes()),
                           "s": ("F32", b.shape, b.astype("<f4").tobytes())})
    st = SafetensorsFile(f)
    bf, h, s = st.get("bf"), st.get("h"), st.get("s")
    want_bf = (bits.astype(np.uint32) << 16).view(np.float32)
    assert bf.dtype == np.float32 and bf.shape == (3, 5)
    np.testing.assert_array_equal(bf, want_bf)
    assert np.abs(bf - a).max() <= np.abs(a).max() * 2.0 ** -8  # bf16 keeps 8 significant bits
    np.testing.assert_array_equal(h.astype(np.float32), b.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s, b)
    # a few exact values, including signs, zero and powers of two
    exact = np.array([0.0, -0.0, 1.0, -2.0, 0.5, 3.140625, -1e-3], dtype=np.float32)
    g = tmp_path / "exact.safetensors"
    _write_safetensors(g, {"x": ("BF16", exact.shape, _bf16_bits(exact).tobytes())})
    got = SafetensorsFile(g).get("x")
    np.testing.assert_array_equal(got[:6], exact[:6])
    assert abs(got[6] - exact[6]) < 1e-5


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_model(oracles, tmp_path, dtype):
    d, _ = oracles["bert"]
    t = _hf_tensors(d)
    out = tmp_path / dtype
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    if dtype == "F16":
        from safetensors.numpy import save_file

        save_file({k: v.astype(np.float16) for k, v in t.items()}, str(out / "model.safetensors"))
        rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in t.items()}
    else:
        _write_safetensors(out / "model.safetensors",
                           {k: ("BF16", v.shape, _bf16_bits(v).tobytes()) for k, v in t.items()},
                           metadata={"format": "pt"})
        rounded = {k: (_bf16_bits(v).astype(np.uint32) << 16).view(np.float32) for k, v in t.items()}
    half = nbformer.load(out)
    for k, v in half.ckpt.to_checkpoint_names(half.ckpt.params).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, rounded[k], err_msg=k)
    # the same rounded weights stored as F32 give the same numbers
    from safetensors.numpy import save_file

    ref_dir = tmp_path / (dtype + "-as-f32")
    ref_dir.mkdir()
    shutil.copy(d / "config.json", ref_dir / "config.json")
    save_file(rounded, str(ref_dir / "model.safetensors"))
    np.testing.assert_array_equal(_forward(half, "bert"), _forward(nbformer.load(ref_dir), "bert"))


# ---------------------------------------------------------------- inverse mapping
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_to_checkpoint_names_inverts_rules(oracles, kind):
    d, _ = oracles[kind]
    hf = _hf_tensors(d)
    ck = load_checkpoint(d)
    back = ck.to_checkpoint_names(ck.params)
    unused = {k for k in hf if k.startswith("pooler.")}  # BertModel's pooler is not part of the encoder
    assert set(back) == set(hf) - unused
    for k, v in back.items():
        assert v.shape == hf[k].shape, k
        assert v.dtype == np.float32 and v.flags.c_contiguous, k
        np.testing.assert_array_equal(v, hf[k], err_msg=k)
    C = 32
    if kind == "bert":  # q/k/v are concatenated rows of one (3C, C) matrix
        a = "encoder.layer.0.attention.self."
        qkv = ck.params["h0.attn.qkv.w"]
        assert qkv.shape == (3 * C, C)
        for i, part in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(qkv[i * C:(i + 1) * C], hf[a + part + ".weight"])
            np.testing.assert_array_equal(ck.params["h0.attn.qkv.b"][i * C:(i + 1) * C], hf[a + part + ".bias"])
    else:  # Conv1D (in, out) is stored transposed as (out, in)
        p = "transformer.h.0."
        np.testing.assert_array_equal(ck.params["h0.attn.qkv.w"], hf[p + "attn.c_attn.weight"].T)
        np.testing.assert_array_equal(ck.params["h0.ffn.up.w"], hf[p + "mlp.c_fc.weight"].T)
        assert ck.params["h0.ffn.up.w"].shape == (4 * C, C)
    # gradients-like arrays (not the params themselves) map back too, keyed by HF names
    fake = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in ck.params.items()}
    g = ck.to_checkpoint_names(fake)
    assert set(g) == set(back) and all(g[k].shape == hf[k].shape for k in g)


# ---------------------------------------------------------------- no torch, no pickle
def test_loading_does_not_import_torch(oracles):
    d, _ = oracles["gpt2"]
    code = ("import sys, numpy as np, nbformer\n"
            "m = nbformer.load(sys.argv[1])\n"
            "out = m.forward(np.array([[1, 2, 3]]))\n"
            "assert out.shape == (1, 3, 128) and np.isfinite(out).all()\n"
            "e = nbformer.Embedder(sys.argv[2]).encode(['hi'])\n"
            "assert e.shape == (1, 384)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'sentence_transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(d), str(default_embedder_path())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"], r.stdout + r.stderr
