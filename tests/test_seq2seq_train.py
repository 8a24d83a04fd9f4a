"""Encoder-decoder training: the seeds' Transformer against torch.nn.Transformer (loss and every
gradient, post-LN and pre-LN), sentence-pair files and their errors, and a short `nbformer train`
run on the repository's synthetic date task whose loss must fall far below its start."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import nbformer
from cli.main import main
from nbformer.errors import InputError
from nbformer.tokenizer import train_seq2seq_bpe
from nbformer.training.pairs import IGNORE, PairData, read_pairs
from nbformer.training.recipes import seq2seq_config
from nbformer.training.state import FlatBuffers, StepRunner
from nbformer.training.trainer import init_params

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import seq2seq_task  # noqa: E402


# ---------------------------------------------------------------- the model vs torch.nn.Transformer
def _torch_transformer(cfg, params):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    C, V = cfg.d_model, cfg.vocab_size
    tr = nn.Transformer(C, cfg.n_heads, cfg.n_layers, cfg.n_decoder_layers, cfg.d_ff, dropout=0.0,
                        activation=cfg.activation if cfg.activation != "gelu" else "gelu", batch_first=True,
                        norm_first=cfg.norm == "pre").double()
    P = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    with torch.no_grad():
        def attn(mod, prefix, fused):
            if fused:
                mod.in_proj_weight.copy_(P[prefix + ".qkv.w"])
                mod.in_proj_bias.copy_(P[prefix + ".qkv.b"])
            else:
                mod.in_proj_weight.copy_(torch.cat([P[prefix + ".q.w"], P[prefix + ".kv.w"]]))
                mod.in_proj_bias.copy_(torch.cat([P[prefix + ".q.b"], P[prefix + ".kv.b"]]))
            mod.out_proj.weight.copy_(P[prefix + ".out.w"])
            mod.out_proj.bias.copy_(P[prefix + ".out.b"])

        def ln(mod, prefix):
            mod.weight.copy_(P[prefix + ".w"])
            mod.bias.copy_(P[prefix + ".b"])

        def ffn(layer, prefix):
            layer.linear1.weight.copy_(P[prefix + ".ffn.up.w"])
            layer.linear1.bias.copy_(P[prefix + ".ffn.up.b"])
            layer.linear2.weight.copy_(P[prefix + ".ffn.down.w"])
            layer.linear2.bias.copy_(P[prefix + ".ffn.down.b"])

        for i, layer in enumerate(tr.encoder.layers):
            attn(layer.self_attn, f"h{i}.attn", True)
            ln(layer.norm1, f"h{i}.ln1")
            ln(layer.norm2, f"h{i}.ln2")
            ffn(layer, f"h{i}")
        for i, layer in enumerate(tr.decoder.layers):
            attn(layer.self_attn, f"dec.h{i}.attn", True)
            attn(layer.multihead_attn, f"dec.h{i}.xattn", False)
            ln(layer.norm1, f"dec.h{i}.ln1")
            ln(layer.norm2, f"dec.h{i}.lnx")
            ln(layer.norm3, f"dec.h{i}.ln2")
            ffn(layer, f"dec.h{i}")
        ln(tr.encoder.norm, "final_ln")
        ln(tr.decoder.norm, "dec.final_ln")
    emb = nn.Parameter(P["tok_emb"].clone())
    return torch, tr, emb


def _paper_positions(n, C):
    pos = np.arange(n)[:, None]
    i = np.arange(C)[None, :]
    angle = pos / np.power(10000.0, (2 * (i // 2)) / C)
    return np.where(i % 2 == 0, np.sin(angle), np.cos(angle))


@pytest.mark.parametrize("norm,act", [("post", "relu"), ("pre", "relu"), ("post", "gelu")])
def test_training_step_matches_torch_nn_transformer(norm, act):
    """Loss and all gradients of one teacher-forced step: sources with padding, S != T, head dim 12."""
    cfg = seq2seq_config(41, 24, 2, 2, 2, 40, norm=norm, activation=act, max_positions=32, pad_id=0, eos_id=1)
    if norm == "post":  # nn.Transformer always ends encoder and decoder with a LayerNorm
        cfg = type(cfg).from_dict({**cfg.to_dict(), "final_layernorm": True})
    params = init_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    for k in params:  # non-trivial LayerNorm gains / biases
        if k.endswith(".b") or ".ln" in k or "_ln" in k:
            params[k] = params[k] + rng.normal(0, 0.1, params[k].shape).astype(np.float32)
    B, S, T = 3, 7, 5
    src = rng.integers(2, 41, (B, S))
    src_mask = np.ones((B, S), np.uint8)
    src_mask[1, 4:] = 0
    src_mask[2, 1:] = 0  # a one-token source
    src[src_mask == 0] = 0
    d_in = rng.integers(2, 41, (B, T))
    d_in[:, 0] = 0
    labels = rng.integers(1, 41, (B, T))
    labels[0, 3:] = IGNORE

    flat = FlatBuffers(cfg, params)
    runner = StepRunner(flat, B, T, S=S)
    loss, n = runner.run_lm(d_in, labels, src_ids=src, src_mask=src_mask)
    got = {k: np.array(v) for k, v in flat.grad_views.items()}

    torch, tr, emb = _torch_transformer(cfg, params)
    scale = math.sqrt(cfg.d_model)
    pe_s = torch.tensor(_paper_positions(S, cfg.d_model))
    pe_t = torch.tensor(_paper_positions(T, cfg.d_model))
    x = emb[torch.from_numpy(src)] * scale + pe_s
    y = emb[torch.from_numpy(d_in)] * scale + pe_t
    pad = torch.from_numpy(src_mask == 0)
    out = tr(x, y, tgt_mask=torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1),
             src_key_padding_mask=pad, memory_key_padding_mask=pad)
    logits = out @ emb.T
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(labels).reshape(-1),
                                            ignore_index=IGNORE)
    ref.backward()
    assert n == int((labels != IGNORE).sum())
    assert abs(loss - ref.item()) < 1e-5
    want = {"tok_emb": emb.grad.numpy()}
    named = dict(tr.named_parameters())

    def put(ours, theirs):
        want[ours] = named[theirs].grad.numpy()

    for side, layers, pre in (("", tr.encoder.layers, "encoder"), ("dec.", tr.decoder.layers, "decoder")):
        for i in range(len(layers)):
            t = f"{pre}.layers.{i}."
            o = f"{side}h{i}."
            put(o + "attn.qkv.w", t + "self_attn.in_proj_weight")
            put(o + "attn.qkv.b", t + "self_attn.in_proj_bias")
            put(o + "attn.out.w", t + "self_attn.out_proj.weight")
            put(o + "attn.out.b", t + "self_attn.out_proj.bias")
            for a, b in (("ffn.up", "linear1"), ("ffn.down", "linear2")):
                put(o + a + ".w", t + b + ".weight")
                put(o + a + ".b", t + b + ".bias")
            norms = ("ln1", "ln2") if side == "" else ("ln1", "lnx", "ln2")
            for k, ln in enumerate(norms):
                put(o + ln + ".w", t + f"norm{k + 1}.weight")
                put(o + ln + ".b", t + f"norm{k + 1}.bias")
            if side:
                C = cfg.d_model
                for suffix, name in (("w", "in_proj_weight"), ("b", "in_proj_bias")):
                    g = named[t + "multihead_attn." + name].grad.numpy()
                    want[o + "xattn.q." + suffix], want[o + "xattn.kv." + suffix] = g[:C], g[C:]
                put(o + "xattn.out.w", t + "multihead_attn.out_proj.weight")
                put(o + "xattn.out.b", t + "multihead_attn.out_proj.bias")
        put(side + "final_ln.w", f"{pre}.norm.weight")
        put(side + "final_ln.b", f"{pre}.norm.bias")
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-5, rtol=1e-3, err_msg=k)


# ---------------------------------------------------------------- pairs
def test_pairs_are_teacher_forced_like_marian():
    tok = train_seq2seq_bpe(["abc def", "123", "x y z"] * 3, 270)
    data = PairData([("abc def", "123"), ("x", "x y z"), ("abc", "1")], tok, start_id=0, eos_id=1, pad_id=0,
                    max_positions=64, eval_fraction=0.0)
    s_ids, s_mask, d_in, labels = data.train
    for i, (s, t) in enumerate(data.train_text):
        a, b = tok.encode(s), tok.encode(t, add_special_tokens=False)
        assert a[-1] == 1 and list(s_ids[i, :len(a)]) == a and s_mask[i].sum() == len(a)
        assert list(d_in[i, :len(b) + 1]) == [0] + b
        assert list(labels[i, :len(b) + 1]) == b + [1] and (labels[i, len(b) + 1:] == IGNORE).all()
    assert data.S == max(len(tok.encode(s)) for s, _ in data.train_text)
    b1, b2 = data.batch(0, 5, 4), data.batch(0, 5, 4)
    assert all(np.array_equal(x, y) for x, y in zip(b1, b2))  # a pure function of (seed, step)


@pytest.mark.parametrize("content,needle", [
    ("a\tb\n\tc\n", ":2: empty source"), ("a\tb\n   \tc\n", ":2: empty source"),
    ("a\tb\nc\t\n", ":2: empty target"), ("a\tb\n\nc\td\n", ":2: an empty line"),
    ("a b\n", ":1: no TAB"), ("a\tb\tc\n", ":1: more than one TAB"),
])
def test_bad_pair_files_name_file_and_line(tmp_path, content, needle):
    f = tmp_path / "pairs.tsv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=needle):
        read_pairs(f)
    r = CliRunner().invoke(main, ["train", str(f), "--arch", "encoder-decoder", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "pairs.tsv" + needle in r.output and len(r.output.strip().splitlines()) == 1


def test_a_decoder_is_not_trained_on_pairs(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("a\tb\n" * 10, encoding="utf-8")
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(tmp_path / "o"), "--eval-file", str(f)])
    assert r.exit_code != 0 and "--eval-file" in r.output


# ---------------------------------------------------------------- a short real run (the CI demonstration)
def test_short_training_run_drops_the_loss_and_translates(tmp_path):
    train, test = seq2seq_task.make_pairs(4000, 200, seed=1)
    assert not {t for _, t in test} & {t for _, t in train}  # held-out dates are never trained on
    seq2seq_task.write_tsv(tmp_path / "train.tsv", train)
    seq2seq_task.write_tsv(tmp_path / "test.tsv", test)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [
        "train", str(tmp_path / "train.tsv"), "--arch", "encoder-decoder", "--eval-file", str(tmp_path / "test.tsv"),
        "--out", str(out), "--vocab-size", "300", "--d-model", "96", "--layers", "1", "--heads", "4",
        "--batch", "32", "--steps", "200", "--lr", "3e-3", "--warmup", "20", "--eval-every", "100", "--quiet"])
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert first > 2.0 and last < 0.15 * first, (first, last)  # 200 steps, ~6 s: ~3.6 -> ~0.2
    evals = [rec for rec in log if "exact_match" in rec]
    assert [rec["step"] for rec in evals] == [100, 200]
    assert evals[-1]["eval_loss"] < 0.15 * first and evals[-1]["exact_match"] > evals[0]["exact_match"]
    m = nbformer.load(out / "model.safetensors")
    assert m.config.arch == "encoder_decoder" and m.config.norm == "post"
    got = m.generate([s for s, _ in test[:8]], max_new_tokens=16)
    assert sum(len(g) == 10 and g[4] == "-" and g[7] == "-" for g in got) >= 6, got  # ISO-shaped already


def test_the_shipped_date_model_rewrites_held_out_dates():
    """weights/dates-transformer (the demonstration's model) on held-out dates of the task it was
    trained on: the training run reached 100 % on all 2,000."""
    from nbformer.defaults import default_translator_path

    path = default_translator_path()
    assert path.parent.name == "dates-transformer"
    m = nbformer.load(path)
    _, test = seq2seq_task.make_pairs(60000, 2000, seed=0)
    pairs = test[::10]  # 200 pairs, every format
    got = m.generate([s for s, _ in pairs], max_new_tokens=16)
    hits = sum(g == t for g, (_, t) in zip(got, pairs))
    assert hits >= 198, [(s, t, g) for g, (s, t) in zip(got, pairs) if g != t]
