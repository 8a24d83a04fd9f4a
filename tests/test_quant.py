"""Quantized weights kept quantized (issue 12): ggml Q8_0 / Q4_0 / Q4_1 blocks vs the `gguf`
library's own quantize / dequantize (the byte-layout oracle), the CPU and CUDA (simulated)
quantized linear kernels vs the float64 reference of the same scheme, tiny Llama / GPT-2 models
run quantized vs the same models with the weights dequantized to float32, and `nbformer quantize`
files read back by gguf.GGUFReader and nbformer.load."""
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import nbformer  # noqa: E402
from conftest import assert_close  # noqa: E402
from cuda_tiles import tiny_cuda_tiles  # noqa: E402,F401  (fixture)
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.errors import GraphError, InputError, NbformerError  # noqa: E402
from nbformer.graph.build import build_forward  # noqa: E402
from nbformer.kernels.cpu.qlinear import qlinear_forward, qlinear_glu_forward  # noqa: E402
from nbformer.model import Model  # noqa: E402
from nbformer.quant import (QuantizedTensor, dequantize, qlinear_glu_reference, qlinear_reference,  # noqa: E402
                            quantize)
from nbformer.training.trainer import init_params  # noqa: E402
from nbformer.weights import Checkpoint, save_native  # noqa: E402

QTYPES = ["q8_0", "q4_0", "q4_1"]
GT = {t: getattr(gguf.GGMLQuantizationType, t.upper()) for t in QTYPES}


