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
