"""Reverse-mode autodiff over the graph IR.

Each forward op registers a VJP rule that appends backward nodes (direction='backward') to the
same graph and returns the gradient tensor of each differentiable input. Contributions to one
tensor (a residual stream read twice, tied embeddings) are summed with in-place add nodes.
Parameter gradients end in tensors of kind 'grad', bound by the caller to its flat gradient
buffer, so the planner only lays out what is transient: activations kept for backward and
intermediate gradients share the one arena.
"""
from __future__ import annotations

from ..errors import GraphError
from .ir import Graph

VJP = {}


def vjp(op):
    def deco(fn):
        VJP[op] = fn
        return fn

    return deco


class _Ctx:
    def __init__(self, g: Graph):
        self.g = g
        self.n = 0

    def grad_tensor(self, like: str, hint: str) -> str:
        self.n += 1
        return self.g.tensor(f"d{self.n}:{hint}", self.g.tensors[like].shape)

    def scratch(self, shape, hint: str) -> str:
        self.n += 1
        return self.g.tensor(f"s{self.n}:{hint}", shape)

    def differentiable(self, t: str) -> bool:
        return self.g.tensors[t].kind in ("act", "param") and self.g.tensors[t].dtype == "f32"


@vjp("embedding")
def _embedding(c: _Ctx, node, gout):
    ins, outs, grads = {"dout": gout["out"], "ids": node.inputs["ids"]}, {}, {}
    for table, ids, role in (("wte", "ids", "dwte"), ("wpe", "pos_ids", "dwpe"), ("wtt", "type_ids", "dwtt")):
        t = node.inputs.get(table)
        if t is None:
            continue
        ins[ids] = node.inputs[ids]
        if c.differentiable(t):
            outs[role] = grads[table] = c.grad_tensor(t, t)
    if outs:
        host = tuple(r for r in ("ids", "pos_ids", "type_ids") if r in ins and c.g.tensors[ins[r]].kind == "input")
        c.g.node("embedding", ins, outs, dict(node.attrs), direction="backward", host_roles=host)
    return grads


@vjp("layernorm")
def _layernorm(c: _Ctx, node, gout):
    x, w, b = node.inputs["x"], node.inputs["w"], node.inputs["b"]
    dx, dw, db = c.grad_tensor(x, x), c.grad_tensor(w, w), c.grad_tensor(b, b)
    c.g.node("layernorm", {"dout": gout["out"], "x": x, "w": w, "mean": node.outputs["mean"],
                           "rstd": node.outputs["rstd"]}, {"dx": dx, "dw": dw, "db": db},
             direction="backward")
    return {"x": dx, "w": dw, "b": db}


@vjp("linear")
def _linear(c: _Ctx, node, gout):
    dout = gout["out"]
    x, w = node.inputs["x"], node.inputs["w"]
    ins = {"dout": dout, "x": x, "w": w}
    outs = {"dw": c.grad_tensor(w, w)}
    grads = {"w": outs["dw"]}
    if c.differentiable(x):
        outs["dx"] = grads["x"] = c.grad_tensor(x, x)
    if "b" in node.inputs:
        outs["db"] = grads["b"] = c.grad_tensor(node.inputs["b"], node.inputs["b"])
    if "pre" in node.outputs:
        ins["pre"] = node.outputs["pre"]
        outs["scratch"] = c.scratch(c.g.tensors[dout].shape, "dpre")  # dout * act'(pre)
    c.g.node("linear", ins, outs, dict(node.attrs), direction="backward")
    if "residual" in node.inputs:
        grads["residual"] = dout  # the residual passes its gradient straight through
    return grads


@vjp("attention")
def _attention(c: _Ctx, node, gout):
    q, kv = node.inputs["q"], node.inputs["kv"]
    B, NH, Tq = c.g.tensors[node.outputs["lse"]].shape
    ins = {"dout": gout["out"], "out": node.outputs["out"], "lse": node.outputs["lse"], "q": q, "kv": kv,
           "key_mask": node.inputs["key_mask"]}
    if "seed" in node.inputs:
        ins["seed"] = node.inputs["seed"]
    outs = {"dq": c.grad_tensor(q, q), "delta": c.scratch((B, NH, Tq), "attn.delta")}
    grads = {"q": outs["dq"]}
    if kv != q:
        outs["dkv"] = grads["kv"] = c.grad_tensor(kv, kv)
    c.g.node("attention", ins, outs, dict(node.attrs), direction="backward")
    return grads


@vjp("rmsnorm")
def _rmsnorm(c: _Ctx, node, gout):
    x, w = node.inputs["x"], node.inputs["w"]
    dx, dw = c.grad_tensor(x, x), c.grad_tensor(w, w)
    c.g.node("rmsnorm", {"dout": gout["out"], "x": x, "w": w, "rstd": node.outputs["rstd"]},
             {"dx": dx, "dw": dw}, direction="backward")
    return {"x": dx, "w": dw}


