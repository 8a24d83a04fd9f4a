"""Training on CUDA against the same training on the CPU: every parameter gradient of tiny GPT-2,
BERT, Marian and the seeds' encoder-decoder (post- and pre-LN, padding, dropout on) within 1e-5 of
that tensor's largest gradient; 10 Adam steps with the same loss trajectory; two CUDA runs
bit-identical; resume bit-identical; a checkpoint written on CUDA resumes on the CPU and back.

Without a GPU this runs under Numba's CUDA simulator with tiny tiles (tests/conftest.py,
tests/cuda_tiles.py)."""
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

import nbformer  # noqa: E402
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.devices import DeviceError  # noqa: E402
from nbformer.training.data import TokenData  # noqa: E402
from nbformer.training.recipes import seq2seq_config  # noqa: E402
from nbformer.training.state import FlatBuffers, StepRunner  # noqa: E402
from nbformer.training.trainer import TrainOptions, Trainer, init_params  # noqa: E402

from cuda_tiles import tiny_cuda_tiles  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("tiny_cuda_tiles")

GPT2 = ModelConfig(arch="decoder", vocab_size=37, d_model=16, n_heads=2, n_layers=2, d_ff=24, max_positions=40,
                   norm="pre", activation="gelu_tanh", final_layernorm=True, family="gpt2")
BERT = ModelConfig(arch="encoder", vocab_size=45, d_model=12, n_heads=3, n_layers=1, d_ff=20, max_positions=24,
                   norm="post", activation="gelu", type_vocab_size=2, embedding_layernorm=True, lm_head=False,
                   layer_norm_eps=1e-12, pad_token_id=0, padding_idx=0, family="bert")
SEEDS = seq2seq_config(vocab_size=29, d_model=16, enc_layers=1, dec_layers=1, heads=2, d_ff=24, max_positions=32)
SEEDS_PRE = seq2seq_config(vocab_size=29, d_model=16, enc_layers=1, dec_layers=1, heads=4, d_ff=24, norm="pre",
                           activation="gelu", max_positions=32)


# Marian at one layer each side (the simulator runs one Python thread per CUDA thread)
TINY_MARIAN = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24)


