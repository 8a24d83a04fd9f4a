"""`nbformer train` end to end on a small public-domain text: tokenizer training, checkpoints,
logs, resume, generation from the result, and the bad-input paths."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import nbformer
from cli.main import main

TEXT = Path(__file__).parent / "data" / "kjv_genesis_excerpt.txt"
TINY = ["--d-model", "64", "--layers", "2", "--heads", "2", "--d-ff", "128", "--vocab-size", "400",
        "--seq-len", "32", "--batch", "8", "--lr", "3e-3", "--warmup", "20", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = invoke("train", TEXT, "--out", out, "--steps", 200, "--eval-every", 100, "--save-every", 100, *TINY)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_training_beats_the_unigram_baseline(trained):
    out, text = trained
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    baseline = float(text.split("unigram baseline ")[1].split()[0])
    assert log[0]["loss"] > baseline  # starts near log(V)
    assert log[-1]["step"] == 200 and log[-1]["eval_loss"] < baseline - 0.5, (log[-1], baseline)
    for name in ("checkpoint.safetensors", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists()


def test_the_trained_model_generates(trained):
    out, _ = trained
    m = nbformer.load(out / "model.safetensors")
    a = m.generate("And God said", max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert a.startswith("And God said") and len(a) > len("And God said")
    assert a == m.generate("And God said", max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    r = invoke("generate", "In the beginning", "--model", out / "model.safetensors", "-n", 8)
    assert r.exit_code == 0 and r.output.startswith("In the beginning")


def test_resume_continues_the_run(trained, tmp_path):
    out, _ = trained
    r = invoke("train", TEXT, "--out", out, "--steps", 220, "--eval-every", 100, "--save-every", 100, "--resume",
               *TINY)
    assert r.exit_code == 0, r.output
    assert "finished step 220" in r.output
    r = invoke("train", TEXT, "--out", out, "--steps", 10, *TINY)
    assert r.exit_code == 1 and "--resume" in r.output


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\xff\xfe\x00bad", "UTF-8"), (b"   \n\n", "empty")])
def test_bad_text_files(tmp_path, content, needle):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(tmp_path / "o"), *TINY])
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output


def test_bad_sizes(trained, tmp_path):
    out, _ = trained  # fine-tuning: the loaded model has 128 positions
    r = CliRunner().invoke(main, ["train", str(TEXT), "--out", str(tmp_path / "o"), "--model",
                                  str(out / "model.safetensors"), "--seq-len", "4096", "--quiet"])
    assert r.exit_code == 1 and "--seq-len 4096" in r.output and "positions" in r.output
    small = tmp_path / "small.txt"
    small.write_text("In the beginning God created the heaven and the earth.\n")
    r = CliRunner().invoke(main, ["train", str(small), "--out", str(tmp_path / "p"), *TINY])
    assert r.exit_code == 1 and ("too few" in r.output or "larger than the data" in r.output)
    r = CliRunner().invoke(main, ["train", str(TEXT), "--out", str(tmp_path / "q"), "--resume", *TINY])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_default_model_is_the_shipped_one():
    r = invoke("generate", "And God said", "-n", 6)
    assert r.exit_code == 0 and r.output.startswith("And God said")
    m = nbformer.load(Path(__file__).parent.parent / "weights" / "kjv-gpt" / "model.safetensors")
    assert m.config.n_layers == 4 and m.num_parameters == 2_590_848
