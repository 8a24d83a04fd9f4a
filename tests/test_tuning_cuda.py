"""The CUDA kernel families' tuning spaces, under the simulator where there is no GPU: candidates
from the kernel files' CANDIDATES / constraints are validated against the float64 reference (their
timings mean nothing here), invalid ones are refused with the constraint that failed, and the
executor's binding hands cached CUDA tunables to the launchers."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda")

from nbformer.tuning import runtime  # noqa: E402
from nbformer.tuning.cache import TuningCache  # noqa: E402
from nbformer.tuning.space import get_family  # noqa: E402
from nbformer.tuning.tuner import CaseResult, model_graphs, tune_case  # noqa: E402

KJV = Path(__file__).resolve().parent.parent / "weights" / "kjv-gpt"
FAST = dict(budget_s=30, rounds=1, confirm_rounds=1, margin=0.0)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("NBFORMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NBFORMER_TUNING", "cached")
    runtime.forget()
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)  # the simulator's barriers poll: a short GIL interval is 5-10x faster
    yield
    sys.setswitchinterval(old)
    runtime.forget()


def test_cuda_linear_candidates_validate_and_constraints_refuse():
    fam = get_family("cuda", "linear")
    assert {t.name: t.bit_exact for t in fam.tunables()}["BM"] is True  # tiled bits never depend on tiles
    assert {t.name: t.bit_exact for t in fam.tunables()}["fr_lanes"] is False
    tiled = {"N": 17, "K": 8, "M": 16, "act": "gelu_tanh", "bias": True, "residual": True}
    base = dict(BM=16, BN=16, BK=8, TM=2, TN=2)
    configs = [dict(BM=8, BN=16, BK=4, TM=2, TN=2), dict(BM=128, BN=128, BK=8, TM=1, TN=1)]
    r = tune_case(fam, tiled, configs=configs, default=base, **FAST)
    assert r.error is None and r.rejected == [] and r.tried == 1
    ((cfg, why),) = r.invalid
    assert cfg["BM"] == 128 and "threads per block" in why
    few = {"N": 3, "K": 20, "M": 8, "act": "none", "bias": False, "residual": False}
    r = tune_case(fam, few, configs=[dict(fr_threads=16, fr_lanes=4, fr_cols=2, fr_kc=16)], **FAST)
    assert r.error is None and r.rejected == [] and r.tried == 1


def test_cuda_attention_candidates_validate_and_constraints_refuse():
    fam = get_family("cuda", "attention")
    case = {"B": 1, "NH": 2, "NKV": 1, "HS": 8, "Tq": 8, "Tk": 8, "causal": True}
    configs = [dict(block_q=8, block_k=8, threads=16), dict(block_q=4, block_k=6, threads=2)]
    r = tune_case(fam, case, configs=configs, default=dict(block_q=4, block_k=4, threads=4), **FAST)
    assert r.error is None and r.rejected == [] and r.tried == 1
    ((cfg, why),) = r.invalid
    assert cfg["block_k"] == 6 and "multiple of 4" in why
    # the GPU candidates are declared, and checked against the device's limits
    assert len(fam.candidates(case)) > 4


def test_cuda_binding_hands_cached_tunables_to_the_launcher():
    import nbformer

    fam = get_family("cuda", "linear")
    m = nbformer.load(KJV)  # CPU copy: only its config and graphs are used here
    g = model_graphs(m, 1, 32, ["forward"])["forward"]  # 32 rows: the tiled path
    node = next(n for n in g.nodes if n.op == "linear" and g.tensors[n.inputs["w"]].shape[0] == 4096)
    case = fam.case_from_node(node, g)
    c = TuningCache("cuda")
    best = {**fam.defaults(case), "BM": 32, "BN": 16, "TM": 2, "TN": 2, "BK": 8}
    c.put(fam, CaseResult(fam.key, "cuda", case, fam.bucket(case), fam.defaults(case), best, 2.0, 1.0, speedup=2.0))
    c.save()
    runtime.forget()
    b = runtime.bind(node, g, "cuda")
    assert b.source == "cache" and b.kwargs["BM"] == 32 and b.kwargs["BN"] == 16
    assert runtime.bind(node, g, "cpu").source.startswith("default")  # another device kind's cache


ROW_CASES = {"layernorm": {"N": 3, "C": 20}, "rmsnorm": {"N": 3, "C": 20}, "softmax": {"N": 3, "V": 20}}


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_cuda_row_families_validate_refuse_and_reject(name):
    fam = get_family("cuda", name)
    (t,) = fam.tunables()
    assert t.name == "threads" and t.bit_exact is False  # the reduction tree's shape: validated at tolerance
    assert all(v % 32 == 0 for v in t.values)
    case = ROW_CASES[name]
    configs = [{"threads": 64}, {"threads": 48}, {"threads": 2048}]
    r = tune_case(fam, case, configs=configs, default={"threads": 32}, **FAST)
    assert r.error is None and r.rejected == [] and r.tried == 1
    why = {c["threads"]: w for c, w in r.invalid}
    assert "multiple of the warp" in why[48] and "device's 1024" in why[2048]

    class Broken(fam.__class__):  # threads=64 corrupts one element after the kernel ran
        def workload(self, case, seed=0):
            wl = super().workload(case, seed)
            real = wl.run

            def run(outs, cfg):
                real(outs, cfg)
                if cfg["threads"] == 64:
                    o = outs["out"]
                    h = o.copy_to_host()
                    h[1, 2] += 1e-2
                    o.copy_to_device(h)

            wl.run = run
            return wl

    r = tune_case(Broken(), case, configs=configs[:1], default={"threads": 32}, **FAST)
    ((cfg, why),) = r.rejected
    assert cfg["threads"] == 64 and "out: wrong at (1, 2)" in why and r.best["threads"] == 32


def test_cuda_layernorm_binding_reaches_the_launcher(monkeypatch):
    import functools

    import numpy as np

    import nbformer
    from nbformer import ops
    from nbformer.devices import get_device
    from nbformer.kernels.cuda import layernorm as cuda_layernorm

    fam = get_family("cuda", "layernorm")
    m = nbformer.load(KJV)
    g = model_graphs(m, 1, 2, ["forward"])["forward"]
    node = next(n for n in g.nodes if n.op == "layernorm")
    case = fam.case_from_node(node, g)
    assert case == {"N": 2, "C": 192}
    c = TuningCache("cuda")
    c.put(fam, CaseResult(fam.key, "cuda", case, fam.bucket(case), fam.defaults(case), {"threads": 32}, 2.0, 1.0,
                          speedup=2.0))
    c.save()
    runtime.forget()
    b = runtime.bind(node, g, "cuda")
    assert b.source == "cache" and b.kwargs == {"threads": 32}
    seen = []
    real = cuda_layernorm.layernorm_forward
    monkeypatch.setattr(cuda_layernorm, "layernorm_forward", lambda *a, **kw: (seen.append(kw), real(*a, **kw)))
    dev = get_device("cuda")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 192)).astype(np.float32)
    out, mean, rstd = (dev.upload(np.full(s, np.nan, np.float32)) for s in ((1, 2, 192), (1, 2), (1, 2)))
    fn = functools.partial(ops.get("layernorm", "cuda", "forward"), **b.kwargs)
    fn(out=out, mean=mean, rstd=rstd, x=dev.upload(x), w=dev.upload(np.ones(192, np.float32)),
       b=dev.upload(np.zeros(192, np.float32)), **node.attrs)
    assert seen == [{"threads": 32}]
    got = dev.download(out)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + node.attrs["eps"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _one_node_graph(op, C):
    from nbformer.graph.ir import Graph

    g = Graph()
    x, out = g.tensor("x", (2, C)), g.tensor("out", (2, C))
    if op == "softmax":
        return g, g.node("softmax", {"x": x}, {"out": out})
    w, rstd = g.tensor("w", (C,), kind="param"), g.tensor("rstd", (2,))
    return g, g.node("rmsnorm", {"x": x, "w": w}, {"out": out, "rstd": rstd}, {"eps": 1e-6})


@pytest.mark.parametrize("name", ["rmsnorm", "softmax"])
def test_cuda_rmsnorm_and_softmax_bindings_reach_the_launchers(monkeypatch, name):
    import functools
    import importlib

    import numpy as np

    from nbformer import ops
    from nbformer.devices import get_device

    fam = get_family("cuda", name)
    g, node = _one_node_graph(name, 40)
    case = fam.case_from_node(node, g)
    c = TuningCache("cuda")
    c.put(fam, CaseResult(fam.key, "cuda", case, fam.bucket(case), fam.defaults(case), {"threads": 64}, 2.0, 1.0,
                          speedup=2.0))
    c.save()
    runtime.forget()
    b = runtime.bind(node, g, "cuda")
    assert b.source == "cache" and b.kwargs == {"threads": 64}
    mod = importlib.import_module(f"nbformer.kernels.cuda.{name}")
    launcher = f"{name}_forward"
    seen, real = [], getattr(mod, launcher)
    monkeypatch.setattr(mod, launcher, lambda *a, **kw: (seen.append(kw), real(*a, **kw)))
    dev, rng = get_device("cuda"), np.random.default_rng(0)
    kw = {role: dev.upload(rng.standard_normal(g.tensors[t].shape).astype(np.float32))
          for role, t in {**node.inputs, **node.outputs}.items()}
    functools.partial(ops.get(name, "cuda", "forward"), **b.kwargs)(**kw, **node.attrs)
    assert seen == [{"threads": 64}]
