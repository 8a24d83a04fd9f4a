"""Training: whole-model gradients vs torch autograd, Adam trajectories vs torch.optim,
determinism, bit-identical resume, and a short run that must beat the unigram baseline."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbformer  # noqa: E402
from nbformer.config import ModelConfig  # noqa: E402
from nbformer.errors import InputError, NbformerError  # noqa: E402
from nbformer.training.data import TokenData  # noqa: E402
from nbformer.training.trainer import TrainOptions, Trainer, TrainingDiverged, init_params  # noqa: E402
from nbformer.weights import hf_gpt2  # noqa: E402

torch.set_num_threads(2)

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def rel_check(got, want, name, tol=1e-4):
    # floor: some gradients are exactly 0 in exact arithmetic (the key bias: softmax ignores a per-row
    # constant), and both sides then hold rounding noise of ~1e-12
    scale = max(np.abs(want).max(), 1e-7)
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{name}: max error {err:.2e} relative to the largest gradient (tol {tol})"


def torch_grads(model):
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=131, n_positions=96, n_embd=64, n_layer=2, n_head=4, **NO_DROPOUT)
    m = transformers.GPT2LMHeadModel(cfg)
    d = tmp_path_factory.mktemp("gpt2-train")
    m.save_pretrained(d, safe_serialization=True)
    return m, d


@pytest.mark.parametrize("B,T,pad", [(1, 1, False), (2, 33, True), (3, 70, True)])
def test_gpt2_gradients_match_torch(gpt2, B, T, pad):
    hf, d = gpt2
    nb = nbformer.load(d)
    rng = np.random.default_rng(T)
    ids = rng.integers(0, 131, (B, T))
    mask = np.ones((B, T), np.int64)
    labels = ids.copy()
    if pad:
        mask[-1, T // 2:] = 0
        labels[-1, T // 2:] = -100
    loss, grads = nb.loss_and_grads(ids, labels, attention_mask=mask)
    hf.zero_grad()
    out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    if T > 1:
        out.loss.backward()
        assert abs(loss - out.loss.item()) < 1e-5
        want = torch_grads(hf)
        assert set(want) <= set(grads) | {"lm_head.weight"}
        for name, g in want.items():
            rel_check(grads[name], g, name)
    else:  # one token: nothing to predict, the loss is 0 and so are the gradients
        assert loss == 0.0 and all(not np.any(g) for g in grads.values())


def test_bert_gradients_match_torch(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=80, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertModel(cfg, add_pooling_layer=False)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    nb = nbformer.load(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (2, 21))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    tt = rng.integers(0, 2, ids.shape)
    target = rng.normal(size=(2, 21, 48)).astype(np.float32)
    h = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
           token_type_ids=torch.from_numpy(tt)).last_hidden_state
    tloss = torch.nn.functional.mse_loss(h, torch.from_numpy(target))
    tloss.backward()
    # a loss on the hidden state: mean squared error against a random target (token types via vjp)
    out, grads = nb.vjp(ids, (2.0 / target.size) * (h.detach().numpy() - target), mask, tt)
    for name, g in torch_grads(hf).items():
        rel_check(grads[name], g, name)
    loss, grads2 = nb.loss_and_grads(ids, target, attention_mask=mask)
    hf.zero_grad()
    tl = torch.nn.functional.mse_loss(hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                                         ).last_hidden_state, torch.from_numpy(target))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-6
    for name, g in torch_grads(hf).items():
        rel_check(grads2[name], g, name)


def test_label_smoothed_loss_equals_torch(gpt2):
    hf, d = gpt2
    nb = nbformer.load(d)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 131, (2, 12))
    labels = ids.copy()
    labels[0, 3] = -100
    loss, grads = nb.loss_and_grads(ids, labels, label_smoothing=0.1)
    logits = hf(torch.from_numpy(ids)).logits
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    want = ce(logits[:, :-1].reshape(-1, 131), torch.from_numpy(labels[:, 1:]).reshape(-1))
    hf.zero_grad()
    want.backward()
    assert abs(loss - want.item()) < 1e-5
    rel_check(grads["transformer.wte.weight"], hf.transformer.wte.weight.grad.numpy(), "wte")


def small_cfg(**kw):
    base = dict(arch="decoder", vocab_size=64, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_positions=64,
                norm="pre", activation="gelu_tanh", final_layernorm=True)
    base.update(kw)
    return ModelConfig(**base)


def synthetic_tokens(n=6000, V=64, seed=0):
    """A learnable stream: a noisy repeating pattern (the unigram baseline cannot see the order)."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, V, 37)
    ids = np.resize(pattern, n)
    flip = rng.random(n) < 0.05
    ids[flip] = rng.integers(0, V, flip.sum())
    return ids


