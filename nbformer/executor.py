"""Executor: binds parameters, inputs and one planned arena on a device, then walks the schedule.

The arena is one flat float32 buffer allocated from the device (numpy on the CPU, device memory
on CUDA) when the executor is built; every activation is a window of it at its planned offset, and
tensors the planner aliased share one view object. Parameters, constants, gradients and states
(KV caches) are bound from outside and must already live on the executor's device.

Inputs come from the host. On the CPU they are used as they are; on CUDA each is copied into a
staging buffer the executor owns, except the inputs the graph marks host (cache position, dropout
seed, loss scale), which stay host scalars on every device: the launchers read them as numbers. Only the
outputs asked for are copied back.
"""
from __future__ import annotations

import functools
import time

import numpy as np

from . import ops
from .devices import get_device
from .errors import GraphError
from .graph.ir import DTYPES, Graph
from .graph.plan import Plan, plan_memory


def is_host_scalar(t) -> bool:
    """A graph input that launchers read as a number on every device (tensor.host), never uploaded."""
    return t.kind == "input" and t.host


class Executor:
    def __init__(self, graph: Graph, bound: dict, device="cpu", plan: Plan | None = None):
        """bound: name -> array for every param/const/grad/state tensor of the graph (float32,
        C-contiguous, on `device`); grad arrays (parameter gradients of a training graph) and state
        arrays (KV caches) are written by the run."""
        self.graph, self.dev = graph, get_device(device)
        from .kernels.cpu import precompile  # first run: the graph's missing kernels compile in parallel, with progress
        # read-only parameters (an inference model's): the AMX linear layers keep their packed weights
        frozen = all(not bound[n].flags.writeable for n, t in graph.tensors.items()
                     if t.kind == "param" and isinstance(bound.get(n), np.ndarray))
        precompile.ensure_compiled(graph, self.dev.kind, frozen_weights=frozen)
        self.device = self.dev.name
        self.plan = plan or plan_memory(graph)
        dev = self.dev
        self.staged = [n for n in graph.inputs if dev.kind != "cpu" and not is_host_scalar(graph.tensors[n])]
        staging = sum(graph.tensors[n].nbytes for n in self.staged)
        dev.ensure_fits(self.plan.arena_bytes + staging, f"the activation arena of this graph "
                                                         f"({self.plan.arena_bytes:,} bytes planned)")
        self.arena = dev.empty(max(self.plan.arena_floats, 1), np.float32)
        self.views = {}
        by_root = {}  # (buffer root, shape) -> view: aliased tensors get the same object
        for name, t in graph.tensors.items():
            if t.kind in ("param", "const", "grad", "state"):
                arr = bound.get(name)
                if arr is None:
                    raise GraphError(f"executor: no array bound for {t.kind} '{name}'")
                if tuple(arr.shape) != t.shape or arr.dtype != DTYPES[t.dtype]:
                    raise GraphError(f"executor: '{name}' is {arr.dtype}{tuple(arr.shape)}, "
                                     f"expected {t.dtype}{t.shape}")
                if not dev.is_device_array(arr):
                    raise GraphError(f"executor: '{name}' is not an array on device {dev.name}")
                self.views[name] = arr
            elif t.kind == "act":
                key = (self.plan.alias.get(name, name), t.shape)
                v = by_root.get(key)
                if v is None:
                    v = by_root[key] = dev.view(self.arena, self.plan.offsets[name], t.shape)
                self.views[name] = v
        for name in self.staged:
            t = graph.tensors[name]
            self.views[name] = dev.empty(t.shape, DTYPES[t.dtype])
        self.host_inputs = {}  # graph input -> the caller's host array of this run (Node.host_roles read it)
        self.steps = []
        # tuned launcher keywords per node (nbformer.tuning.runtime; NBFORMER_TUNING=off|cached|tune),
        # bound once here: self.tuning[i] says which config node i runs and where it came from
        from .tuning.runtime import bind_schedule

        self.tuning = bind_schedule(graph, self.plan.schedule, dev.kind)
        for node, tuned in zip(self.plan.schedule, self.tuning):
            fn = ops.get(node.op, dev.kind, node.direction)
            if tuned is not None and tuned.kwargs:
                fn = functools.partial(fn, **tuned.kwargs)
            self.steps.append((fn, node))

    def _bind_inputs(self, inputs: dict):
        views, staged = self.views, self.staged
        for name in self.graph.inputs:
            t = self.graph.tensors[name]
            a = inputs.get(name)
            if a is None:
                raise GraphError(f"executor: missing input '{name}'")
            if (not isinstance(a, np.ndarray) or tuple(a.shape) != t.shape or a.dtype != DTYPES[t.dtype]
                    or not a.flags.c_contiguous):
                got = f"{a.dtype}{tuple(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise GraphError(f"executor: input '{name}' is {got}, expected contiguous host {t.dtype}{t.shape}")
            if name in staged:
                self.dev.copy_in(views[name], a)
            else:
                views[name] = a
            self.host_inputs[name] = a

    def run(self, inputs: dict, copy_outputs: bool = True, profile: dict | None = None, outputs=None,
            on_device: bool = False) -> dict:
        """Run the schedule; -> {output name: array}. outputs: the names wanted (default all the
        graph's outputs). Host arrays come back (copies unless copy_outputs=False on the CPU);
        on_device=True returns the device arrays themselves (valid until the next run).
        profile: if given, (op, direction) -> [calls, seconds] is accumulated (the device is
        synchronised after every kernel so the seconds are the kernel's)."""
        self._bind_inputs(inputs)
        views, host = self.views, self.host_inputs
        if profile is None:
            for fn, node in self.steps:
                kw = {role: views[t] for role, t in node.inputs.items()}
                for role, t in node.outputs.items():
                    kw[role] = views[t]
                for role in node.host_roles:
                    kw[role] = host[node.inputs[role]]
                fn(**kw, **node.attrs)
        else:
            clock, sync = time.perf_counter, self.dev.synchronize
            for fn, node in self.steps:
                kw = {role: views[t] for role, t in node.inputs.items()}
                for role, t in node.outputs.items():
                    kw[role] = views[t]
                for role in node.host_roles:
                    kw[role] = host[node.inputs[role]]
                t0 = clock()
                fn(**kw, **node.attrs)
                sync()
                rec = profile.setdefault((node.op, node.direction), [0, 0.0])
                rec[0] += 1
                rec[1] += clock() - t0
        names = self.graph.outputs if outputs is None else outputs
        if on_device:
            return {n: views[n] for n in names}
        if self.dev.kind == "cpu":
            return {n: (views[n].copy() if copy_outputs else views[n]) for n in names}
        return {n: self.dev.download(views[n]) for n in names}
