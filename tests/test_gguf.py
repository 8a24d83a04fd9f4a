"""GGUF files (issue 12): random-init LlamaForCausalLM weights written as GGUF the way llama.cpp's
converter does (Q/K permuted, llama.* keys), loaded by nbformer: F32 logits vs transformers (the HF
model on the same weights, and transformers' own GGUF loader), quantized files vs a float64
reference on the dequantized weights, gradients keyed by the GGUF names, the tokenizer rebuilt
from the metadata, inspect / generate on a .gguf path, and hostile files (one NbformerError each,
no memory blow-up)."""
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import nbformer  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from cli.main import main as cli_main  # noqa: E402
from conftest import assert_close  # noqa: E402
from gguf_files import (CHATML_TEMPLATE, hf_llama_tensors, tiny_tokenizer_json, tokenizer_size,  # noqa: E402
                        write_llama_gguf)
from nbformer.errors import ConfigError, NbformerError, WeightsError  # noqa: E402
from nbformer.weights.gguf_io import GGUFFile, permute_gguf_qk, tensor_to_float32  # noqa: E402
from nbformer.weights.gguf_tokenizer import tokenizer_json_from_gguf  # noqa: E402

torch.set_num_threads(2)

# (NH, NKV, C, F, tied, theta): GQA 4:1 untied, GQA 3:1 (odd head count) tied
CASES = {"gqa4_untied": (4, 1, 64, 96, False, 5e5), "gqa3_tied": (3, 1, 48, 64, True, 1e6)}
IDS = np.array([[1, 5, 17, 99, 250, 3, 7, 42, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1]])


def hf_model(NH, NKV, C, F, tied, theta, V=300, seed=0, rope=None):
    torch.manual_seed(seed)
    rope_kw = {"rope_parameters": {"rope_theta": theta, **rope}} if rope else {"rope_theta": theta}
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=2,
                                   num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=96,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2, rms_norm_eps=1e-5,
                                   **rope_kw)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def tok_json():
    return tiny_tokenizer_json()


@pytest.fixture(scope="module", params=sorted(CASES))
def f32_case(request, tmp_path_factory, tok_json):
    m = hf_model(*CASES[request.param])
    d = tmp_path_factory.mktemp(request.param)
    path = d / "model.gguf"
    write_llama_gguf(path, m.config, hf_llama_tensors(m), "F32", tokenizer_json=tok_json, chat_template=CHATML_TEMPLATE)
    return m, path


def torch_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.double().numpy()


def test_f32_logits_match_transformers(f32_case):
    m, path = f32_case
    nm = nbformer.load(path)
    cfg = nm.config
    assert (cfg.family, cfg.n_kv_heads, cfg.tie_word_embeddings) == ("llama", 1, m.config.tie_word_embeddings)
    assert cfg.rope_theta == m.config.rope_parameters["rope_theta"]
    assert_close(nm.forward(IDS), torch_logits(m, IDS), atol=1e-4, rtol=0, what="gguf F32 logits vs transformers")


def test_f32_logits_match_transformers_gguf_loader(f32_case):
    """transformers reads the same file with its own GGUF code (an independent reader of llama.cpp's layout)."""
    pytest.importorskip("accelerate")
    _m, path = f32_case
    hm = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert_close(nbformer.load(path).forward(IDS), torch_logits(hm, IDS), atol=1e-4, rtol=0,
                 what="gguf F32 logits vs transformers' GGUF loader")


def test_greedy_generation_matches_transformers(f32_case):
    m, path = f32_case
    nm = nbformer.load(path)
    prompt = IDS[:1, :5]
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0).numpy()
    got = nm.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert np.array_equal(got, want)


