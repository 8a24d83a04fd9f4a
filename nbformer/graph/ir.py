"""Graph IR: tensors (named, shaped, typed) and nodes (an op with named inputs/outputs).

No math lives here. Inputs and outputs of a node are dicts role -> tensor name, so a
launcher receives keyword arrays (`x=`, `w=`, `out=`) and optional roles are just absent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import GraphError

DTYPES = {"f32": np.float32, "i64": np.int64, "u8": np.uint8}
KINDS = ("input", "param", "const", "act", "grad", "state")


@dataclass
class Tensor:
    name: str
    shape: tuple
    dtype: str = "f32"
    kind: str = "act"  # input: bound per call; param/const/grad: bound from outside; act: lives in the arena;
    # state: bound from outside and kept across runs (KV caches), written by nodes of the graph
    host: bool = False  # an input read as a number by launchers (cache position, seeds): never uploaded

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(DTYPES[self.dtype]).itemsize


@dataclass
class Node:
    op: str
    inputs: dict  # role -> tensor name
    outputs: dict  # role -> tensor name
    attrs: dict = field(default_factory=dict)
    inplace: dict = field(default_factory=dict)  # output role -> input role it may overwrite
    direction: str = "forward"  # which launcher of the op runs it: forward | backward
    # input roles bound to the caller's host array of a graph input on every device (the embedding
    # backward plans its deterministic scatter from the ids there, so a device step copies nothing back)
    host_roles: tuple = ()


class Graph:
    def __init__(self):
        self.tensors: dict[str, Tensor] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def tensor(self, name, shape, dtype="f32", kind="act", host=False) -> str:
        if name in self.tensors:
            raise GraphError(f"graph: tensor '{name}' defined twice")
        if dtype not in DTYPES or kind not in KINDS:
            raise GraphError(f"graph: tensor '{name}' has bad dtype/kind {dtype}/{kind}")
        if host and kind != "input":
            raise GraphError(f"graph: tensor '{name}': only inputs can stay on the host")
        self.tensors[name] = Tensor(name, tuple(int(s) for s in shape), dtype, kind, bool(host))
        if kind == "input":
            self.inputs.append(name)
        return name

    def node(self, op, inputs, outputs, attrs=None, inplace=None, direction="forward", host_roles=()) -> Node:
        for role, t in {**inputs, **outputs}.items():
            if t not in self.tensors:
                raise GraphError(f"graph: node {op} role '{role}' names unknown tensor '{t}'")
        for role in host_roles:
            if role not in inputs or self.tensors[inputs[role]].kind != "input":
                raise GraphError(f"graph: node {op}: host role '{role}' must read a graph input")
        n = Node(op, dict(inputs), dict(outputs), dict(attrs or {}), dict(inplace or {}), direction,
                 tuple(host_roles))
        self.nodes.append(n)
        return n

    def mark_output(self, name):
        if name not in self.tensors:
            raise GraphError(f"graph: unknown output '{name}'")
        self.outputs.append(name)

    def schedule(self) -> list:
        """Nodes in a topological order (stable: build order wins ties); checks single producers."""
        producer = {}
        for i, n in enumerate(self.nodes):
            for t in n.outputs.values():
                if t in producer:
                    raise GraphError(f"graph: tensor '{t}' is written by two nodes")
                producer[t] = i
        for name, t in self.tensors.items():
            if t.kind == "act" and name not in producer:
                raise GraphError(f"graph: activation '{name}' is never written")
        deps = [set() for _ in self.nodes]
        users = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            for t in n.inputs.values():
                j = producer.get(t)
                if j is not None and j != i and j not in deps[i]:
                    deps[i].add(j)
                    users[j].append(i)
        import heapq

        ready = [i for i in range(len(self.nodes)) if not deps[i]]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(self.nodes[i])
            for u in users[i]:
                deps[u].discard(i)
                if not deps[u]:
                    heapq.heappush(ready, u)
        if len(order) != len(self.nodes):
            raise GraphError("graph: cycle detected")
        return order

    def param_names(self):
        return [n for n, t in self.tensors.items() if t.kind == "param"]

    def summary(self) -> str:
        ops = {}
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        return ", ".join(f"{k}×{v}" for k, v in sorted(ops.items()))
