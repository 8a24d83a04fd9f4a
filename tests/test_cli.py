"""The `nbformer` command line: embed / generate / inspect, and one-line errors without tracebacks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from cli_checks import ok, one_line_error

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny test corpus",
             "numba kernels run transformers without torch", "once upon a time there was a small model"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Random-init GPT-2 (n_positions 32) + a byte-level BPE tokenizer.json of the same vocab size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40)).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture
def runner():
    return CliRunner()


_ok, _one_line_error = ok, one_line_error


# ---------------------------------------------------------------- embed
def test_embed_json_matches_embedder(runner):
    from nbformer import Embedder

    out = json.loads(_ok(runner.invoke(main, ["embed", "a", "b", "--json"])))
    assert out["dim"] == 384
    v = np.asarray(out["embeddings"], dtype=np.float32)
    assert v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v, Embedder().encode(["a", "b"]), atol=1e-6)


def test_embed_text_output_and_file(runner, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("first line\nsecond line\n", encoding="utf-8")
    out = _ok(runner.invoke(main, ["embed", "zeroth", "--file", str(f)]))
    assert "[0] dim=384 norm=1.0000" in out and "[2] dim=384" in out and "cosine similarity" in out
    out = json.loads(_ok(runner.invoke(main, ["embed", "--file", "-", "--json"], input="x\ny\nz\n")))
    assert len(out["embeddings"]) == 3


def test_embed_no_normalize(runner):
    out = json.loads(_ok(runner.invoke(main, ["embed", "hello there", "--json", "--no-normalize"])))
    assert abs(np.linalg.norm(out["embeddings"][0]) - 1.0) > 1e-3


# ---------------------------------------------------------------- inspect
def test_inspect_default_minilm(runner):
    out = _ok(runner.invoke(main, ["inspect"]))
    assert "parameters: 22,565,376" in out
    assert "planned activation arena:" in out and ("KiB" in out or "MiB" in out)
    assert "layers: 6" in out and "d_model: 384" in out


def test_inspect_tiny(runner, gpt2_dir):
    out = _ok(runner.invoke(main, ["inspect", str(gpt2_dir), "--batch", "2", "--seq", "16"]))
    assert "family: gpt2" in out and "arena" in out


# ---------------------------------------------------------------- generate
def test_generate_sampling_is_deterministic(runner, gpt2_dir):
    args = ["generate", "hello world", "--model", str(gpt2_dir), "-n", "8", "--seed", "3",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--json"]
    a = json.loads(_ok(runner.invoke(main, args)))
    b = json.loads(_ok(runner.invoke(main, args)))
    for o in (a, b):  # the timings differ from run to run
        assert o.pop("time_to_first_token_s") >= 0 and o.pop("tokens_per_s") >= 0
    assert a == b
    assert a["prompt"] == "hello world" and a["text"].startswith("hello world")
    assert a["text"] == a["prompt"] + a["completion"] and len(a["completion"]) > 0
    others = {json.loads(_ok(runner.invoke(main, args[:7] + [str(s)] + args[8:])))["text"] for s in range(4, 9)}
    assert len(others | {a["text"]}) > 1  # the seed matters


def test_generate_matches_api(runner, gpt2_dir):
    import nbformer

    out = _ok(runner.invoke(main, ["generate", "once upon", "--model", str(gpt2_dir), "-n", "6"]))
    want = nbformer.load(gpt2_dir).generate("once upon", max_new_tokens=6, temperature=0.0, seed=0)
    assert out == want + "\n"


# ---------------------------------------------------------------- one-line errors
def test_error_missing_model_path(runner, tmp_path):
    missing = str(tmp_path / "no-such-model")
    _one_line_error(runner.invoke(main, ["embed", "x", "--model", missing]), missing)
    _one_line_error(runner.invoke(main, ["generate", "x", "--model", missing]), missing)
    _one_line_error(runner.invoke(main, ["inspect", missing]), missing)


@pytest.mark.parametrize("p", ["1.5", "0", "-0.2"])
def test_error_bad_top_p(runner, gpt2_dir, p):
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(gpt2_dir), "--top-p", p]), "top_p")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_error_bad_max_new_tokens(runner, gpt2_dir, n):
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(gpt2_dir), "--max-new-tokens", n]),
                    "max_new_tokens")


def test_error_negative_temperature(runner, gpt2_dir):
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(gpt2_dir), "-t", "-1"]), "temperature")


def test_error_too_many_new_tokens(runner, gpt2_dir):
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(gpt2_dir), "-n", "100"]), "32")


def test_error_generate_with_encoder(runner, bert_dir):
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(bert_dir)]), "encoder")


def test_error_embed_no_texts(runner):
    _one_line_error(runner.invoke(main, ["embed"]), "no texts")
    _one_line_error(runner.invoke(main, ["embed", "--json"]), "no texts")


def test_error_embed_with_decoder(runner, gpt2_dir):
    _one_line_error(runner.invoke(main, ["embed", "x", "--model", str(gpt2_dir)]), str(gpt2_dir))


def test_error_embed_unreadable_file(runner, tmp_path):
    _one_line_error(runner.invoke(main, ["embed", "--file", str(tmp_path / "none.txt")]), "none.txt")


def test_error_embed_bad_batch_size(runner):
    _one_line_error(runner.invoke(main, ["embed", "x", "--batch-size", "0"]), "batch_size")


def test_error_inspect_bad_sizes(runner, gpt2_dir):
    _one_line_error(runner.invoke(main, ["inspect", str(gpt2_dir), "--seq", "33"]), "33", "32")
    _one_line_error(runner.invoke(main, ["inspect", str(gpt2_dir), "--batch", "0"]), "--batch")


def test_error_corrupt_weights(runner, tmp_path, gpt2_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(gpt2_dir, d)
    (d / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n")
    _one_line_error(runner.invoke(main, ["generate", "hi", "--model", str(d)]), "git-lfs")


# ---------------------------------------------------------------- real processes
def _clean_env():
    env = dict(os.environ)
    env.pop("NBFORMER_EMBED_MODEL", None)
    env.pop("NBFORMER_GENERATE_MODEL", None)
    return env


def test_import_does_not_import_torch():
    code = "import sys, nbformer; from cli.main import main; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_help_does_not_import_torch():
    code = ("import sys\nfrom cli.main import main\nsys.argv = ['nbformer', '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('EXIT', code, 'torch' in sys.modules, 'numba' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr
    assert "embed" in r.stdout and "generate" in r.stdout and "inspect" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "EXIT 0 False False", r.stdout


def _console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "nbformer")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "cli.main"]


def test_console_script_help():
    r = subprocess.run(_console_script() + ["--help"], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr
    for cmd in ("embed", "generate", "inspect"):
        assert cmd in r.stdout
    assert r.stderr == ""


def test_console_script_error_is_one_line(tmp_path):
    missing = str(tmp_path / "missing-model")
    r = subprocess.run(_console_script() + ["generate", "hello", "--model", missing],
                       capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0], r.stderr
