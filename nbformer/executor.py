"""Executor: binds parameters, inputs and one planned arena, then walks the schedule."""
from __future__ import annotations

import time

import numpy as np

from . import ops
from .errors import GraphError
from .graph.ir import DTYPES, Graph
from .graph.plan import Plan, plan_memory


class Executor:
    def __init__(self, graph: Graph, bound: dict, device: str = "cpu", plan: Plan | None = None):
        """bound: name -> array for every param/const/grad/state tensor of the graph (float32,
        C-contiguous); grad arrays (parameter gradients of a training graph) and state arrays (KV
        caches) are written by the run."""
        self.graph, self.device = graph, device
        self.plan = plan or plan_memory(graph)
        self.arena = np.empty(self.plan.arena_floats, dtype=np.float32)
        self.views = {}
        for name, t in graph.tensors.items():
            if t.kind in ("param", "const", "grad", "state"):
                arr = bound.get(name)
                if arr is None:
                    raise GraphError(f"executor: no array bound for {t.kind} '{name}'")
                if tuple(arr.shape) != t.shape or arr.dtype != DTYPES[t.dtype]:
                    raise GraphError(f"executor: '{name}' is {arr.dtype}{tuple(arr.shape)}, "
                                     f"expected {t.dtype}{t.shape}")
                self.views[name] = arr
            elif t.kind == "act":
                off = self.plan.offsets[name]
                self.views[name] = self.arena[off: off + t.size].reshape(t.shape)
        self.steps = []
        for node in self.plan.schedule:
            fn = ops.get(node.op, device, node.direction)
            self.steps.append((fn, node))

    def run(self, inputs: dict, copy_outputs: bool = True, profile: dict | None = None) -> dict:
        """Run the schedule. profile: if given, (op, direction) -> [calls, seconds] is accumulated."""
        views = self.views
        for name in self.graph.inputs:
            t = self.graph.tensors[name]
            a = inputs.get(name)
            if a is None:
                raise GraphError(f"executor: missing input '{name}'")
            if tuple(a.shape) != t.shape or a.dtype != DTYPES[t.dtype] or not a.flags.c_contiguous:
                raise GraphError(f"executor: input '{name}' is {a.dtype}{tuple(a.shape)}, "
                                 f"expected contiguous {t.dtype}{t.shape}")
            views[name] = a
        clock = time.perf_counter if profile is not None else None
        for fn, node in self.steps:
            kw = {role: views[t] for role, t in node.inputs.items()}
            for role, t in node.outputs.items():
                kw[role] = views[t]
            if clock is None:
                fn(**kw, **node.attrs)
            else:
                t0 = clock()
                fn(**kw, **node.attrs)
                rec = profile.setdefault((node.op, node.direction), [0, 0.0])
                rec[0] += 1
                rec[1] += clock() - t0
        return {n: (views[n].copy() if copy_outputs else views[n]) for n in self.graph.outputs}
