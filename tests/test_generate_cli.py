"""`nbformer generate` / `nbformer translate`: the command line against the library it wraps (the same
options give the same text), streaming, --json fields, --input batches, n-best lists, one-line errors."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbformer  # noqa: E402
import nbformer.defaults  # noqa: E402
from nbformer.generate import generate, stream  # noqa: E402

from cli.main import main
from cli_checks import ok, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny test corpus",
          "numba kernels run transformers without torch", "once upon a time there was a small model"]
LONG = " ".join(CORPUS) + " and then some more words that the tokenizer never saw before"


def _bpe(special=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Random GPT-2 (32 positions, no EOS) + byte-level BPE tokenizer.json."""
    tok = _bpe()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2-cli")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
        eos_token_id=None)).save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return nbformer.load(gpt2_dir)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    """Random MarianMTModel (64 positions) whose generation config asks for 3 beams, 8 new tokens and
    no_repeat_ngram_size 1; single-byte tokens are pushed down and the newline token up (so some
    translations contain newlines), <pad> = 0 = decoder start, </s> = 1."""
    from tokenizers import processors

    tok = _bpe(["<pad>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    V = tok.get_vocab_size()
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0, forced_eos_token_id=1, init_std=0.3)
    hf = transformers.MarianMTModel(cfg)
    with torch.no_grad():
        hf.final_logits_bias[0, 2:258] -= 4.0
        hf.final_logits_bias[0, tok.token_to_id("\u010a")] += 5.0
    d = tmp_path_factory.mktemp("marian-cli")
    hf.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "generation_config.json").write_text(json.dumps(
        {"num_beams": 3, "max_new_tokens": 8, "no_repeat_ngram_size": 1, "forced_eos_token_id": 1,
         "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}))
    return d


@pytest.fixture(scope="module")
def marian(marian_dir):
    return nbformer.load(marian_dir)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert-cli")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40)).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture
def runner():
    return CliRunner()


def _ok(result):
    return ok(result)


def _one_line_error(result, *parts):
    return one_line_error(result, *parts, status=1)


def _esc(text):
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _write(tmp_path, lines, name="in.txt"):
    f = tmp_path / name
    f.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(f)


# ---------------------------------------------------------------- generate: one prompt
@pytest.mark.parametrize("args,kw", [
    ([], {}),
    (["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"], dict(repetition_penalty=1.3,
                                                                         no_repeat_ngram_size=2)),
    (["-t", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "5"], dict(temperature=0.9, top_k=20, top_p=0.9,
                                                                          seed=5)),
])
def test_generate_prints_the_streamed_library_text(runner, gpt2_dir, gpt2, args, kw):
    prompt = "once upon"
    out = _ok(runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "10"] + args))
    want = gpt2.generate(prompt, 10, **kw)
    assert len(want) > len(prompt) + 3
    assert out == want + "\n"
    assert out == prompt + "".join(stream(gpt2, prompt, 10, **kw)) + "\n"


def test_generate_stop_strings(runner, gpt2_dir, gpt2):
    prompt = "the quick"
    cont = gpt2.generate(prompt, 12)[len(prompt):]
    stop = cont[4:6]
    cut = cont.index(stop)
    assert len(stop) == 2 and cut > 0
    out = _ok(runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "12", "--stop", stop,
                                   "--stop", "\u2603never"]))
    assert out == prompt + cont[:cut] + "\n"
    obj = json.loads(_ok(runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "12", "--stop", stop,
                                              "--json"])))
    assert obj["completion"] == cont[:cut] and obj["finish_reason"] == "stop" and obj["tokens"] < 12