def _hostile_weight(rng, M, K):
    """Random rows plus blocks ggml treats specially: all zeros, one huge value, constant, ties."""
    w = rng.standard_normal((M, K)).astype(np.float32)
    w[0, :32] = 0.0
    if M > 1:
        w[1, 3] = 1e4
    if M > 2:
        w[2, 32:64] = -0.75
    if M > 3:
        w[3, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8.0  # exact halves: round-half-away cases
    return w


# ================================================================ block formats vs gguf.quants
@pytest.mark.parametrize("qtype", QTYPES)
def test_pack_unpack_vs_gguf(rng, qtype):
    w = _hostile_weight(rng, 7, 96)
    q = quantize(w, qtype)
    want = gguf.quants.quantize(w, GT[qtype])
    assert q.data.shape == want.shape == (7, 3 * {"q8_0": 34, "q4_0": 18, "q4_1": 20}[qtype])
    assert np.array_equal(q.data, want), "bytes differ from ggml's reference quantizer"
    assert np.array_equal(dequantize(q), gguf.quants.dequantize(want, GT[qtype]))
    # our dequantizer on bytes made by the library, and the error bound of the scheme
    q2 = QuantizedTensor.from_ggml(qtype.upper(), (7, 96), want)
    back = dequantize(q2)
    blocks = w.reshape(-1, 32)
    step = {"q8_0": np.abs(blocks).max(1) / 127, "q4_0": np.abs(blocks).max(1) / 8,
            "q4_1": (blocks.max(1) - blocks.min(1)) / 15}[qtype]
    err = np.abs(back - w).reshape(-1, 32).max(1)
    assert (err <= step * 1.01 + 1e-3 * np.abs(blocks).max(1)).all()
    # rows are independent: take_rows / concat are exact
    assert np.array_equal(QuantizedTensor.concat([q2.take_rows([4, 0]), q2.take_rows([6])]).dequantize(),
                          back[[4, 0, 6]])


def test_format_errors():
    with pytest.raises(InputError, match="multiple of 32"):
        quantize(np.ones((3, 40), np.float32), "q4_1")
    with pytest.raises(InputError, match="not supported"):
        quantize(np.ones((3, 32), np.float32), "q5_k")
    with pytest.raises(InputError, match="NaN"):
        quantize(np.full((1, 32), np.nan, np.float32), "q8_0")
    with pytest.raises(InputError, match="needs 68 bytes"):
        QuantizedTensor.from_ggml("Q8_0", (2, 32), np.zeros(67, np.uint8))


# ================================================================ CPU kernels vs the float64 reference
def _case(rng, qtype, M, K, N_out, glu=False):
    w = quantize(_hostile_weight(rng, 2 * N_out if glu else N_out, K) * 0.2, qtype)
    x = rng.standard_normal((M, K)).astype(np.float32)
    return w, x


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("M", [1, 2, 7, 64])
def test_cpu_qlinear(rng, qtype, M):
    K, N = 96, 75  # three blocks per row; 75 columns: several decode (32) and prefill (64) tiles + tails
    w, x = _case(rng, qtype, M, K, N)
    b = rng.standard_normal(N).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    for act, bias, residual in (("none", None, None), ("gelu_tanh", b, res), ("silu", b, None)):
        want = qlinear_reference(x, w, bias, act, residual)
        scale = np.abs(want).max()
        for dense_rows in (None, 1, 10 ** 9):  # the default choice, then each path forced
            out = np.full((M, N), np.nan, np.float32)
            qlinear_forward(out, x, w.data, qtype, bias, act, residual, dense_rows=dense_rows)
            assert_close(out, want, atol=2e-6 * scale, rtol=1e-5, what=f"{qtype} M={M} {act} rows>={dense_rows}")
    # out aliasing residual (the graph's residual layers do this)
    out = res.copy()
    qlinear_forward(out, x, w.data, qtype, b, "none", out)
    assert_close(out, qlinear_reference(x, w, b, "none", res), atol=1e-5, rtol=1e-5, what="aliased residual")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("M", [1, 7])
def test_cpu_qlinear_glu(rng, qtype, M):
    K, F = 64, 37
    w, x = _case(rng, qtype, M, K, F, glu=True)
    b = rng.standard_normal(2 * F).astype(np.float32)
    for bias in (None, b):
        want = qlinear_glu_reference(x, w, bias, "silu")
        for dense_rows in (1, 10 ** 9):
            out = np.full((M, F), np.nan, np.float32)
            qlinear_glu_forward(out, x, w.data, qtype, bias, "silu", dense_rows=dense_rows)
            assert_close(out, want, atol=2e-6 * np.abs(want).max(), rtol=1e-5, what=f"{qtype} glu M={M}")
    from nbformer.kernels.cpu import precompile

    assert [u for u in precompile.unplanned if u[0].startswith("qlinear.")] == [], "compiled outside its signature"


@pytest.mark.parametrize("qtype", QTYPES)
def test_cpu_qlinear_decode_tiles_bit_identical(rng, qtype):
    """The decode path's multi-row tiles (4 weight rows, x 2 rows of x) give exactly the bits of the
    one-row reference (one weight row and one row of x at a time) at awkward shapes: M not a
    multiple of the tile rows or of the 32-column work items, K = 32 (one block), N = 1, 2, 7 rows
    (7: tiles of 2 rows of x plus one left), in the plain and the glu launchers."""
    from nbformer.kernels.cpu.qlinear import decode_reference

    for K in (32, 96):
        for M_w in (1, 3, 5, 37, 70):
            w, _ = _case(rng, qtype, 1, K, M_w)
            for N in (1, 2, 7):
                x = rng.standard_normal((N, K)).astype(np.float32)
                ref = decode_reference(x, w.data, qtype)
                out = np.full((N, M_w), np.nan, np.float32)
                qlinear_forward(out, x, w.data, qtype, dense_rows=10 ** 9)
                assert np.array_equal(out, ref), f"{qtype} K={K} M={M_w} N={N}: tiles differ from the one-row path"
                assert_close(ref, qlinear_reference(x, w), atol=2e-6 * np.abs(ref).max(), rtol=1e-5,
                             what=f"{qtype} one-row reference K={K} M={M_w} N={N}")
                if M_w % 2 == 0:  # glu, act 'none': gate * up from the same tiles
                    F = M_w // 2
                    og = np.full((N, F), np.nan, np.float32)
                    qlinear_glu_forward(og, x, w.data, qtype, None, "none", dense_rows=10 ** 9)
                    assert np.array_equal(og, ref[:, :F] * ref[:, F:]), f"{qtype} glu K={K} M={M_w} N={N}"


def test_cpu_qlinear_errors(rng):
    w = quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_1")
    out = np.empty((1, 8), np.float32)
    with pytest.raises(GraphError, match="multiple of 32"):
        qlinear_forward(np.empty((1, 8), np.float32), np.ones((1, 40), np.float32), w.data, "q4_1")
    with pytest.raises(GraphError, match="expected \\(M, 36\\) bytes"):
        qlinear_forward(out, np.ones((1, 64), np.float32), w.data, "q4_0")  # Q4_1 bytes called Q4_0
    with pytest.raises(GraphError, match="qtype"):
        qlinear_forward(out, np.ones((1, 64), np.float32), w.data, "q3_k")
    with pytest.raises(GraphError, match="'out' has shape"):
        qlinear_forward(np.empty((1, 9), np.float32), np.ones((1, 64), np.float32), w.data, "q4_1")
    with pytest.raises(GraphError, match="even number"):
        qlinear_glu_forward(np.empty((1, 4), np.float32), np.ones((1, 64), np.float32), w.data[:7], "q4_1")


# ================================================================ CUDA twin (simulated at tiny shapes)
@pytest.mark.parametrize("qtype", QTYPES)
def test_cuda_qlinear(rng, qtype):
    from numba import cuda

    from nbformer.kernels.cuda.qlinear import qlinear_forward as cu_fwd, qlinear_glu_forward as cu_glu

    K, N = 64, 5
    for M in (1, 3):  # one row block, then a tail (rows = 2 under the simulator)
        w, x = _case(rng, qtype, M, K, N)
        b, res = rng.standard_normal(N).astype(np.float32), rng.standard_normal((M, N)).astype(np.float32)
        out = cuda.to_device(np.full((M, N), np.nan, np.float32))
        cu_fwd(out, cuda.to_device(x), cuda.to_device(w.data), qtype, cuda.to_device(b), "gelu", cuda.to_device(res))
        want = qlinear_reference(x, w, b, "gelu", res)
        assert_close(out.copy_to_host(), want, atol=2e-6 * np.abs(want).max(), rtol=1e-5, what=f"cuda {qtype}")
        wg, _ = _case(rng, qtype, M, K, 3, glu=True)
        og = cuda.to_device(np.full((M, 3), np.nan, np.float32))
        cu_glu(og, cuda.to_device(x), cuda.to_device(wg.data), qtype, None, "silu")
        want = qlinear_glu_reference(x, wg, None, "silu")
        assert_close(og.copy_to_host(), want, atol=2e-6 * np.abs(want).max(), rtol=1e-5, what=f"cuda glu {qtype}")
    with pytest.raises(GraphError, match="multiple of 32"):
        cu_fwd(cuda.to_device(np.empty((1, 5), np.float32)), cuda.to_device(np.ones((1, 40), np.float32)),
               cuda.to_device(w.data), qtype)


# ================================================================ whole models: quantized vs dequantized
def _llama_cfg(V=96, tied=True):
    return ModelConfig(arch="decoder", vocab_size=V, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96,
                       max_positions=64, norm="pre", activation="silu", positions="rope", norm_type="rmsnorm",
                       ffn_type="glu", qkv_bias=False, attn_out_bias=False, ffn_bias=False, final_layernorm=True,
                       tie_word_embeddings=tied, family="llama", rope_theta=5000.0, layer_norm_eps=1e-6)


def _gpt2_cfg(V=96):
    return ModelConfig(arch="decoder", vocab_size=V, d_model=64, n_heads=2, n_layers=2, d_ff=128, max_positions=64,
                       norm="pre", activation="gelu_tanh", positions="learned", final_layernorm=True, family="gpt2")


def _params(cfg, seed=3):
    rng = np.random.default_rng(seed)
    p = init_params(cfg, seed=seed, std=0.1)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p.items()}


