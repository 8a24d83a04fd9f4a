"""nbformer/kernels/cpu/precompile.py: the first run compiles the kernels it needs in parallel
worker processes into Numba's on-disk cache, says so once on stderr, and later runs find
everything in that cache; every kernel the graphs run is declared, with one signature.

The first two tests start from an empty NUMBA_CACHE_DIR, so they compile the generation kernels
once (tens of seconds on 2 cores); the coverage test uses whatever cache the tree has.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = "compiling kernels for this CPU (first run only)"
GEN = ["generate", "And God said", "-n", "3", "--temperature", "0.8", "--top-k", "40", "--seed", "1"]

# the CLI in-process, then what Numba's cache did for the declared kernels (on stderr's last line)
_RUN_AND_COUNT = r"""
import json, sys
from cli.main import main
from nbformer.kernels.cpu import precompile as P
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    hits = sum(sum(k.disp._cache_hits.values()) for k in P._KERNELS.values())
    misses = sum(sum(k.disp._cache_misses.values()) for k in P._KERNELS.values())
    sys.stderr.write("\nCACHE " + json.dumps({"hits": hits, "misses": misses, "unplanned": len(P.unplanned)}) + "\n")
"""


def _env(cache_dir=None, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "NBFORMER_PROGRESS")}
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _run(args, cache_dir, code=None, **extra):
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cli.main", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir, **extra), capture_output=True, timeout=1800)
    # decoded by hand: text mode would turn the progress line's carriage returns into newlines
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _progress_lines(stderr):
    return [ln for ln in stderr.split("\n") if PROGRESS in ln]


def _cache_report(stderr):
    return json.loads(stderr.strip().splitlines()[-1].split("CACHE ", 1)[1])


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """`nbformer generate` once on an empty NUMBA_CACHE_DIR, with the progress line asked for."""
    cache = tmp_path_factory.mktemp("numba-cache")
    r = _run(GEN, cache, NBFORMER_PROGRESS="1")
    return cache, r


def test_first_run_says_it_compiles_once_and_the_second_run_finds_the_cache(cold_run):
    cache, first = cold_run
    lines = _progress_lines(first.stderr)
    assert len(lines) == 1, first.stderr  # one line, updated in place with \r
    states = re.findall(r"(\d+)/(\d+)", lines[0])
    assert states and states[-1][0] == states[-1][1] and int(states[-1][1]) >= 5, lines[0]
    assert len(states) > 2  # it showed progress, not just the start and the end
    assert first.stdout.startswith("And God said") and len(first.stdout) > len("And God said\n")
    assert list(Path(cache).rglob("*.nbi")), "the workers wrote no cache index into NUMBA_CACHE_DIR"

    # the same command again: silent, and every kernel it runs comes from the workers' cache
    second = _run(GEN, cache, code=_RUN_AND_COUNT, NBFORMER_PROGRESS="1")
    assert not _progress_lines(second.stderr), second.stderr
    report = _cache_report(second.stderr)
    assert report["hits"] > 0 and report["misses"] == 0 and report["unplanned"] == 0, report
    assert second.stdout == first.stdout  # same seed, same text


def _drop_from_cache(cache, key):
    gone = [p for p in Path(cache).rglob(f"*{key}-*") if p.suffix in (".nbi", ".nbc")]
    assert gone, f"no cache files of {key} in {cache}"
    for p in gone:
        p.unlink()


def test_json_output_prints_no_progress(cold_run):
    cache, _ = cold_run
    _drop_from_cache(cache, "elementwise._take_rows")  # one kernel to compile again
    r = _run(GEN, cache, NBFORMER_PROGRESS="1")
    assert [ln.rsplit("\r", 1)[-1].split(" in ")[0] for ln in _progress_lines(r.stderr)] == [f"{PROGRESS} 1/1"], r.stderr
    _drop_from_cache(cache, "elementwise._take_rows")
    r = _run(GEN + ["--json"], cache, NBFORMER_PROGRESS="1")
    assert not _progress_lines(r.stderr), r.stderr
    assert json.loads(r.stdout)["text"].startswith("And God said")


def test_warm_cache_prints_nothing_even_on_a_terminal_request(cold_run):
    cache, _ = cold_run
    r = _run(GEN, cache, NBFORMER_PROGRESS="1")
    assert r.stderr == "", r.stderr


# every graph family the CLI runs: which kernels ran, which ensure_compiled listed before they ran
_COVERAGE = r"""
import importlib, json, pkgutil, sys, tempfile
import numpy as np
from numba.core.registry import CPUDispatcher
import nbformer
import nbformer.kernels.cpu as cpu_pkg
from nbformer.kernels.cpu import precompile as P