def test_generate_streams_while_generating(gpt2_dir, gpt2):
    """A real process with stdout on a pipe: the text arrives in pieces while tokens are still being
    generated (each decoding step is slowed down to 0.3 s), not all at exit."""
    code = ("import sys, time\nimport nbformer.generate as g\norig = g.open_session\n"
            "class Slow:\n"
            "    def __init__(self, s): self.s = s\n"
            "    def start(self, *a): return self.s.start(*a)\n"
            "    def step(self, *a):\n        time.sleep(0.3)\n        return self.s.step(*a)\n"
            "    def reorder(self, *a): return self.s.reorder(*a)\n"
            "g.open_session = lambda *a, **k: Slow(orig(*a, **k))\n"
            "from cli.main import main\nmain(sys.argv[1:], prog_name='nbformer')\n")
    prompt = "hello world"
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)  # stdout is a block-buffered pipe: only flushing makes text arrive early
    p = subprocess.Popen([sys.executable, "-c", code, "generate", prompt, "-m", str(gpt2_dir), "-n", "8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    chunks = []
    fd = p.stdout.fileno()
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        chunks.append((time.monotonic(), b))
    t_end = time.monotonic()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    out = b"".join(c for _, c in chunks).decode()
    assert out == gpt2.generate(prompt, 8) + "\n"
    assert len(chunks) >= 3, chunks
    assert chunks[0][1].decode().startswith(prompt)
    assert t_end - chunks[0][0] > 0.9, (t_end - chunks[0][0], chunks)  # 7 slowed steps after the first token


def test_generate_json_fields(runner, gpt2_dir, gpt2):
    prompt = "hello world"
    out = _ok(runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "7", "--json"]))
    assert out.count("\n") == 1  # one JSON object, nothing streamed
    obj = json.loads(out)
    assert set(obj) == {"model", "prompt", "text", "completion", "tokens", "finish_reason", "time_to_first_token_s",
                        "tokens_per_s"}
    res = gpt2.generate(prompt, 7, return_dict=True)
    assert obj["prompt"] == prompt and obj["text"] == res.output == prompt + obj["completion"]
    assert obj["completion"] == res.texts[0] and len(obj["completion"]) > 0
    assert type(obj["tokens"]) is int and obj["tokens"] == 7 == int(res.new_tokens[0])
    assert obj["finish_reason"] == "length"
    assert isinstance(obj["time_to_first_token_s"], float) and obj["time_to_first_token_s"] >= 0
    assert isinstance(obj["tokens_per_s"], (int, float)) and obj["tokens_per_s"] >= 0
    assert Path(obj["model"]).resolve().is_relative_to(gpt2_dir.resolve())