def _params(cfg, seed):
    p = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for k, v in p.items():  # non-trivial LayerNorms and biases, so every gradient path matters
        if v.ndim == 1:
            v += (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    return p


def _check_grads(got: dict, want: dict, what, tol=1e-5):
    """Every tensor within tol of its largest gradient. Floor: a key bias's gradient is exactly 0 in
    exact arithmetic (softmax ignores a per-row constant), so both devices hold only rounding noise
    there; scales are floored at 1e-4 of the largest gradient of the model."""
    floor = 1e-4 * max(float(np.abs(w).max()) for w in want.values())
    for name, w in want.items():
        scale = max(float(np.abs(w).max()), floor, 1e-12)
        err = float(np.abs(got[name].astype(np.float64) - w).max()) / scale
        assert err <= tol, f"{what}: gradient of {name}: error {err:.2e} of its largest gradient > {tol}"


def _grads_close(cuda_flat, cpu_flat, what, tol=1e-5):
    _check_grads(cuda_flat.grad_dict(), cpu_flat.grad_dict(), what, tol)


def _step_both(cfg, B, T, dropout, seed, S=None, label_smoothing=0.0):
    rng = np.random.default_rng(seed)
    params = _params(cfg, seed)
    flats = {d: FlatBuffers(cfg, params, d) for d in ("cpu", "cuda")}
    runners = {d: StepRunner(f, B, T, loss="lm", dropout=dropout, label_smoothing=label_smoothing, S=S)
               for d, f in flats.items()}
    ids = rng.integers(1, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), np.uint8)
    mask[-1, T // 2:] = 0  # right padding in the last row
    targets = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    kw = {}
    if S is not None:
        src = rng.integers(2, cfg.vocab_size, (B, S))
        smask = np.ones((B, S), np.uint8)
        smask[0, S - 2:] = 0
        kw = {"src_ids": src, "src_mask": smask}
    losses = {d: r.run_lm(ids, targets, mask, seed=7, **kw)[0] for d, r in runners.items()}
    assert abs(losses["cuda"] - losses["cpu"]) <= 1e-5, losses
    return flats


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_decoder_gradients_match_cpu(dropout):
    flats = _step_both(GPT2, 2, 7, dropout, seed=1, label_smoothing=0.1)
    _grads_close(flats["cuda"], flats["cpu"], f"GPT-2 dropout {dropout}")


@pytest.mark.parametrize("cfg", [SEEDS, SEEDS_PRE], ids=["post-LN", "pre-LN"])
def test_seeds_model_gradients_match_cpu(cfg):
    flats = _step_both(cfg, 2, 5, 0.1, seed=2, S=6)
    _grads_close(flats["cuda"], flats["cpu"], f"seeds' model {cfg.norm}-LN")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_encoder_vjp_gradients_match_cpu(dropout):
    rng = np.random.default_rng(3)
    params = _params(BERT, 3)
    B, T = 2, 6
    ids = rng.integers(1, BERT.vocab_size, (B, T))
    ids[0, 0] = 0  # the padding_idx row gets no gradient on either device
    mask = np.ones((B, T), np.uint8)
    mask[1, 4:] = 0
    go = rng.standard_normal((B, T, BERT.d_model)).astype(np.float32)
    types = rng.integers(0, 2, (B, T))
    flats = {}
    for d in ("cpu", "cuda"):
        flats[d] = FlatBuffers(BERT, params, d)
        StepRunner(flats[d], B, T, loss="vjp", dropout=dropout).run_vjp(ids, go, mask, types)
    _grads_close(flats["cuda"], flats["cpu"], f"BERT vjp, dropout {dropout}")


def test_marian_gradients_with_dropout_and_padding_match_cpu(tmp_path):
    from test_marian import PAD, make_marian

    _, d = make_marian(tmp_path, **TINY_MARIAN)
    m = nbformer.load(d, device="cpu")
    cfg, rng = m.config, np.random.default_rng(5)
    B, S, T = 2, 6, 5
    src = rng.integers(1, PAD, (B, S))
    smask = np.ones((B, S), np.uint8)
    smask[1, 4:] = 0
    dec = rng.integers(1, PAD, (B, T))
    labels = rng.integers(1, PAD, (B, T))
    labels[0, -1] = -100
    flats = {}
    for dev in ("cpu", "cuda"):
        flats[dev] = FlatBuffers(cfg, m.ckpt.params, dev)
        r = StepRunner(flats[dev], B, T, loss="lm", dropout=0.1, label_smoothing=0.1, S=S)
        r.run_lm(dec, labels, seed=9, src_ids=src, src_mask=smask)
    _grads_close(flats["cuda"], flats["cpu"], "Marian, dropout 0.1")


def test_loss_and_grads_api_on_cuda_matches_cpu():
    """Model.loss_and_grads on device='cuda': the same loss, gradients keyed by the same names."""
    from nbformer.model import Model
    from nbformer.weights import Checkpoint
    from nbformer.weights.mapping import Rule

    params = _params(GPT2, 6)
    ckpt = Checkpoint(GPT2, params, [Rule(k, (k,)) for k in params], Path("tiny-gpt2"))
    ids = np.random.default_rng(6).integers(0, GPT2.vocab_size, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[0, :2] = 0
    out = {dev: Model(ckpt, device=dev).loss_and_grads(ids, ids, attention_mask=mask) for dev in ("cpu", "cuda")}
    assert abs(out["cuda"][0] - out["cpu"][0]) <= 1e-5
    assert set(out["cuda"][1]) == set(out["cpu"][1])
    _check_grads(out["cuda"][1], out["cpu"][1], "loss_and_grads")


# ---------------------------------------------------------------- the training loop
def _synthetic(n=1200, V=37, seed=0):
    """A learnable stream: a period-11 pattern with 10% random tokens."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) * 3) % 11
    noise = rng.random(n) < 0.1
    ids[noise] = rng.integers(0, V, int(noise.sum()))
    return ids


LOOP = GPT2.replace(n_layers=1)  # the loop tests run many steps: one layer keeps the simulator quick


def _trainer(tmp_path, device, steps=10, **kw):
    opts = TrainOptions(batch_size=2, seq_len=8, steps=steps, lr=1e-2, warmup=2, dropout=0.1, label_smoothing=0.05,
                        eval_every=1000, save_every=1000, seed=3, **kw)
    data = TokenData(_synthetic(), eval_fraction=0.1)
    return Trainer(LOOP, init_params(LOOP, seed=5), data, opts, tmp_path, '{"fake": "tokenizer"}', device=device,
                   progress=False)


def test_ten_adam_steps_follow_the_cpu(tmp_path, monkeypatch):
    """10 Adam steps with dropout and label smoothing: CUDA's losses are the CPU's within 1e-5 (two CUDA
    runs giving the same bits is shown by the resume test below: an interrupted and resumed run equals
    an uninterrupted one bit for bit). The CUDA steps read nothing back: five launched steps make no
    device-to-host copy, and one sync reads their five (loss, grad norm) pairs in one copy."""
    cpu = _trainer(tmp_path / "cpu", "cpu", clip=0.5)
    want = [cpu.train_step() for _ in range(10)]
    tr = _trainer(tmp_path / "cuda", "cuda", sync_every=5, clip=0.5)
    cls = type(tr._stats)
    copies = []
    real = cls.copy_to_host
    monkeypatch.setattr(cls, "copy_to_host", lambda self, *a, **k: copies.append(self.shape) or real(self, *a, **k))
    got = []
    for _ in range(2):
        for _ in range(5):
            tr._launch_step()
        assert copies == [], f"a CUDA training step copied {copies} back to the host"
        got += tr.sync()
        assert copies == [(5, 2)] and tr.syncs == len(got) // 5
        copies.clear()
    for key in ("loss", "grad_norm"):
        a, b = np.array([r[key] for r in got]), np.array([r[key] for r in want])
        assert np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)) <= 1e-5, (key, a, b)
    assert got[-1]["loss"] < got[0]["loss"]
    assert any(r["grad_norm"] > 0.5 for r in want), "clipping never ran: lower the clip"


def test_resume_on_cuda_is_bit_identical_and_checkpoints_cross_devices(tmp_path):
    full = _trainer(tmp_path / "full", "cuda", steps=4)
    full.fit()
    part = _trainer(tmp_path / "part", "cuda", steps=4)
    while part.step < 2:
        part.train_step()
    part.save()
    ckpt = tmp_path / "step2.safetensors"  # kept: the resumed run below overwrites part/ at step 4
    shutil.copyfile(tmp_path / "part" / "checkpoint.safetensors", ckpt)
    resumed = _trainer(tmp_path / "part", "cuda", steps=4)
    resumed.resume(ckpt)
    resumed.fit()
    assert [r["loss"] for r in full.history[2:]] == [r["loss"] for r in resumed.history]
    a, b = full.flat.state_dict(), resumed.flat.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(full.dev.to_host(full.m), resumed.dev.to_host(resumed.m))
    assert np.array_equal(full.dev.to_host(full.v), resumed.dev.to_host(resumed.v))
    # the CUDA checkpoint continues on the CPU within float tolerance of the CUDA run
    on_cpu = _trainer(tmp_path / "on-cpu", "cpu", steps=4)
    on_cpu.resume(ckpt)
    on_cpu.fit()
    assert np.max(np.abs(np.array([r["loss"] for r in on_cpu.history]) -
                         np.array([r["loss"] for r in full.history[2:]]))) <= 1e-5
    # and a CPU checkpoint continues on CUDA
    cpu_part = _trainer(tmp_path / "cpu-part", "cpu", steps=3)
    while cpu_part.step < 2:
        cpu_part.train_step()
    cpu_part.save()
    cpu_next = cpu_part.train_step()["loss"]
    back = _trainer(tmp_path / "cpu-part", "cuda", steps=3)
    back.resume(tmp_path / "cpu-part" / "checkpoint.safetensors")
    assert back.step == 2
    assert abs(back.train_step()["loss"] - cpu_next) <= 1e-5


def test_training_plan_larger_than_free_device_memory_is_refused(tmp_path, monkeypatch):
    from nbformer.devices import CudaDevice

    monkeypatch.setattr(CudaDevice, "free_bytes", lambda self: 4096)
    monkeypatch.setattr(CudaDevice, "total_bytes", lambda self: 8192)
    with pytest.raises(DeviceError, match=r"training plan at batch 2 x 8 needs .* but only"):
        _trainer(tmp_path, "cuda")


def test_cli_train_on_cuda(tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(tmp_path / "run"), "--device", "cuda",
                                  "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
                                  "--vocab-size", "300", "--batch", "2", "--seq-len", "8", "--steps", "3",
                                  "--eval-every", "3", "--save-every", "3", "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert Path(tmp_path / "run" / "checkpoint.safetensors").exists()
