"""KV-cache decoding sessions: cached == uncached (and == transformers) logits, layout, bad input."""
import numpy as np
import pytest
import torch

import nbformer
from nbformer.errors import InputError
from nbformer.kv_cache import KVCache

transformers = pytest.importorskip("transformers")
V = 97


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=48, n_embd=36, n_layer=2, n_head=3)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2-kv")
    hf.save_pretrained(d, safe_serialization=True)
    return hf, nbformer.load(d)


def _left_padded(rng, lengths, T):
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.uint8)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(0, V, n)
        mask[b, T - n:] = 1
    return ids, mask


def test_cached_equals_uncached_with_left_padding_and_reorder(gpt2):
    _, m = gpt2
    rng = np.random.default_rng(0)
    ids, mask = _left_padded(rng, [5, 1, 3], 5)  # one-token prompt included
    sc, su = m.session(3, 40, cache=True), m.session(3, 40, cache=False)
    a, b = sc.start(ids, mask), su.start(ids, mask)
    worst = np.abs(a - b).max()
    for t in range(30):  # tile edges: see test_small_attention_tiles_cross_many_tiles
        nxt = rng.integers(0, V, 3)
        if t in (7, 19):
            rows = rng.integers(0, 3, 3)
            sc.reorder(rows)
            su.reorder(rows)
        a, b = sc.step(nxt), su.step(nxt)
        worst = max(worst, np.abs(a - b).max())
    assert worst <= 1e-5
    assert sc.length == su.length == 35


def test_session_logits_match_transformers_left_padding(gpt2):
    hf, m = gpt2
    rng = np.random.default_rng(1)
    ids, mask = _left_padded(rng, [6, 2], 6)
    s = m.session(2, 12)
    mine = [s.start(ids, mask)]
    steps = rng.integers(0, V, (5, 2))
    for nxt in steps:
        mine.append(s.step(nxt))
    full = np.concatenate([ids, steps.T], axis=1).astype(np.int64)
    fmask = np.concatenate([mask, np.ones((2, 5), np.uint8)], axis=1).astype(np.int64)
    pos = np.cumsum(fmask, axis=1) - 1
    pos[fmask == 0] = 1
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(full), attention_mask=torch.tensor(fmask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    for k, lg in enumerate(mine):
        assert np.abs(lg - ref[:, 5 + k]).max() <= 1e-4


def test_small_attention_tiles_cross_many_tiles(gpt2, monkeypatch):
    """Decode past several key tiles (tiles patched small) so tile edges in the cache are exercised."""
    import nbformer.kernels.cpu.attention as att

    _, m = gpt2
    import functools

    orig = att.attention_forward

    @functools.wraps(orig)  # keeps the launcher's signature, which the tuning layer reads its defaults from
    def small(*a, **k):
        k.setdefault("block_q", 4)
        k.setdefault("block_k", 5)
        return orig(*a, **k)

    monkeypatch.setattr(att, "attention_forward", small)  # the registry looks launchers up at call time
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (2, 7))
    sc, su = m.session(2, 30), m.session(2, 30, cache=False)
    worst = np.abs(sc.start(ids) - su.start(ids)).max()
    for _ in range(20):
        nxt = rng.integers(0, V, 2)
        worst = max(worst, np.abs(sc.step(nxt) - su.step(nxt)).max())
    assert worst <= 1e-5


def test_cache_layout_is_planned(gpt2):
    _, m = gpt2
    cfg = m.config
    s = m.session(2, 10)
    assert s.cache.nbytes == KVCache.plan_bytes(cfg, 2, 10) == 4 * cfg.n_layers * 2 * 10 * 2 * cfg.d_model
    assert set(s.cache.views) == {f"cache.{i}" for i in range(cfg.n_layers)}
    base = s.cache.buffer.ctypes.data
    for v in s.cache.views.values():  # every layer's cache lives inside the one buffer
        assert base <= v.ctypes.data < base + s.cache.nbytes


def test_session_bad_input(gpt2):
    _, m = gpt2
    with pytest.raises(InputError, match="max_len"):
        m.session(1, 49)  # the model has 48 positions
    with pytest.raises(InputError, match="n_rows"):
        m.session(0, 8)
    s = m.session(2, 4)
    with pytest.raises(InputError, match="start"):
        s.step(np.array([1, 2]))
    with pytest.raises(InputError, match="rows"):
        s.start(np.ones((3, 2), np.int64))
    with pytest.raises(InputError, match="max_len"):
        s.start(np.ones((2, 5), np.int64))
    with pytest.raises(InputError, match="left-padded"):
        s.start(np.ones((2, 2), np.int64), np.array([[1, 0], [1, 1]]))
    s.start(np.ones((2, 3), np.int64))
    with pytest.raises(InputError, match="next_ids"):
        s.step(np.array([1, V]))
    with pytest.raises(InputError, match="reorder"):
        s.reorder(np.array([0, 2]))
    s.step(np.array([1, 2]))
    with pytest.raises(InputError, match="max_len"):
        s.step(np.array([1, 2]))
    with pytest.raises(InputError, match="source"):
        m.session(1, 4, source_ids=[[1, 2]])