def _quantized_pair(cfg, params, qtype, emb_qtype="q8_0"):
    """(model holding quantized linear weights, the same weights dequantized in a float model)."""
    quant, deq = {}, dict(params)
    for k, v in params.items():
        if k.endswith((".qkv.w", ".out.w", ".gate_up.w", ".up.w", ".down.w")) or k == "lm_head.w":
            quant[k] = quantize(v, qtype)
            deq[k] = quant[k].dequantize()
    if cfg.tie_word_embeddings:
        quant["tok_emb"] = quantize(params["tok_emb"], emb_qtype)
        deq["tok_emb"] = quant["tok_emb"].dequantize()
    fp = {k: v for k, v in deq.items() if k not in quant or k == "tok_emb"}
    mq = Model(Checkpoint(cfg, fp, [], Path("quantized"), quantized=quant))
    mf = Model(Checkpoint(cfg, deq, [], Path("dequantized")))
    return mq, mf


@pytest.mark.parametrize("family,qtype,tied", [("llama", "q8_0", True), ("llama", "q4_1", False),
                                               ("gpt2", "q8_0", True), ("gpt2", "q4_1", True)])
def test_model_quantized_vs_dequantized(rng, family, qtype, tied):
    cfg = _llama_cfg(tied=tied) if family == "llama" else _gpt2_cfg()
    mq, mf = _quantized_pair(cfg, _params(cfg), qtype)
    assert len(mq.ckpt.quantized) == 4 * cfg.n_layers + 1 and mq.config.extra["quantized"]  # + head
    ops = {n.op for n in build_forward(mq.config, 2, 9).nodes}
    assert "qlinear" in ops and "linear" not in ops and ("qlinear_glu" in ops) == (family == "llama")
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    a, b = mq.forward(ids), mf.forward(ids)
    assert_close(a, b, atol=1e-5 * np.abs(b).max(), rtol=0, what=f"{family} {qtype} logits")
    prompt = ids[:, :3]
    assert np.array_equal(mq.generate(prompt, max_new_tokens=6), mf.generate(prompt, max_new_tokens=6))
    with pytest.raises(InputError, match="inference only"):
        mq.loss_and_grads(ids, ids)