requested = set()
_orig = P.kernels_for
def _spy(graph, **kw):
    keys = _orig(graph, **kw)
    requested.update(keys)
    return keys
P.kernels_for = _spy

m = nbformer.load("weights/kjv-gpt")
ids = np.array([m.tokenizer.encode("And God said unto Moses")], dtype=np.int64)
m.forward(ids)
m.generate("And God said", max_new_tokens=3)
m.generate("And God said", max_new_tokens=3, temperature=0.8, top_k=40, top_p=0.9, seed=1)
m.generate(["And God said", "In the beginning"], max_new_tokens=3, num_beams=2)
m.loss_and_grads(ids, labels=ids, label_smoothing=0.1)

from nbformer.training.data import TokenData
from nbformer.training.trainer import TrainOptions, Trainer, init_params
cfg = m.config
data = TokenData(np.resize(np.arange(50, dtype=np.int64), 4000), eval_fraction=0.1)
opts = TrainOptions(batch_size=2, seq_len=16, steps=1, dropout=0.1, label_smoothing=0.1, eval_every=1, save_every=100)
tr = Trainer(cfg, init_params(cfg, seed=0), data, opts, tempfile.mkdtemp(), "{}", progress=False)
tr.train_step()
tr.evaluate()

mt = nbformer.load("weights/dates-transformer")
mt.generate(["Thursday, March 7, 2024"])
mt.generate(["Thursday, March 7, 2024", "7.3.1987"], num_beams=2)

from nbformer.defaults import default_embedder_path
try:
    emb = nbformer.Embedder(default_embedder_path())
except nbformer.NbformerError:
    emb = None
if emb is not None:
    emb.encode(["hello", "a longer second sentence"])

ran = {}
for info in pkgutil.iter_modules(cpu_pkg.__path__):
    mod = sys.modules.get(f"nbformer.kernels.cpu.{info.name}")
    for v in vars(mod).values() if mod else ():
        if isinstance(v, CPUDispatcher) and v.py_func.__module__ == mod.__name__ and v.signatures:
            ran[f"{info.name}.{v.py_func.__name__}"] = len(v.signatures)
print(json.dumps({"ran": ran, "requested": sorted(requested), "embedder": emb is not None,
                  "declared": {k: len(v.sigs) for k, v in P._KERNELS.items()},
                  "unplanned": [[k, [str(t) for t in tys]] for k, tys in P.unplanned]}))