def test_generate_ignore_eos(runner, gpt2_dir, gpt2, tmp_path):
    """A copy of the model whose EOS is the 4th token it generates: it stops there unless --ignore-eos."""
    import shutil

    prompt = "hello world"
    ids = gpt2.tokenizer.encode(prompt, add_special_tokens=False)
    gen = generate(gpt2, np.array([ids]), 8)[0, len(ids):].tolist()
    k = next(i for i in range(2, 8) if gen[i] not in gen[:i])
    d = tmp_path / "eos"
    shutil.copytree(gpt2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = gen[k]
    (d / "config.json").write_text(json.dumps(cfg))
    m = nbformer.load(d)
    stopped = json.loads(_ok(runner.invoke(main, ["generate", prompt, "-m", str(d), "-n", "8", "--json"])))
    assert stopped["finish_reason"] == "eos" and stopped["tokens"] == k + 1
    assert stopped["text"] == m.generate(prompt, 8)
    full = json.loads(_ok(runner.invoke(main, ["generate", prompt, "-m", str(d), "-n", "8", "--json",
                                               "--ignore-eos"])))
    assert full["finish_reason"] == "length" and full["tokens"] == 8
    assert full["text"] == m.generate(prompt, 8, stop_at_eos=False) != stopped["text"]
    assert _ok(runner.invoke(main, ["generate", prompt, "-m", str(d), "-n", "8", "--ignore-eos"])) == \
        full["text"] + "\n"


def test_generate_beams_n_best(runner, gpt2_dir, gpt2):
    prompt = "numba kernels"
    args = ["generate", prompt, "-m", str(gpt2_dir), "-n", "6", "--beams", "3"]
    texts, scores = gpt2.generate(prompt, 6, num_beams=3, num_return_sequences=3, return_scores=True)
    assert len(set(texts)) == 3
    out = _ok(runner.invoke(main, args + ["--num-return", "3"]))
    assert out.split("\n") == [_esc(t) for t in texts] + [""]
    obj = json.loads(_ok(runner.invoke(main, args + ["--num-return", "3", "--json"])))
    assert [b["completion"] for b in obj["n_best"]] == [t[len(prompt):] for t in texts]
    got = [b["score"] for b in obj["n_best"]]
    assert all(isinstance(s, float) for s in got) and got == sorted(got, reverse=True)
    np.testing.assert_allclose(got, scores, rtol=1e-6)
    assert obj["text"] == texts[0] and obj["completion"] == obj["n_best"][0]["completion"]
    # one beam result: printed like a plain generation; JSON still carries its score
    assert _ok(runner.invoke(main, args)) == gpt2.generate(prompt, 6, num_beams=3) + "\n"
    one = json.loads(_ok(runner.invoke(main, args + ["--json", "--length-penalty", "0.5"])))
    t, s = gpt2.generate(prompt, 6, num_beams=3, length_penalty=0.5, return_scores=True)
    assert one["text"] == t and len(one["n_best"]) == 1
    np.testing.assert_allclose(one["n_best"][0]["score"], s[0], rtol=1e-6)


def test_generate_sampled_returns(runner, gpt2_dir, gpt2):
    prompt = "hello"
    args = ["generate", prompt, "-m", str(gpt2_dir), "-n", "5", "-t", "1.0", "--seed", "2", "--num-return", "3"]
    want = gpt2.generate(prompt, 5, temperature=1.0, seed=2, num_return_sequences=3)
    assert _ok(runner.invoke(main, args)).split("\n") == [_esc(t) for t in want] + [""]
    obj = json.loads(_ok(runner.invoke(main, args + ["--json"])))
    assert [b["completion"] for b in obj["n_best"]] == [t[len(prompt):] for t in want]
    assert all(b["score"] is None for b in obj["n_best"])


def test_generate_input_batches(runner, gpt2_dir, gpt2, tmp_path):
    prompts = ["hello", "the quick brown fox", "once upon a time there", "numba", "caf\u00e9 \u4e2d"]
    f = _write(tmp_path, prompts)
    args = ["generate", "-m", str(gpt2_dir), "-n", "6", "--input", f]
    want = [gpt2.generate(p, 6) for p in prompts]
    for bs in ("2", "8"):
        assert _ok(runner.invoke(main, args + ["--batch-size", bs])).split("\n") == [_esc(w) for w in want] + [""]
    lines = _ok(runner.invoke(main, args + ["--json", "--batch-size", "3"])).strip("\n").split("\n")
    objs = [json.loads(line) for line in lines]
    assert [o["prompt"] for o in objs] == prompts and [o["text"] for o in objs] == want
    assert all(o["text"] == o["prompt"] + o["completion"] and o["tokens"] == 6 for o in objs)
    assert all(set(o) == {"prompt", "text", "completion", "tokens", "finish_reason"} for o in objs)
    # n-best per line: --num-return lines per prompt, in file order
    out = _ok(runner.invoke(main, args + ["--beams", "2", "--num-return", "2", "--batch-size", "2"]))
    want2 = [t for p in prompts for t in gpt2.generate(p, 6, num_beams=2, num_return_sequences=2)]
    assert out.split("\n") == [_esc(t) for t in want2] + [""]
    # stdin, a UTF-8 BOM and CRLF line ends
    out = _ok(runner.invoke(main, args[:-1] + ["-"], input="\ufeffhello\r\nnumba\r\n".encode()))
    assert out.split("\n") == [_esc(want[0]), _esc(want[3]), ""]


def test_generate_verbose_timing_on_stderr(runner, gpt2_dir, gpt2, tmp_path):
    pattern = re.compile(r"^\d+ tokens, TTFT \d+\.\d ms, \d+\.\d tok/s\n$")
    r = runner.invoke(main, ["generate", "hello", "-m", str(gpt2_dir), "-n", "5", "-v"])
    assert _ok(r) == gpt2.generate("hello", 5) + "\n"
    assert pattern.match(r.stderr) and r.stderr.startswith("5 tokens,"), r.stderr
    r = runner.invoke(main, ["generate", "-m", str(gpt2_dir), "-n", "5", "--verbose", "--batch-size", "1",
                             "--input", _write(tmp_path, ["a b", "c d"])])
    assert len(_ok(r).split("\n")) == 3
    assert pattern.match(r.stderr) and r.stderr.startswith("10 tokens,"), r.stderr
    assert _ok(runner.invoke(main, ["generate", "hello", "-m", str(gpt2_dir), "-n", "5"])).count("\n") == 1
    assert runner.invoke(main, ["generate", "hello", "-m", str(gpt2_dir), "-n", "5"]).stderr == ""


def _long_prompt(m, lo, hi):
    """Words of the corpus until the prompt has lo..hi tokens."""
    words = " ".join(CORPUS).split()
    for k in range(1, len(words) + 1):
        p = " ".join(words[:k])
        if lo <= len(m.tokenizer.encode(p, add_special_tokens=False)) <= hi:
            return p
    raise AssertionError("no prompt of that length")


def test_generate_truncate(runner, gpt2_dir, gpt2):
    prompt = _long_prompt(gpt2, 26, 31)  # fits the 32 positions, but not with 8 new tokens
    r = runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "8"])
    _one_line_error(r, "--max-new-tokens", "32", "--truncate")
    assert r.stdout == ""
    out = _ok(runner.invoke(main, ["generate", prompt, "-m", str(gpt2_dir), "-n", "8", "--truncate"]))
    want = gpt2.generate(prompt, 8, truncate=True)
    assert out == want + "\n" and want.startswith(prompt) and len(want) > len(prompt)


