"""Hugging Face MarianMTModel parity: encoder output, logits and gradients vs transformers (random init)."""
import numpy as np
import pytest
import torch

import nbformer
from nbformer.errors import NbformerError

transformers = pytest.importorskip("transformers")

V, PAD, EOS = 61, 60, 0


def make_marian(tmp_path, act="swish", scale=True, seed=0, **kw):
    """A random Marian model saved to disk; kw overrides MarianConfig's sizes (the CUDA tests use a
    smaller one)."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    sizes.update(kw)
    cfg = transformers.MarianConfig(
        activation_function=act, scale_embedding=scale, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD, forced_eos_token_id=EOS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, **sizes)
    hf = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():  # make every tensor matter: non-trivial LayerNorms and logits bias
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        hf.final_logits_bias.copy_(0.5 * torch.randn_like(hf.final_logits_bias))
    d = tmp_path / f"marian-{act}-{scale}-{seed}"
    hf.save_pretrained(d, safe_serialization=True)
    return hf, d


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, PAD, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0  # right-padded source row
    src[1, 6:] = PAD
    tgt = rng.integers(1, PAD, (3, 7))
    return src, mask, tgt


@pytest.mark.parametrize("act,scale", [("swish", True), ("gelu", False), ("relu", True)])
def test_marian_forward_parity(tmp_path, act, scale):
    hf, d = make_marian(tmp_path, act, scale)
    m = nbformer.load(d)
    assert m.config.arch == "encoder_decoder" and m.config.family == "marian"
    src, mask, tgt = _batch()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(tgt))
        enc_ref = hf.model.encoder(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask)).last_hidden_state
    enc = m.encode(src, mask)
    real = mask.astype(bool)
    assert np.abs(enc - enc_ref.numpy())[real].max() <= 1e-4
    logits = m.forward(src, mask, decoder_input_ids=tgt)
    assert logits.shape == (3, 7, V)
    assert np.abs(logits - out.logits.numpy()).max() <= 1e-4


def test_marian_gradient_parity(tmp_path):
    hf, d = make_marian(tmp_path)
    m = nbformer.load(d)
    src, mask, tgt = _batch(2)
    labels = tgt.copy()
    labels[2, 5:] = -100  # ignored target positions
    hf.zero_grad()
    out = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    loss, grads = m.loss_and_grads(src, labels, attention_mask=mask)
    assert abs(loss - out.loss.item()) <= 1e-5
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    assert "model.shared.weight" in grads and "model.decoder.layers.2.encoder_attn.k_proj.weight" in grads
    checked = 0
    for name, g in ref.items():
        mine = grads[name]
        scale = max(np.abs(g).max(), 1e-12)
        assert np.abs(mine - g).max() <= 1e-4 * scale + 1e-7, name
        checked += 1
    assert checked > 50


def test_marian_cached_decoding_matches_uncached(tmp_path):
    _, d = make_marian(tmp_path)
    m = nbformer.load(d)
    src, mask, _ = _batch(3)
    start = np.full((3, 1), PAD)
    sessions = [m.session(3, 12, source_ids=src, source_mask=mask, cache=c) for c in (True, False)]
    la, lb = (s.start(start) for s in sessions)
    worst = np.abs(la - lb).max()
    rng = np.random.default_rng(0)
    for t in range(10):
        nxt = rng.integers(0, V, 3)
        if t == 4:
            for s in sessions:
                s.reorder(np.array([2, 0, 0]))
        la, lb = (s.step(nxt) for s in sessions)
        worst = max(worst, np.abs(la - lb).max())
    assert worst <= 1e-5


def test_marian_config_errors(tmp_path):
    _, d = make_marian(tmp_path)
    import json
    cfgp = d / "config.json"
    c = json.loads(cfgp.read_text())
    c["decoder_ffn_dim"] = 64
    cfgp.write_text(json.dumps(c))
    with pytest.raises(NbformerError, match="decoder_ffn_dim"):
        nbformer.load(d)


def test_decoder_input_ids_required(tmp_path):
    _, d = make_marian(tmp_path)
    m = nbformer.load(d)
    with pytest.raises(NbformerError, match="decoder_input_ids"):
        m.forward([[1, 2, 3]])