def to_hf_state(cfg, params):
    state = {}
    for r in hf_gpt2.rules(cfg, "transformer."):
        state.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.inverse(params[r.canonical]).items()})
    return state


@pytest.mark.parametrize("optimizer,wd", [("adam", 0.0), ("adamw", 0.01)])
def test_ten_adam_steps_match_torch(tmp_path, optimizer, wd):
    cfg = small_cfg()
    params = init_params(cfg, seed=3)
    data = TokenData(synthetic_tokens(), eval_fraction=0.1)
    opts = TrainOptions(batch_size=4, seq_len=16, steps=10, lr=3e-3, schedule="constant", warmup=0, clip=0.0,
                        optimizer=optimizer, weight_decay=wd, eval_every=100, save_every=100)
    tr = Trainer(cfg, params, data, opts, tmp_path, "{}", progress=False)
    ours = [tr.train_step()["loss"] for _ in range(10)]

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, **NO_DROPOUT))
    missing, unexpected = hf.load_state_dict(to_hf_state(cfg, params), strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing)
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = cls(hf.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=wd)
    theirs = []
    for step in range(1, 11):
        x, y = data.batch(0, step, 4, 16)
        logits = hf(torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), torch.from_numpy(y).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    assert np.max(np.abs(np.array(ours) - np.array(theirs))) < 1e-4, (ours, theirs)
    assert ours[-1] < ours[0]


def run_trainer(tmp_path, steps, dropout=0.1, resume_from=None, stop_at=None, **kw):
    cfg = small_cfg()
    data = TokenData(synthetic_tokens(), eval_fraction=0.1)
    opts = TrainOptions(batch_size=4, seq_len=16, steps=steps, lr=2e-3, warmup=3, dropout=dropout,
                        label_smoothing=0.05, eval_every=5, save_every=4, seed=11, **kw)
    tr = Trainer(cfg, init_params(cfg, seed=11), data, opts, tmp_path, '{"fake": "tokenizer"}', progress=False)
    if resume_from is not None:
        tr.resume(resume_from)
    if stop_at is not None:
        while tr.step < stop_at:
            tr.train_step()
        tr.save()
        return tr
    tr.fit()
    return tr


def test_two_runs_are_bit_identical(tmp_path):
    a = run_trainer(tmp_path / "a", 8)
    b = run_trainer(tmp_path / "b", 8)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert np.array_equal(a.flat.params, b.flat.params)


def test_resume_is_bit_identical(tmp_path):
    full = run_trainer(tmp_path / "full", 12)
    run_trainer(tmp_path / "part", 12, stop_at=5)  # interrupted after step 5, checkpoint saved
    resumed = run_trainer(tmp_path / "part", 12, resume_from=tmp_path / "part" / "checkpoint.safetensors")
    assert resumed.step == 12
    assert [r["loss"] for r in full.history[5:]] == [r["loss"] for r in resumed.history]
    assert np.array_equal(full.flat.params, resumed.flat.params)
    assert np.array_equal(full.m, resumed.m) and np.array_equal(full.v, resumed.v)
    loaded = nbformer.load(tmp_path / "part" / "model.safetensors")
    assert np.array_equal(loaded.ckpt.params["h0.attn.qkv.w"], full.flat.views["h0.attn.qkv.w"])