"""


def test_every_kernel_the_graphs_run_is_declared_and_listed_before_it_runs():
    r = _run([], None, code=_COVERAGE)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ran, requested, declared = got["ran"], set(got["requested"]), got["declared"]
    assert ran, "no kernel ran?"
    assert not [k for k in ran if k not in declared], "kernels without @kernel signatures ran"
    assert not [k for k in ran if k not in requested], "kernels ran that ensure_compiled did not list first"
    assert {k: n for k, n in ran.items() if n != declared[k]} == {}, "a kernel compiled more than its signatures"
    assert got["unplanned"] == []
    must = {"linear._linear_fwd", "attention._attention_forward_core", "attention_backward._dkdv",
            "linear._linear_backward_elementwise", "optim._adam_step", "dropout._dropout",
            "kv_cache._gather_rows", "sampling._sample"}
    if got["embedder"]:
        must |= {"pooling._pool", "pooling._l2_normalize"}
    assert must <= set(ran), must - set(ran)


def test_ops_map_to_declared_kernels():
    from nbformer.kernels.cpu import precompile as P

    declared = P.all_kernels()
    for (op, direction), keys in P.OPS.items():
        for k in keys:
            assert k in declared, (op, direction, k)
    for k in declared.values():
        assert k.sigs and all(isinstance(s, tuple) for s in k.sigs)


def test_a_training_graph_lists_only_the_attention_backward_schedule_its_shapes_choose():
    from nbformer.config import ModelConfig
    from nbformer.graph.build import build_train
    from nbformer.kernels.cpu import precompile as P
    from nbformer.kernels.cpu.attention_backward import choose_passes

    cfg = ModelConfig(arch="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=64, max_positions=32)
    for B, threads in ((8, 2), (1, 2), (1, 16)):
        g, _ = build_train(cfg, B, 16)
        (node,) = [n for n in g.nodes if n.op == "attention" and n.direction == "backward"]
        keys = P._attention_backward_items(g, node, threads)
        if choose_passes(B, 4, threads) == 1:
            assert keys == ["attention_backward._one_pass_item"], (B, threads, keys)
        else:
            assert "attention_backward._dq_item" in keys and "attention_backward._one_pass_item" not in keys
    assert choose_passes(1, 4, 16) == 2  # the last case did take the two-pass branch
    g, _ = build_train(cfg, 8, 16)
    keys = P.kernels_for(g)
    assert "attention_backward._dkdv" in keys and len([k for k in keys if k.endswith("_item")]) >= 2


def test_short_prompts_and_decoding_steps_list_only_the_decode_attention_kernel():
    from nbformer.config import ModelConfig
    from nbformer.graph.build import build_forward, build_train
    from nbformer.kernels.cpu import precompile as P

    cfg = ModelConfig(arch="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=64, max_positions=32)
    tiled = set(P.OPS[("attention", "forward")])
    decode = {"attention_decode._attention_decode", "attention_decode._decode_item"}
    short, long_ = set(P.kernels_for(build_forward(cfg, 2, 4))), set(P.kernels_for(build_forward(cfg, 2, 5)))
    assert decode <= short and not tiled & short  # 4 query rows: the decode kernel only
    assert tiled <= long_ and not decode & long_
    g, _ = build_train(cfg, 2, 4, attn_dropout=0.1)  # dropout: the tiled kernel even for 4 rows
    assert tiled <= set(P.kernels_for(g))


def test_a_training_graph_on_amx_lists_the_amx_items_where_the_launcher_takes_them(monkeypatch):
    from nbformer.config import ModelConfig
    from nbformer.graph.build import build_train
    from nbformer.kernels.cpu import gemm_amx
    from nbformer.kernels.cpu import precompile as P

    monkeypatch.setattr(gemm_amx, "available", lambda: True)  # listing only: nothing is compiled or run
    # (head size, T, AMX?): heads of 64 and 8 dims (AMX_MIN_HEAD = 32); causal T = 640 and 128 (AMX_MIN_AREA_CAUSAL)
    for d_model, T, amx in ((256, 640, True), (32, 640, False), (256, 128, False)):
        cfg = ModelConfig(arch="decoder", vocab_size=50, d_model=d_model, n_heads=4, n_layers=1, d_ff=64,
                          max_positions=1024)
        g, _ = build_train(cfg, 8, T)
        (node,) = [n for n in g.nodes if n.op == "attention" and n.direction == "backward"]
        keys = P._attention_backward_items(g, node, 2)
        want = "attention_backward_amx._one_pass_item" if amx else "attention_backward._one_pass_item"
        assert keys == [want], (d_model, T, keys)
    monkeypatch.setattr(gemm_amx, "available", lambda: False)
    g, _ = build_train(ModelConfig(arch="decoder", vocab_size=50, d_model=256, n_heads=4, n_layers=1, d_ff=64,
                                   max_positions=1024), 8, 640)
    (node,) = [n for n in g.nodes if n.op == "attention" and n.direction == "backward"]
    assert P._attention_backward_items(g, node, 2) == ["attention_backward._one_pass_item"]


def test_linear_layers_list_amx_or_blas_kernels_by_the_shapes_of_their_products(monkeypatch):
    """Each product of a linear node (forward; backward dX and dW) lists the AMX kernel where
    linear_forward / linear_backward take it (gemm_amx.worth) and the BLAS one otherwise: a training
    graph of 1024 rows builds no BLAS GEMM, a 4-row one no AMX kernel; the weight packer only for
    read-only (inference) weights."""
    from nbformer.config import ModelConfig
    from nbformer.graph.build import build_forward, build_train
    from nbformer.kernels.cpu import gemm_amx
    from nbformer.kernels.cpu import precompile as P

    monkeypatch.setattr(gemm_amx, "available", lambda: True)  # listing only: nothing is compiled or run
    cfg = ModelConfig(arch="decoder", vocab_size=512, d_model=128, n_heads=4, n_layers=1, d_ff=256, max_positions=128)
    amx = {"linear._linear_amx"}
    blas = {"linear._linear_fwd", "gemm.matmul_nn", "gemm.matmul_tn"}
    big = set(P.kernels_for(build_train(cfg, 8, 128)[0], frozen_weights=False))
    assert amx <= big and not blas & big and "gemm_amx._pack_weight" not in big
    small = set(P.kernels_for(build_train(cfg, 1, 4)[0], frozen_weights=False))
    assert blas <= small and not amx & small
    infer = set(P.kernels_for(build_forward(cfg, 1, 128)))
    assert {"linear._linear_amx", "gemm_amx._pack_weight"} <= infer and "linear._linear_fwd" not in infer
    monkeypatch.setattr(gemm_amx, "available", lambda: False)
    assert not amx & set(P.kernels_for(build_train(cfg, 8, 128)[0], frozen_weights=False))
