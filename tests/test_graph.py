"""Graph IR, builders and the memory planner."""
import numpy as np
import pytest

from nbformer.config import ModelConfig
from nbformer.errors import ConfigError, GraphError
from nbformer.executor import Executor
from nbformer.graph.build import build_embed, build_forward
from nbformer.graph.ir import Graph
from nbformer.graph.plan import plan_memory
from nbformer.ops import get as get_op
from nbformer.weights.params import count_params, param_shapes

GPT = ModelConfig(arch="decoder", vocab_size=97, d_model=32, n_heads=4, n_layers=3, d_ff=64, max_positions=64,
                  norm="pre", activation="gelu_tanh", final_layernorm=True)
BERT = ModelConfig(arch="encoder", vocab_size=97, d_model=32, n_heads=2, n_layers=2, d_ff=48, max_positions=64,
                   norm="post", type_vocab_size=2, embedding_layernorm=True, lm_head=False)


def check_plan(g):
    plan = plan_memory(g)
    step = {id(n): i for i, n in enumerate(plan.schedule)}
    end = len(plan.schedule)
    live = {}
    for name, t in g.tensors.items():
        if t.kind != "act":
            continue
        lo = min(step[id(n)] for n in plan.schedule if name in n.outputs.values())
        uses = [step[id(n)] for n in plan.schedule if name in n.inputs.values()]
        hi = end if name in g.outputs else max(uses + [lo])
        live[name] = (lo, hi, plan.offsets[name], t.size)
        assert plan.offsets[name] % 16 == 0
        assert plan.offsets[name] + t.size <= plan.arena_floats
    names = sorted(live)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if plan.alias[a] == plan.alias[b]:
                continue
            la, lb = live[a], live[b]
            if la[1] < lb[0] or lb[1] < la[0]:
                continue  # never alive together
            assert la[2] + la[3] <= lb[2] or lb[2] + lb[3] <= la[2], f"{a} and {b} overlap while both alive"
    return plan


@pytest.mark.parametrize("cfg", [GPT, BERT, GPT.replace(norm="post", activation="relu", positions="sinusoidal")])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 33)])
def test_plan_never_overlaps_live_tensors(cfg, B, T):
    g = build_forward(cfg, B, T)
    plan = check_plan(g)
    assert plan.arena_floats < plan.naive_floats  # buffers are reused
    assert set(g.param_names()) == set(param_shapes(cfg))


def test_arena_is_constant_in_depth():
    """Activation memory of inference does not grow with the number of layers."""
    a = plan_memory(build_forward(GPT, 2, 16)).arena_floats
    b = plan_memory(build_forward(GPT.replace(n_layers=12), 2, 16)).arena_floats
    assert a == b


def test_embed_graph_plans_and_aliases_normalize():
    g = build_embed(BERT, 3, 9, "mean", True)
    plan = check_plan(g)
    assert plan.alias["embedding"] == plan.alias["pooled"]  # normalisation runs in place


def test_training_graph_writes_the_logits_gradient_over_the_logits():
    """The largest activation of a language model's step (B x T x V logits) is not doubled: the
    cross-entropy, forward and backward fused into one node (fuse_cross_entropy), writes its
    gradient in place (the planner's alias), and the plan still never overlaps two live tensors."""
    from nbformer.graph.build import build_train

    g, _ = build_train(GPT, 2, 16)
    plan = check_plan(g)
    (node,) = [n for n in g.nodes if n.op == "cross_entropy"]  # (no backward node of its own)
    assert node.direction == "forward" and {"dloss", "logits", "targets"} <= set(node.inputs)
    assert plan.alias[node.outputs["dlogits"]] == plan.alias[node.inputs["logits"]]


def test_the_loss_stays_unfused_where_the_logits_have_another_reader(monkeypatch):
    """fuse_cross_entropy merges the loss's two nodes only where nothing else reads the logits (the
    fused node overwrites them with their gradient)."""
    from nbformer.graph import build

    fuse = build.fuse_cross_entropy
    monkeypatch.setattr(build, "fuse_cross_entropy", lambda g: None)
    for extra_reader in (False, True):
        g, _ = build.build_train(GPT, 2, 16)
        (f,) = [n for n in g.nodes if n.op == "cross_entropy" and n.direction == "forward"]
        if extra_reader:
            logits = f.inputs["logits"]
            g.tensor("logits.twice", g.tensors[logits].shape)
            g.node("add", {"a": logits, "b": logits}, {"out": "logits.twice"})
        fuse(g)
        loss_nodes = [n for n in g.nodes if n.op == "cross_entropy"]
        assert len(loss_nodes) == (2 if extra_reader else 1)
        assert ("dlogits" in f.outputs) == (not extra_reader)
        check_plan(g)


def test_schedule_rejects_cycles_and_double_writers():
    g = Graph()
    g.tensor("a", (2,))
    g.tensor("b", (2,))
    g.node("add", {"a": "b", "b": "b"}, {"out": "a"})
    g.node("add", {"a": "a", "b": "a"}, {"out": "b"})
    with pytest.raises(GraphError, match="cycle"):
        g.schedule()
    g2 = Graph()
    g2.tensor("x", (2,), kind="input")
    g2.tensor("y", (2,))
    g2.node("add", {"a": "x", "b": "x"}, {"out": "y"})
    g2.node("add", {"a": "x", "b": "x"}, {"out": "y"})
    with pytest.raises(GraphError, match="two nodes"):
        g2.schedule()
    with pytest.raises(GraphError, match="unknown tensor"):
        g2.node("add", {"a": "nope"}, {"out": "y"})


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(GraphError, match="no forward kernel registered for op 'frobnicate'"):
        get_op("frobnicate", "cpu")
    with pytest.raises(GraphError, match="device 'tpu'"):
        get_op("linear", "tpu")


def test_executor_runs_a_hand_built_graph():
    g = Graph()
    g.tensor("x", (4,), kind="input")
    g.tensor("y", (4,))
    g.tensor("z", (4,))
    g.node("add", {"a": "x", "b": "x"}, {"out": "y"})
    g.node("add", {"a": "y", "b": "x"}, {"out": "z"}, inplace={"out": "a"})
    g.mark_output("z")
    ex = Executor(g, {})
    x = np.arange(4, dtype=np.float32)
    assert np.array_equal(ex.run({"x": x})["z"], 3 * x)
    with pytest.raises(GraphError, match="input 'x'"):
        ex.run({"x": np.arange(5, dtype=np.float32)})


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_heads"):
        GPT.replace(n_heads=5)
    with pytest.raises(ConfigError, match="activation"):
        GPT.replace(activation="swish")
    with pytest.raises(ConfigError, match="norm"):
        GPT.replace(norm="middle")
    with pytest.raises(ConfigError, match="vocab_size"):
        GPT.replace(vocab_size=0)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**GPT.to_dict(), "wat": 1})
    assert ModelConfig.from_dict(GPT.to_dict()) == GPT


def test_param_count_of_gpt2_small():
    cfg = ModelConfig(arch="decoder", vocab_size=50257, d_model=768, n_heads=12, n_layers=12, d_ff=3072,
                      max_positions=1024, norm="pre", activation="gelu_tanh", final_layernorm=True)
    assert count_params(cfg) == 124_439_808  # what transformers reports for GPT2LMHeadModel (tied)