def test_generate_truncate_prompt_longer_than_the_model(runner, gpt2_dir, gpt2):
    assert len(gpt2.tokenizer.encode(LONG, add_special_tokens=False)) > 32
    _one_line_error(runner.invoke(main, ["generate", LONG, "-m", str(gpt2_dir), "-n", "4"]), "--truncate")
    out = _ok(runner.invoke(main, ["generate", LONG, "-m", str(gpt2_dir), "-n", "4", "--truncate"]))
    assert out == gpt2.generate(LONG, 4, truncate=True) + "\n"


# ---------------------------------------------------------------- translate
def test_translate_uses_the_model_generation_config(runner, marian_dir, marian):
    srcs = ["hello world", "the lazy dog", "once upon a time", "numba kernels", "a tiny test"]
    want = [generate(marian, s) for s in srcs]  # 3 beams, 8 new tokens from generation_config.json
    assert len(set(want)) > 2 and any("\n" in w for w in want) and all(w for w in want)
    assert [generate(marian, s, num_beams=1) for s in srcs] != want  # the config's beams matter
    out = _ok(runner.invoke(main, ["translate", *srcs, "-m", str(marian_dir), "--batch-size", "2"]))
    assert out.split("\n") == [_esc(w) for w in want] + [""]
    # one source: the translation as it is (not streamed: 3 beams)
    assert _ok(runner.invoke(main, ["translate", srcs[2], "-m", str(marian_dir)])) == want[2] + "\n"
    # `generate` with an encoder-decoder model translates too
    assert _ok(runner.invoke(main, ["generate", srcs[2], "-m", str(marian_dir)])) == want[2] + "\n"
    obj = json.loads(_ok(runner.invoke(main, ["generate", srcs[2], "-m", str(marian_dir), "--json"])))
    assert obj["prompt"] == srcs[2] and obj["text"] == obj["completion"] == want[2]
    assert obj["tokens"] <= 8 and len(obj["n_best"]) == 1


def test_translate_streams_with_one_beam(runner, marian_dir, marian):
    src = "the quick brown fox"
    want = generate(marian, src, num_beams=1, max_new_tokens=12)
    deltas = list(stream(marian, src, 12, num_beams=1))
    assert len(deltas) > 1 and "".join(deltas) == want
    out = _ok(runner.invoke(main, ["translate", src, "-m", str(marian_dir), "--beams", "1", "-n", "12"]))
    assert out == want + "\n"
    assert _ok(runner.invoke(main, ["generate", src, "-m", str(marian_dir), "--beams", "1", "-n", "12"])) == out


