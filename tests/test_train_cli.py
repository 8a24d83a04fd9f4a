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


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """SIGINT finishes the current step, writes the checkpoint, prints one line, exits 0; resuming from
    it gives the uninterrupted run's weights bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    root = Path(__file__).parent.parent
    # constant schedule: the lr of a step must not depend on --steps, which differs between the runs
    args = [sys.executable, "-m", "cli.main", "train", str(TEXT), "--steps", "400", "--eval-every", "1000",
            "--save-every", "1000", "--schedule", "constant", *TINY]
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "a")], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    log = tmp_path / "a" / "train_log.jsonl"
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.2)  # wait until training is under way (first log line at step 10)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "interrupted at step" in out and "Traceback" not in out
    stopped = int(out.split("interrupted at step ")[1].split(":")[0])
    assert 10 <= stopped < 400
    from nbformer.training.checkpoint import load_training

    _, params_a, _, _, _, state = load_training(tmp_path / "a" / "checkpoint.safetensors")
    assert state["step"] == stopped
    # an uninterrupted run to the same step has the same weights
    r = invoke("train", TEXT, "--out", tmp_path / "b", "--steps", stopped, "--eval-every", 1000, "--save-every", 1000,
               "--schedule", "constant", *TINY)
    assert r.exit_code == 0, r.output
    _, params_b, _, _, _, _ = load_training(tmp_path / "b" / "checkpoint.safetensors")
    assert all(np.array_equal(params_a[k], params_b[k]) for k in params_a)


def test_inspect_train_prints_the_training_memory_plan(trained):
    out, _ = trained
    r = invoke("inspect", out / "model.safetensors", "--batch", 4, "--seq", 32, "--train")
    assert r.exit_code == 0, r.output
    for word in ("parameters:", "gradients:", "optimizer state:", "activations arena:", "total:"):
        assert word in r.output