def test_short_run_beats_unigram_baseline(tmp_path):
    cfg = small_cfg()
    data = TokenData(synthetic_tokens(20000), eval_fraction=0.1)
    opts = TrainOptions(batch_size=8, seq_len=32, steps=150, lr=3e-3, warmup=15, eval_every=50, save_every=150)
    tr = Trainer(cfg, init_params(cfg), data, opts, tmp_path, "{}", progress=False)
    summary = tr.fit()
    baseline = data.unigram_entropy()
    assert summary["eval_loss"] < 0.5 * baseline, (summary, baseline)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 150 and "eval_loss" in log[-1]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    tr = run_trainer(tmp_path, 8, stop_at=4)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    tr.flat.views["h0.ln1.w"][0] = np.nan
    with pytest.raises(TrainingDiverged, match="step 5"):
        tr.fit()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_bad_training_options(tmp_path):
    cfg = small_cfg()
    data = TokenData(synthetic_tokens(200))
    with pytest.raises(InputError, match="seq-len"):
        Trainer(cfg, init_params(cfg), data, TrainOptions(seq_len=65), tmp_path, "{}")
    with pytest.raises(InputError, match="batch"):
        Trainer(cfg, init_params(cfg), TokenData(synthetic_tokens(40)), TrainOptions(batch_size=64, seq_len=16),
                tmp_path, "{}")
    with pytest.raises(InputError, match="schedule"):
        Trainer(cfg, init_params(cfg), data, TrainOptions(seq_len=16, schedule="linear"), tmp_path, "{}")
    with pytest.raises(InputError, match="only decoder"):
        Trainer(small_cfg(arch="encoder", lm_head=False), init_params(cfg), data, TrainOptions(seq_len=16),
                tmp_path, "{}")


def test_resume_rejects_mismatched_or_corrupt_checkpoints(tmp_path):
    run_trainer(tmp_path / "a", 8, stop_at=4)
    ckpt = tmp_path / "a" / "checkpoint.safetensors"
    cfg = small_cfg()
    other = TokenData(synthetic_tokens(seed=9), eval_fraction=0.1)
    opts = TrainOptions(batch_size=4, seq_len=16, steps=8, dropout=0.1, label_smoothing=0.05, seed=11)
    tr = Trainer(cfg, init_params(cfg), other, opts, tmp_path / "b", "{}", progress=False)
    with pytest.raises(InputError, match="different data"):
        tr.resume(ckpt)
    tr2 = Trainer(small_cfg(d_ff=32), init_params(small_cfg(d_ff=32)), TokenData(synthetic_tokens(), 0.1), opts,
                  tmp_path / "c", "{}", progress=False)
    with pytest.raises(NbformerError, match="config does not match"):
        tr2.resume(ckpt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(NbformerError, match="bad.safetensors"):
        tr2.resume(bad)


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = small_cfg()
    opts = TrainOptions(batch_size=2, seq_len=8, steps=2, save_every=1)
    tr = Trainer(cfg, init_params(cfg), TokenData(synthetic_tokens(300)), opts, blocker / "out", "{}", progress=False)
    with pytest.raises(NbformerError, match="out"):
        tr.fit()


def test_the_evaluation_model_sees_every_step_of_training(tmp_path):
    """Trainer.model() binds read-only views of the live parameters, whose AMX packs gemm_amx keeps:
    after each optimizer step (and a resume) they are dropped, so the model's outputs are those of a
    fresh model over a copy of the current parameters, bit for bit (products big enough for AMX)."""
    from nbformer.kernels.cpu import gemm_amx
    from nbformer.model import Model
    from nbformer.weights import Checkpoint

    cfg = ModelConfig(arch="decoder", vocab_size=512, d_model=128, n_heads=4, n_layers=1, d_ff=256, max_positions=128)
    data = TokenData(np.random.default_rng(0).integers(0, 512, 20000), eval_fraction=0.0)
    opts = TrainOptions(batch_size=2, seq_len=128, steps=10, lr=1e-2, schedule="constant", warmup=0, clip=0.0,
                        eval_every=10 ** 6, save_every=10 ** 6)
    tok = open("weights/kjv-gpt/tokenizer.json", encoding="utf-8").read()
    tr = Trainer(cfg, init_params(cfg, seed=0), data, opts, tmp_path, tok, progress=False)
    ids = np.random.default_rng(1).integers(0, 512, (1, 128))
    before = tr.model().forward(ids)
    assert not gemm_amx.available() or gemm_amx._packed  # (its weights were packed and kept)
    for _ in range(2):
        tr.train_step()
    now = tr.model().forward(ids)
    fresh = Model(Checkpoint(config=cfg, params={k: v.copy() for k, v in tr.flat.views.items()}, rules=[],
                             path=None)).forward(ids)
    assert np.abs(now - before).max() > 1e-3  # training changed the outputs
    np.testing.assert_array_equal(now, fresh)