def test_translate_json_and_n_best(runner, marian_dir, marian):
    srcs = ["hello world", "numba kernels"]
    lines = _ok(runner.invoke(main, ["translate", *srcs, "-m", str(marian_dir), "--json"])).strip("\n").split("\n")
    objs = [json.loads(line) for line in lines]
    assert objs == [{"source": s, "translation": generate(marian, s)} for s in srcs]
    args = ["translate", *srcs, "-m", str(marian_dir), "--beams", "4", "--num-return", "3", "--length-penalty", "0.6"]
    objs = [json.loads(line) for line in _ok(runner.invoke(main, args + ["--json"])).strip("\n").split("\n")]
    for s, o in zip(srcs, objs):
        texts, scores = generate(marian, s, num_beams=4, num_return_sequences=3, length_penalty=0.6,
                                 return_scores=True)
        assert set(o) == {"source", "translation", "n_best"} and o["source"] == s
        assert [b["translation"] for b in o["n_best"]] == texts and o["translation"] == texts[0]
        got = [b["score"] for b in o["n_best"]]
        assert got == sorted(got, reverse=True)
        np.testing.assert_allclose(got, scores, rtol=1e-6)
    out = _ok(runner.invoke(main, args))
    want = [t for s in srcs for t in generate(marian, s, num_beams=4, num_return_sequences=3, length_penalty=0.6)]
    assert out.split("\n") == [_esc(t) for t in want] + [""]


def test_translate_input_file(runner, marian_dir, marian, tmp_path):
    srcs = ["hello world", "the lazy dog", "once upon a time", "numba kernels", "a tiny test"]
    f = _write(tmp_path, srcs)
    want = [generate(marian, s, max_new_tokens=6) for s in srcs]
    out = _ok(runner.invoke(main, ["translate", "--input", f, "-m", str(marian_dir), "-n", "6", "--batch-size", "2"]))
    assert out.split("\n") == [_esc(w) for w in want] + [""]
    lines = _ok(runner.invoke(main, ["translate", "zero", "--input", f, "-m", str(marian_dir), "-n", "6",
                                     "--json"])).strip("\n").split("\n")
    assert [json.loads(line) for line in lines] == [{"source": s, "translation": t} for s, t in
                                                     zip(["zero"] + srcs, [generate(marian, "zero", 6)] + want)]


def test_translate_truncate(runner, marian_dir, marian):
    src = "xyzzy " * 20
    _one_line_error(runner.invoke(main, ["translate", src, "-m", str(marian_dir)]), "64", "--truncate")
    out = _ok(runner.invoke(main, ["translate", src, "-m", str(marian_dir), "--truncate"]))
    assert out == generate(marian, src, truncate=True) + "\n"


def test_translate_default_model(runner, marian_dir, marian, monkeypatch):
    monkeypatch.delattr(nbformer.defaults, "default_translator_path", raising=False)
    _one_line_error(runner.invoke(main, ["translate", "hello"]), "--model")
    monkeypatch.setattr(nbformer.defaults, "default_translator_path", lambda: marian_dir, raising=False)
    assert _ok(runner.invoke(main, ["translate", "hello"])) == generate(marian, "hello") + "\n"


# ---------------------------------------------------------------- errors
def test_translate_needs_an_encoder_decoder(runner, gpt2_dir, bert_dir):
    _one_line_error(runner.invoke(main, ["translate", "hi", "-m", str(gpt2_dir)]), str(gpt2_dir),
                    "translate needs an encoder-decoder model (this one is a decoder)", "nbformer generate")
    _one_line_error(runner.invoke(main, ["translate", "hi", "-m", str(bert_dir)]), str(bert_dir), "an encoder")
    _one_line_error(runner.invoke(main, ["generate", "hi", "-m", str(bert_dir)]), str(bert_dir), "an encoder")