@vjp("rope")
def _rope(c: _Ctx, node, gout):
    # the rotation is orthogonal: its adjoint rotates the q/k gradient columns back, in place
    x = node.inputs["x"]
    dx = c.grad_tensor(x, x)
    c.g.node("rope", {"dout": gout["out"], "pos_ids": node.inputs["pos_ids"]}, {"dx": dx}, dict(node.attrs),
             inplace={"dx": "dout"}, direction="backward")
    return {"x": dx}


@vjp("linear_glu")
def _linear_glu(c: _Ctx, node, gout):
    # out = act(gate) * up with pre = x @ w.T + b = gate | up: dpre from the glu backward, then the
    # plain linear backward of the fused weight
    x, w, pre = node.inputs["x"], node.inputs["w"], node.outputs["pre"]
    dpre = c.scratch(c.g.tensors[pre].shape, "dglu")
    c.g.node("glu", {"dout": gout["out"], "pre": pre}, {"dpre": dpre}, {"act": node.attrs["act"]},
             direction="backward")
    outs = {"dw": c.grad_tensor(w, w)}
    grads = {"w": outs["dw"]}
    if c.differentiable(x):
        outs["dx"] = grads["x"] = c.grad_tensor(x, x)
    if "b" in node.inputs:
        outs["db"] = grads["b"] = c.grad_tensor(node.inputs["b"], node.inputs["b"])
    c.g.node("linear", {"dout": dpre, "x": x, "w": w}, outs, {"act": "none"}, direction="backward")
    return grads


@vjp("add")
def _add(c: _Ctx, node, gout):
    return {"a": gout["out"], "b": gout["out"]}


@vjp("dropout")
def _dropout(c: _Ctx, node, gout):
    x = node.inputs["x"]
    dx = c.grad_tensor(x, x)
    c.g.node("dropout", {"dout": gout["out"], "seed": node.inputs["seed"]}, {"dx": dx}, dict(node.attrs),
             inplace={"dx": "dout"}, direction="backward")
    return {"x": dx}


@vjp("cross_entropy")
def _cross_entropy(c: _Ctx, node, gout):
    logits = node.inputs["logits"]
    dlogits = c.grad_tensor(logits, logits)
    # in place when the logits die here (the planner checks): the gradient takes over their N x V
    # buffer, the largest activation of a language model's step
    c.g.node("cross_entropy", {"logits": logits, "lse": node.outputs["lse"], "targets": node.inputs["targets"],
                               "dloss": gout["losses"]}, {"dlogits": dlogits}, dict(node.attrs),
             inplace={"dlogits": "logits"}, direction="backward")
    return {"logits": dlogits}


def autodiff(g: Graph, seeds: dict) -> dict:
    """Append the backward of g's current nodes. seeds: tensor -> tensor holding d(loss)/d(tensor).

    Returns parameter name -> its gradient tensor (kind 'grad'); parameters the seeds do not
    reach get no entry.
    """
    c = _Ctx(g)
    forward = g.schedule()
    contrib = {t: [s] for t, s in seeds.items()}
    total = {}

    def finalize(t):
        if t in total:
            return total[t]
        parts = contrib.get(t, [])
        acc = parts[0] if parts else None
        for p in parts[1:]:
            out = c.grad_tensor(t, t + ".sum")
            g.node("add", {"a": acc, "b": p}, {"out": out}, inplace={"out": "a"}, direction="forward")
            acc = out
        total[t] = acc
        return acc

    for node in reversed(forward):
        gout = {role: finalize(t) for role, t in node.outputs.items()}
        gout = {r: t for r, t in gout.items() if t is not None}
        if not gout:
            continue
        rule = VJP.get(node.op)
        if rule is None:
            raise GraphError(f"autodiff: op '{node.op}' has no registered backward (VJP)")
        for role, gt in rule(c, node, gout).items():
            t = node.inputs[role]
            if c.differentiable(t):
                contrib.setdefault(t, []).append(gt)

    grads = {}
    for p in g.param_names():
        parts = contrib.get(p, [])
        if not parts:
            continue
        if len(parts) == 1 and g.tensors[parts[0]].kind == "act" and parts[0] not in seeds.values():
            final = parts[0]
        else:
            acc = parts[0]
            for i, part in enumerate(parts[1:]):
                last = i == len(parts) - 2
                out = g.tensor(f"grad:{p}", g.tensors[p].shape) if last else c.grad_tensor(p, p + ".sum")
                g.node("add", {"a": acc, "b": part}, {"out": out}, inplace={} if last else {"out": "a"})
                acc = out
            final = acc
        g.tensors[final].kind = "grad"
        grads[p] = final
    return grads