def test_gradients_keyed_by_gguf_names(f32_case):
    m, path = f32_case
    nm = nbformer.load(path)
    ids = IDS[:1]
    loss, grads = nm.loss_and_grads(ids, ids)
    m.zero_grad()
    out = m(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-4
    NH, NKV = m.config.num_attention_heads, m.config.num_key_value_heads
    hf = {n: p.grad.double().numpy() for n, p in m.named_parameters()}
    pairs = {"blk.1.attn_q.weight": permute_gguf_qk(hf["model.layers.1.self_attn.q_proj.weight"], NH),
             "blk.1.attn_k.weight": permute_gguf_qk(hf["model.layers.1.self_attn.k_proj.weight"], NKV),
             "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
             "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
             "token_embd.weight": hf["model.embed_tokens.weight"]}
    for name, want in pairs.items():
        got = grads[name]
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
        assert err <= 1e-4, f"{name}: gradient error {err:.2e} relative to its largest"


@pytest.mark.parametrize("qtype,emb", [("Q8_0", "Q8_0"), ("Q4_1", "Q8_0"), ("Q4_0", None), ("F16", None),
                                       ("BF16", None)])
def test_quantized_files_vs_float64_reference(tmp_path, qtype, emb):
    """Q/K rows of packed blocks are un-permuted and Q|K|V, gate|up stacked as blocks; the model then
    equals a float64 LlamaForCausalLM on the dequantized weights."""
    m = hf_model(*CASES["gqa4_untied"])
    path = tmp_path / f"{qtype}.gguf"
    held = write_llama_gguf(path, m.config, hf_llama_tensors(m), qtype, emb_qtype=emb)
    gf = GGUFFile(path)
    want_t = {"Q8_0": "Q8_0", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "F16": "F16", "BF16": "BF16"}[qtype]
    assert gf.tensors["blk.0.attn_q.weight"].type_name == want_t
    assert gf.tensors["blk.0.attn_q.weight"].shape == (64, 64)
    nm = nbformer.load(path)
    NH, NKV = m.config.num_attention_heads, m.config.num_key_value_heads
    ref = hf_model(*CASES["gqa4_untied"]).double()
    sd = {}
    inv = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    for i in range(2):
        for g, h in (("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                     ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            inv[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    from nbformer.weights.hf_llama import unpermute_gguf_qk

    for g, a in held.items():
        if g.endswith("attn_q.weight"):
            a = unpermute_gguf_qk(a, NH)
        elif g.endswith("attn_k.weight"):
            a = unpermute_gguf_qk(a, NKV)
        sd[inv[g]] = torch.tensor(a, dtype=torch.float64)
    ref.load_state_dict(sd)
    want = torch_logits(ref, IDS)
    assert_close(nm.forward(IDS), want, atol=1e-4, rtol=0, what=f"{qtype} GGUF logits vs float64 reference")
    if qtype != "F16" and qtype != "BF16":  # and the quantization really changed the weights
        assert np.abs(want - torch_logits(m, IDS)).max() > 1e-4
        from nbformer.weights.gguf_io import bytes_per_token

        bpt = bytes_per_token(nm.ckpt)  # kept quantized: a token reads the file's bytes (but one embedding row)
        assert abs(bpt["loaded"] - bpt["stored"]) <= 4 * 64, bpt


def test_gpt2_architecture(tmp_path, tok_json):
    """llama.cpp's gpt2 layout (fused attn_qkv, position_embd, LayerNorm biases) vs transformers."""
    from gguf_files import write_gpt2_gguf

    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=tokenizer_size(tok_json), n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path / "gpt2.gguf"
    write_gpt2_gguf(path, cfg, hf_llama_tensors(m), tokenizer_json=tok_json)
    nm = nbformer.load(path)
    assert (nm.config.family, nm.config.positions, nm.config.tie_word_embeddings) == ("gpt2", "learned", True)
    ids = IDS % cfg.vocab_size
    assert_close(nm.forward(ids), torch_logits(m, ids), atol=1e-4, rtol=0, what="gpt2 GGUF logits vs transformers")
    from nbformer.tokenizer import Tokenizer

    assert nm.tokenizer.encode("Hello world") == Tokenizer(json_text=tok_json).encode("Hello world")


def test_qwen2_architecture(tmp_path, tok_json):
    """'qwen2': Q/K/V biases, Q/K rows as Hugging Face stores them (llama.cpp rotates halves),
    vs transformers' Qwen2ForCausalLM and its GGUF loader."""
    pytest.importorskip("accelerate")
    torch.manual_seed(4)
    cfg = transformers.Qwen2Config(vocab_size=tokenizer_size(tok_json), hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                   max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True,
                                   rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    path = tmp_path / "qwen2.gguf"
    write_llama_gguf(path, cfg, hf_llama_tensors(m), arch="qwen2", permute=False, tokenizer_json=tok_json)
    nm = nbformer.load(path)
    assert nm.config.qkv_bias and not nm.config.attn_out_bias
    ids = IDS % cfg.vocab_size
    assert_close(nm.forward(ids), torch_logits(m, ids), atol=1e-4, rtol=0, what="qwen2 GGUF logits vs transformers")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert_close(nm.forward(ids), torch_logits(hm, ids), atol=1e-4, rtol=0, what="qwen2 vs transformers' GGUF loader")


def test_checked_reader_reads_what_the_library_reads(f32_case):
    _m, path = f32_case
    gf = GGUFFile(path)
    lib = gguf.GGUFReader(str(path))
    assert gf.metadata == {k: f.contents() for k, f in lib.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.tensors) == [t.name for t in lib.tensors]
    for t in lib.tensors:
        rec = gf.tensors[t.name]
        assert rec.type_name == t.tensor_type.name and rec.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(rec.data, np.asarray(t.data)) and rec.offset == t.data_offset


def test_tensor_to_float32_matches_gguf_dequantize(rng):
    a = rng.normal(size=(4, 64)).astype(np.float32)
    for t in ("Q8_0", "Q4_0", "Q4_1"):
        qt = getattr(gguf.GGMLQuantizationType, t)
        q = gguf.quants.quantize(a, qt)
        from nbformer.weights.gguf_io import TensorRecord

        rec = TensorRecord("w", t, (4, 64), q)
        got = tensor_to_float32(rec)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, gguf.quants.dequantize(q, qt).astype(np.float32))
        sub = rec.rows([3, 1])  # packed rows pick like float rows
        assert np.array_equal(tensor_to_float32(sub), got[[3, 1]])


# ---------------------------------------------------------------- tokenizer from metadata
TEXTS = ["Hello world, the capital of France is Paris.", "café naïve façade — Ünïcödé ß", "emoji 😀🎉 👍🏽 done",
         "def f(x):\n    return x ** 2  # square\n\tindent", "numbers 12345 3.14159 1,000,000 and 2024-12-02",
         "<|im_start|>user\nhi there<|im_end|>\n", "  leading and trailing spaces  ", "", "ALLCAPS MixedCase don't",
         "中文字符 日本語 한국어 عربى"]


@pytest.mark.parametrize("digits", [True, False], ids=["smollm_pre", "gpt2_pre"])
def test_tokenizer_round_trip_same_ids(tmp_path, digits):
    """A byte-level BPE written into GGUF metadata (write_tokenizer_metadata) and rebuilt from it
    gives the ids and text of the original tokenizer.json."""
    from tokenizers import Tokenizer

    tj = tiny_tokenizer_json(digits=digits)
    m = hf_model(4, 1, 64, 96, False, 5e5, V=tokenizer_size(tj))
    path = tmp_path / "t.gguf"
    write_llama_gguf(path, m.config, hf_llama_tensors(m), tokenizer_json=tj)
    gf = GGUFFile(path)
    assert gf.metadata["tokenizer.ggml.pre"] == ("smollm" if digits else "gpt2")
    orig = Tokenizer.from_str(tj)
    tok = nbformer.load(path).tokenizer
    for s in TEXTS:
        want = orig.encode(s, add_special_tokens=False).ids
        assert tok.encode(s, add_special_tokens=False) == want, s
        assert tok.decode(want, skip_special_tokens=False) == orig.decode(want, skip_special_tokens=False)
    assert tok.decode(tok.encode("<|im_start|>a<|im_end|>")) == "a"  # control tokens are special


def test_tokenizer_matches_transformers_gguf_tokenizer(f32_case):
    """transformers builds its own tokenizer from the same GGUF metadata."""
    _m, path = f32_case
    ht = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = nbformer.load(path).tokenizer
    for s in TEXTS:
        if any(ch.isdigit() for ch in s):  # transformers' GGUF tokenizer does not split digits for 'smollm'
            continue
        assert tok.encode(s, add_special_tokens=False) == ht(s, add_special_tokens=False)["input_ids"], s


def test_sentencepiece_style_vocab(tmp_path):
    """tokenizer.ggml.model 'llama': merges derived from the scores, byte fallback, BOS added,
    the same ids as transformers' tokenizer built from the same file."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld",
             "▁world", "a", "t", "▁a", "at", "▁at", "c", "▁c", "ca", "▁cat"]
    tokens = pieces + words
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json_from_gguf(md, "test"))
    enc = tok.encode("hello world cat").ids
    assert enc[0] == 1 and tokens[enc[1]] == "▁hello" and tokens[enc[2]] == "▁world" and tokens[enc[3]] == "▁cat"
    z = tok.encode("hé").ids  # 'é' is not in the vocabulary: its UTF-8 bytes
    assert [tokens[i] for i in z[1:]] == ["▁", "h", "<0xC3>", "<0xA9>"]
    assert tok.decode(z, skip_special_tokens=True) == "hé"
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for s in ("hello world cat", "a cat at the world", "hé hello", "world  cat"):
        assert tok.encode(s).ids == ht(s)["input_ids"], s


def test_sentencepiece_model_vocab_matches_sentencepiece(tmp_path):
    """A sentencepiece BPE model with byte fallback (Llama's settings: identity normalization, no
    whitespace folding, single digits) put into GGUF metadata the way llama.cpp's converter does
    (pieces, scores, token types): the rebuilt tokenizer gives sentencepiece's own ids and text."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 30), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def kind(i):
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                5 if sp.is_unused(i) else 1)

    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
          "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
          "tokenizer.ggml.token_type": [kind(i) for i in range(n)], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(md, "spm"))
    # and back: that tokenizer.json written by write_tokenizer_metadata (what `nbformer quantize`
    # does), read again, once with its merges and once from the scores alone (what llama.cpp uses)
    from nbformer.weights.gguf_tokenizer import write_tokenizer_metadata

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    write_tokenizer_metadata(w, tok.to_str(), bos_token_id=1, eos_token_id=2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = GGUFFile(path).metadata
    assert back["tokenizer.ggml.model"] == "llama" and back["tokenizer.ggml.add_bos_token"] is True
    assert back["tokenizer.ggml.token_type"][3:259] == [6] * 256 and back["tokenizer.ggml.token_type"][:3] == [2, 3, 3]
    again = Tokenizer.from_str(tokenizer_json_from_gguf(back, "written"))
    no_merges = {k: v for k, v in back.items() if k != "tokenizer.ggml.merges"}
    from_scores = Tokenizer.from_str(tokenizer_json_from_gguf(no_merges, "scores"))
    for s in TEXTS + [" x", "new\nlines\n\n", "Paris, 1889"]:
        if "<|" in s:  # ChatML markers are no tokens of this vocabulary
            continue
        want = [1] + sp.encode(s)  # llama.cpp adds BOS for a 'llama' vocabulary by default
        assert tok.encode(s).ids == want, s
        assert again.encode(s).ids == want, s
        assert from_scores.encode(s).ids == want, s
        assert tok.decode(want, skip_special_tokens=True) == sp.decode(want[1:]), s


def test_unknown_pre_tokenizer_is_named():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon", "tokenizer.ggml.tokens": ["a", "b"],
          "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ConfigError, match="klingon"):
        tokenizer_json_from_gguf(md, "x.gguf")


# ---------------------------------------------------------------- the CLI on a .gguf path
def test_generate_and_inspect_cli(f32_case):
    _m, path = f32_case
    r = CliRunner().invoke(cli_main, ["generate", "--model", str(path), "-n", "4", "Hello world"])
    assert r.exit_code == 0, r.output
    want = nbformer.load(path).generate("Hello world", max_new_tokens=4)
    assert r.output.strip().startswith(want.strip()[:11])
    r = CliRunner().invoke(cli_main, ["inspect", str(path), "--seq", "16"])
    assert r.exit_code == 0, r.output
    for s in ("GGUF v3", "llama.attention.head_count_kv = 1", "tokenizer.ggml.pre = smollm", "tensor types: F32",
              "weight bytes read per decoded token", "tokenizer.chat_template"):
        assert s in r.output, s


# ---------------------------------------------------------------- rotary scaling: rope_freqs (Llama 3.1), linear
# head size 16 and an original context of 32: the 40 positions below run past it, and the wavelengths
# 2 pi 10^(i/2) fall in all three llama3 bands (kept, interpolated, divided by the factor)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
IDS40 = np.random.default_rng(11).integers(0, 300, (2, 40))


def llama3_rope_freqs(hf_cfg) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: the F32 freq_factors of 'rope_freqs'.
    (The converter reads original_max_position_embeddings from the top level of config.json, default
    8192; these configs keep it in the rope dict, where transformers reads it.)"""
    import math

    rp = hf_cfg.rope_parameters
    dim = hf_cfg.head_dim
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def write_with_tensors(path, hf_cfg, sd, tensors: dict, **kw):
    """write_llama_gguf with extra tensors written first (the converter yields rope_freqs before the weights)."""
    base = gguf.GGUFWriter

    class Writer(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            for name, arr in tensors.items():
                self.add_tensor(name, arr)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFWriter", Writer)
        return write_llama_gguf(path, hf_cfg, sd, **kw)


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory, tok_json):
    m = hf_model(4, 2, 64, 96, False, 1e4, V=tokenizer_size(tok_json), seed=6, rope=LLAMA3)
    path = tmp_path_factory.mktemp("llama3") / "llama3.gguf"
    write_with_tensors(path, m.config, hf_llama_tensors(m), {"rope_freqs.weight": llama3_rope_freqs(m.config)},
                       tokenizer_json=tok_json)
    return m, path


def test_llama3_rope_freqs_f32_matches_transformers(llama3_file, tmp_path):
    """rope_freqs.weight divides the frequencies (llama.cpp's freq_factors): F32 logits over 40 positions and
    greedy KV-cache generation vs transformers' llama3 rope; the file without the tensor is a different model."""
    from nbformer.weights.positions import rope_inv_freq_of

    m, path = llama3_file
    nm = nbformer.load(path)
    c = nm.config
    assert c.rope_scaling == "none" and len(c.rope_freq_factors) == 8
    assert_close(rope_inv_freq_of(c), m.model.rotary_emb.inv_freq.double().numpy(), atol=0, rtol=1e-6,
                 what="inv_freq vs transformers")
    ids = IDS40 % m.config.vocab_size
    want = torch_logits(m, ids)
    assert_close(nm.forward(ids), want, atol=1e-4, rtol=0, what="llama3 GGUF F32 logits vs transformers")
    plain = tmp_path / "plain.gguf"
    write_llama_gguf(plain, m.config, hf_llama_tensors(m))
    assert np.abs(nbformer.load(plain).forward(ids) - want).max() > 1e-3  # the factors do matter here (10x tol)
    import reference as ref64  # the float64 reference divides by the factors too

    want64 = ref64.llama_forward(c, nm.ckpt.params, ids)
    assert_close(want64, want, atol=1e-4, rtol=0, what="float64 reference with rope_freqs vs transformers")
    prompt = ids[:1, :30]
    with torch.no_grad():
        ref_out = m.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()
    assert np.array_equal(nm.generate(prompt, max_new_tokens=10, stop_at_eos=False), ref_out)


def test_linear_rope_scaling_gguf_matches_transformers(tmp_path, tok_json):
    m = hf_model(4, 2, 64, 96, True, 1e4, seed=7, rope={"rope_type": "linear", "factor": 4.0})
    path = tmp_path / "linear.gguf"
    write_llama_gguf(path, m.config, hf_llama_tensors(m),
                     extra_keys={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    nm = nbformer.load(path)
    assert (nm.config.rope_scaling, nm.config.rope_factor, nm.config.rope_freq_factors) == ("linear", 4.0, ())
    ids = IDS40 % m.config.vocab_size
    assert_close(nm.forward(ids), torch_logits(m, ids), atol=1e-4, rtol=0, what="linear GGUF logits vs transformers")


def test_quantize_keeps_the_rope_scaling(tmp_path, llama3_file):
    """`nbformer quantize` of a llama3 HF dir writes rope_freqs.weight as the converter does (and no scaling
    type key); of a GGUF file with rope_freqs, the same factors; of a linear model, the scaling keys. Loaded
    back, the rotation is the source's: same logits as the source config on the file's own weights."""
    from nbformer.model import Model
    from nbformer.quant.gguf_writer import _float_params
    from nbformer.weights import Checkpoint
    from nbformer.weights.positions import rope_inv_freq_of

    m, f32_path = llama3_file
    src = tmp_path / "hf"
    m.save_pretrained(src, safe_serialization=True)
    out = tmp_path / "q8.gguf"
    r = CliRunner().invoke(cli_main, ["quantize", str(src), "-t", "q8_0", "-o", str(out), "--no-tokenizer"])
    assert r.exit_code == 0, r.output
    rd = gguf.GGUFReader(str(out))
    t = {x.name: x for x in rd.tensors}["rope_freqs.weight"]
    assert t.tensor_type.name == "F32" and "llama.rope.scaling.type" not in rd.fields
    assert_close(np.asarray(t.data, np.float64), llama3_rope_freqs(m.config), atol=0, rtol=1e-6,
                 what="rope_freqs vs convert_hf_to_gguf")
    q = nbformer.load(out)
    src_cfg = nbformer.load(src).config
    assert_close(rope_inv_freq_of(q.config), rope_inv_freq_of(src_cfg), atol=0, rtol=1e-6)
    ids = IDS40 % m.config.vocab_size
    same = Model(Checkpoint(src_cfg, _float_params(q.ckpt), [], Path("ref")))
    assert_close(q.forward(ids), same.forward(ids), atol=1e-5, rtol=0, what="quantized file vs source rope")
    # GGUF -> GGUF keeps the factors bit for bit
    again = tmp_path / "again.gguf"
    r = CliRunner().invoke(cli_main, ["quantize", str(f32_path), "-t", "q8_0", "-o", str(again)])
    assert r.exit_code == 0, r.output
    assert nbformer.load(again).config.rope_freq_factors == nbformer.load(f32_path).config.rope_freq_factors
    # linear: the scaling keys
    lin = hf_model(4, 2, 64, 96, True, 1e4, seed=7, rope={"rope_type": "linear", "factor": 4.0})
    lin.save_pretrained(tmp_path / "lin", safe_serialization=True)
    r = CliRunner().invoke(cli_main, ["quantize", str(tmp_path / "lin"), "-t", "q8_0", "-o", str(tmp_path / "l.gguf"),
                                      "--no-tokenizer"])
    assert r.exit_code == 0, r.output
    lc = nbformer.load(tmp_path / "l.gguf").config
    assert (lc.rope_scaling, lc.rope_factor, lc.rope_freq_factors) == ("linear", 4.0, ())
    assert "rope_freqs.weight" not in GGUFFile(tmp_path / "l.gguf").tensors


# ---------------------------------------------------------------- hostile files
@pytest.fixture(scope="module")
def good_file(tmp_path_factory, tok_json):
    m = hf_model(4, 1, 64, 96, False, 5e5, V=tokenizer_size(tok_json))
    path = tmp_path_factory.mktemp("hostile") / "good.gguf"
    write_llama_gguf(path, m.config, hf_llama_tensors(m), "Q8_0", tokenizer_json=tok_json)
    return path, path.read_bytes(), m


def _variant(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _error(path, kind=WeightsError):
    tracemalloc.start()
    try:
        with pytest.raises(kind) as e:
            nbformer.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the error"
    msg = str(e.value)
    assert str(path) in msg
    return msg


def _after_key(data: bytes, key: str) -> int:
    """Offset just after a metadata key's name (where its u32 value type starts)."""
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k)
    return i + 8 + len(k)


def test_hostile_truncated(tmp_path, good_file):
    _p, data, _m = good_file
    assert "truncated" in _error(_variant(tmp_path, data[:10]))
    msg = _error(_variant(tmp_path, data[:len(data) // 3]))  # inside the header or the data
    assert "past the end" in msg or "truncated" in msg
    assert "truncated" in _error(_variant(tmp_path, data[:-40]))  # last tensor's data past the end (beyond its padding)
    _error(_variant(tmp_path, b""))


def test_hostile_magic_version(tmp_path, good_file):
    _p, data, _m = good_file
    assert "not a GGUF file" in _error(_variant(tmp_path, b"GGML" + data[4:]))
    assert "version 7" in _error(_variant(tmp_path, data[:4] + struct.pack("<I", 7) + data[8:]))
    assert "big-endian" in _error(_variant(tmp_path, data[:4] + struct.pack(">I", 3) + data[8:]))


def test_hostile_counts_and_lengths(tmp_path, good_file):
    _p, data, _m = good_file
    assert "tensors" in _error(_variant(tmp_path, data[:8] + struct.pack("<Q", 1 << 60) + data[16:]))
    assert "metadata entries" in _error(_variant(tmp_path, data[:16] + struct.pack("<Q", 1 << 40) + data[24:]))
    # the first key's length says 2^50 bytes
    assert "past the end" in _error(_variant(tmp_path, data[:24] + struct.pack("<Q", 1 << 50) + data[32:]))
    # the token list (an array of strings) claims 2^40 items
    at = _after_key(data, "tokenizer.ggml.tokens") + 8  # after the value type and the item type
    msg = _error(_variant(tmp_path, data[:at] + struct.pack("<Q", 1 << 40) + data[at + 8:]))
    assert "tokenizer.ggml.pre" in msg and "items" in msg  # names the key before it
    # a string inside that array claims 2^62 bytes
    at2 = at + 8
    assert "past the end" in _error(_variant(tmp_path, data[:at2] + struct.pack("<Q", 1 << 62) + data[at2 + 8:]))
    # an unknown metadata value type
    k = _after_key(data, "llama.block_count")
    assert "value type 77" in _error(_variant(tmp_path, data[:k] + struct.pack("<I", 77) + data[k + 4:]))


def _tensor_info(data: bytes, name: str) -> int:
    """Offset of a tensor record's n_dims (right after its name)."""
    k = name.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def test_hostile_tensor_records(tmp_path, good_file):
    _p, data, _m = good_file
    at = _tensor_info(data, "blk.0.attn_q.weight")
    nd = struct.unpack_from("<I", data, at)[0]
    typ = at + 4 + 8 * nd
    msg = _error(_variant(tmp_path, data[:typ] + struct.pack("<I", 99) + data[typ + 4:]))
    assert "unknown ggml type 99" in msg and "blk.0.attn_q.weight" in msg
    off = typ + 4
    msg = _error(_variant(tmp_path, data[:off] + struct.pack("<Q", 1 << 40) + data[off + 8:]))
    assert "blk.0.attn_q.weight" in msg and "file ends" in msg
    msg = _error(_variant(tmp_path, data[:off] + struct.pack("<Q", 7) + data[off + 8:]))
    assert "alignment" in msg
    msg = _error(_variant(tmp_path, data[:at] + struct.pack("<I", 9) + data[at + 4:]))
    assert "dimensions" in msg or "past the end" in msg
    # a dimension that makes the row length no multiple of Q8_0's 32-value blocks
    msg = _error(_variant(tmp_path, data[:at + 4] + struct.pack("<Q", 33) + data[at + 12:]))
    assert "block size" in msg


def test_hostile_shapes_disagree_with_metadata(tmp_path, good_file):
    _p, data, m = good_file
    k = _after_key(data, "llama.feed_forward_length") + 4
    msg = _error(_variant(tmp_path, data[:k] + struct.pack("<I", 128) + data[k + 4:]))
    assert "disagrees with the metadata" in msg and "ffn_gate" in msg
    k = _after_key(data, "llama.block_count") + 4  # 2^31 layers: refused before any per-layer work
    msg = _error(_variant(tmp_path, data[:k] + struct.pack("<I", 1 << 31) + data[k + 4:]))
    assert "block_count" in msg and "2 blocks" in msg
    k = _after_key(data, "llama.attention.head_count_kv") + 4
    msg = _error(_variant(tmp_path, data[:k] + struct.pack("<I", 3) + data[k + 4:]), ConfigError)
    assert "head_count_kv" in msg


def test_hostile_missing_tensor_and_unknown_architecture(tmp_path, tok_json):
    m = hf_model(4, 1, 64, 96, False, 5e5)
    p = tmp_path / "missing.gguf"
    write_llama_gguf(p, m.config, hf_llama_tensors(m), skip=("blk.1.ffn_up.weight",))
    assert "blk.1.ffn_up.weight" in _error(p)
    p = tmp_path / "falcon.gguf"
    write_llama_gguf(p, m.config, hf_llama_tensors(m), arch="falcon")
    msg = _error(p, ConfigError)
    assert "'falcon'" in msg and "llama" in msg
    p = tmp_path / "nan.gguf"
    bad = np.full((64, 64), np.nan, np.float32)
    write_llama_gguf(p, m.config, hf_llama_tensors(m), override={"blk.0.attn_output.weight": bad})
    assert "NaN" in _error(p)


def test_hostile_rope_scaling(tmp_path):
    """rope_freqs of the wrong shape / type, with NaN or zero, and an unknown scaling type: one clear error each."""
    m = hf_model(4, 1, 64, 96, False, 5e5)
    sd = hf_llama_tensors(m)
    cases = {"shape": (np.ones(7, np.float32), "shape (7,), expected (8,)"),
             "2d": (np.ones((1, 8), np.float32), "expected (8,)"),
             "nan": (np.array([1, 2, np.nan, 4, 1, 1, 1, 1], np.float32), "nan"),
             "zero": (np.array([1, 2, 0, 4, 1, 1, 1, 1], np.float32), "0.0"),
             "negative": (-np.ones(8, np.float32), "-1.0"),
             "int": (np.ones(8, np.int32), "ggml type I32")}
    for name, (arr, what) in cases.items():
        p = tmp_path / f"{name}.gguf"
        write_with_tensors(p, m.config, sd, {"rope_freqs.weight": arr})
        msg = _error(p)
        assert "rope_freqs.weight" in msg and what in msg, msg
    p = tmp_path / "f16.gguf"  # F16 factors are fine
    write_with_tensors(p, m.config, sd, {"rope_freqs.weight": np.full(8, 2.0, np.float16)})
    assert nbformer.load(p).config.rope_freq_factors == (2.0,) * 8
    p = tmp_path / "yarn.gguf"
    write_llama_gguf(p, m.config, sd, extra_keys={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    msg = _error(p, ConfigError)
    assert "'yarn'" in msg and "rope.scaling.type" in msg and "none, linear" in msg


def test_every_hostile_error_is_an_nbformer_error_on_the_cli(tmp_path, good_file):
    _p, data, _m = good_file
    p = _variant(tmp_path, data[:len(data) // 2])
    r = CliRunner().invoke(cli_main, ["inspect", str(p)])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output
    assert issubclass(WeightsError, NbformerError)


def test_hostile_random_mutations(tmp_path, good_file):
    """Random bytes / 8-byte values written into the header, and truncations anywhere: every file
    either loads and runs or fails with an NbformerError (nothing else escapes)."""
    _p, data, _m = good_file
    header_end = GGUFFile(_p).data_offset
    rng = np.random.default_rng(12)
    seen = {"ok": 0, "error": 0}
    p = tmp_path / "fuzz.gguf"
    for _ in range(80):
        b = bytearray(data)
        kind = rng.integers(0, 3)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                b[rng.integers(0, header_end)] = rng.integers(0, 256)
        elif kind == 1:
            o = int(rng.integers(0, header_end - 8))
            b[o:o + 8] = int(rng.integers(0, 2**63)).to_bytes(8, "little")
        else:
            b = b[:rng.integers(0, len(b))]
        p.write_bytes(bytes(b))
        try:
            nbformer.load(p).forward(IDS[:1, :3])
            seen["ok"] += 1
        except NbformerError:
            seen["error"] += 1
    assert seen["error"] > 40, seen