@pytest.mark.parametrize("args,names", [
    (["--beams", "0"], ["--beams", "num_beams"]),
    (["--top-p", "1.5"], ["--top-p", "top_p"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "max_new_tokens"]),
    (["-n", "40"], ["--max-new-tokens", "32"]),
    (["--num-return", "2"], ["--num-return", "--beams >= 2", "--temperature > 0"]),
    (["--beams", "2", "--num-return", "3"], ["--num-return"]),
    (["--beams", "2", "-t", "0.7"], ["--beams"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["--no-repeat-ngram-size", "-1"], ["--no-repeat-ngram-size"]),
    (["--stop", ""], ["--stop"]),
    (["--batch-size", "0"], ["--batch-size"]),
])
@pytest.mark.parametrize("mode", ["stream", "json", "input"])
def test_generate_bad_options_are_one_line(runner, gpt2_dir, tmp_path, args, names, mode):
    extra = {"stream": ["hi"], "json": ["hi", "--json"], "input": ["--input", _write(tmp_path, ["hi", "yo"])]}[mode]
    r = runner.invoke(main, ["generate", "-m", str(gpt2_dir), *extra, *args])
    line = _one_line_error(r, *names)
    assert r.stdout == "" and "(in " not in line


@pytest.mark.parametrize("args,names", [
    (["--beams", "0"], ["--beams"]), (["--num-return", "5"], ["--num-return", "5", "--beams = 3"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]), (["-n", "64"], ["--max-new-tokens", "64"]),
    (["--length-penalty", "nan"], ["--length-penalty"]), (["--batch-size", "-1"], ["--batch-size"]),
])
def test_translate_bad_options_are_one_line(runner, marian_dir, args, names):
    r = runner.invoke(main, ["translate", "hello", "world", "-m", str(marian_dir), *args])
    _one_line_error(r, *names)
    assert r.stdout == ""


@pytest.mark.parametrize("cmd", ["generate", "translate"])
def test_input_file_errors_name_the_file_and_line(runner, gpt2_dir, marian_dir, tmp_path, cmd):
    model = str(gpt2_dir if cmd == "generate" else marian_dir)

    def err(content, *parts):
        f = tmp_path / "in.txt"
        f.write_bytes(content)
        r = runner.invoke(main, [cmd, "-m", model, "--input", str(f)])
        _one_line_error(r, *parts)
        assert r.stdout == ""

    err(b"first\n\nthird\n", f"{tmp_path / 'in.txt'}:2", "empty line")
    err(b"first\nsecond\n   \n", "in.txt:3", "empty line")
    err(b"first\r\n\r\n", "in.txt:2", "empty line")
    err(b"ok\nok\n\xff\xfe bad\n", "in.txt:3", "UTF-8")
    err(b"", "in.txt", "no lines")
    missing = str(tmp_path / "missing.txt")
    _one_line_error(runner.invoke(main, [cmd, "-m", model, "--input", missing]), missing)


def test_too_long_line_in_input_names_its_batch(runner, gpt2_dir, gpt2, tmp_path):
    f = _write(tmp_path, ["a", "b", "c", _long_prompt(gpt2, 26, 31), "d"])
    line = _one_line_error(runner.invoke(main, ["generate", "-m", str(gpt2_dir), "-n", "8", "--input", f,
                                                "--batch-size", "2"]), "--truncate")
    assert line.endswith(f"(in {f}:3-4)"), line


def test_nothing_to_do_is_a_usage_error(runner, gpt2_dir, marian_dir):
    for args in (["generate", "-m", str(gpt2_dir)], ["translate", "-m", str(marian_dir)], ["translate", "--json"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and "--input" in r.stderr and "Usage:" in r.stderr, (args, r.output)


def test_streaming_into_a_closed_pipe_exits_quietly(gpt2_dir):
    """`nbformer generate ... | head -c 3`: the reader leaves while tokens are still coming; no
    traceback, status 141 (as a process killed by SIGPIPE reports)."""
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "generate", "hello world", "-m", str(gpt2_dir), "-n", "24",
                          "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(3)) == 3
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err