@pytest.mark.usefixtures("tiny_cuda_tiles")
def test_model_quantized_cuda_simulated(rng, monkeypatch):
    from nbformer.kernels.cuda import qlinear as cuq

    monkeypatch.setitem(cuq.TUNABLES, "threads", 4)
    cfg = _llama_cfg(V=40).replace(d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, d_ff=32)
    mq, mf = _quantized_pair(cfg, _params(cfg), "q4_1")
    mc = Model(mq.ckpt, device="cuda")
    ids = rng.integers(0, cfg.vocab_size, (1, 2))
    a, b = mc.forward(ids), mf.forward(ids)
    assert_close(a, b, atol=2e-5 * np.abs(b).max(), rtol=0, what="cuda quantized logits")


# ================================================================ nbformer quantize
def _tokenizer_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the capital of France is Paris. 123 café"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant_src")
    tok = _tokenizer_json()
    V = tok.get_vocab_size()
    out = {}
    for fam, cfg in (("llama", _llama_cfg(V, tied=False)), ("gpt2", _gpt2_cfg(V))):
        params = _params(cfg)
        path = d / f"{fam}.safetensors"
        save_native(path, cfg, params, metadata={"nbformer_tokenizer": tok.to_str()})
        out[fam] = (path, cfg, params)
    return out, tok


@pytest.mark.parametrize("family,qtype", [("llama", "q4_1"), ("gpt2", "q8_0"), ("llama", "q4_0")])
def test_quantize_cli_roundtrip(tiny_sources, tmp_path, family, qtype):
    from click.testing import CliRunner

    from cli.main import main

    sources, tok = tiny_sources
    src, cfg, params = sources[family]
    out = tmp_path / f"{family}-{qtype}.gguf"
    r = CliRunner().invoke(main, ["quantize", str(src), "--type", qtype, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    rd = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in rd.tensors}
    assert types == summary["tensors"]
    Q = qtype.upper()
    if family == "llama":
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types[f"blk.1.{n}.weight"] == Q
        assert types["output.weight"] == Q and types["blk.0.attn_norm.weight"] == "F32"
        assert rd.fields["llama.attention.head_count_kv"].contents() == cfg.kv_heads
    else:
        assert types["blk.0.attn_qkv.weight"] == Q and types["position_embd.weight"] == "F32"
        assert types["blk.0.attn_qkv.bias"] == "F32" and "output.weight" not in types
    assert types["token_embd.weight"] == "Q8_0"
    assert rd.fields["general.architecture"].contents() == family
    assert rd.fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType, f"MOSTLY_{Q}"))
    # loaded back quantized, and equal to the source weights quantized -> dequantized in a float model
    m = nbformer.load(str(out))
    assert m.ckpt.quantized and all(q.qtype.name == qtype for k, q in m.ckpt.quantized.items() if k != "tok_emb")
    ref = dict(params)
    for k in m.ckpt.quantized:
        if k != "tok_emb":
            ref[k] = quantize(params[k], qtype).dequantize()
    ref["tok_emb"] = quantize(params["tok_emb"], "q8_0").dequantize()
    mf = Model(Checkpoint(cfg, ref, [], Path("ref")))
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 7))
    a, b = m.forward(ids), mf.forward(ids)
    assert_close(a, b, atol=1e-5 * np.abs(b).max(), rtol=0, what=f"{family} {qtype} GGUF logits")
    text = "hello world, the capital of France is Paris."
    assert m.tokenizer.encode(text) == tok.encode(text).ids


def test_quantize_cli_errors(tiny_sources, tmp_path):
    from click.testing import CliRunner

    from cli.main import main
    from nbformer.quant.gguf_writer import write_quantized_gguf

    sources, _ = tiny_sources
    src = str(sources["gpt2"][0])
    r = CliRunner().invoke(main, ["quantize", src, "--type", "q4_1", "-o", str(tmp_path / "x.bin")])
    assert r.exit_code == 1 and "ending in .gguf" in r.output
    r = CliRunner().invoke(main, ["quantize", src, "--type", "q5_k", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2
    q = tmp_path / "llama-q8_0.gguf"
    assert CliRunner().invoke(main, ["quantize", str(sources["llama"][0]), "-t", "q8_0", "-o", str(q)]).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("hello world, the capital of France is Paris. " * 50)
    r = CliRunner().invoke(main, ["train", str(text), "-o", str(tmp_path / "run"), "-m", str(q), "--steps", "1",
                                  "--seq-len", "16"])
    assert r.exit_code == 1 and "inference only" in r.output, r.output
    cfg = ModelConfig(arch="encoder", vocab_size=50, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_positions=16,
                      family="bert")
    ck = Checkpoint(cfg, init_params(cfg), [], Path("bert"))
    with pytest.raises(NbformerError, match="GPT-2 and Llama"):
        write_quantized_gguf(ck, tmp_path / "b.gguf", "q8_0")
