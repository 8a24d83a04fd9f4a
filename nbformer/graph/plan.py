"""Memory planner: liveness over the schedule, then offsets in one float32 arena.

Placement is greedy by size (largest buffer first, lowest offset that overlaps no buffer
alive at the same time), which is near-optimal for transformer graphs and deterministic.
A node may declare `inplace = {out_role: in_role}`: when the input dies at that node the
output takes over its buffer (residual adds, epilogues that accumulate into the stream).
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Graph

ALIGN = 16  # floats (64 bytes): every buffer starts on a cache line


@dataclass
class Plan:
    schedule: list
    offsets: dict  # activation name -> float offset into the arena
    arena_floats: int
    naive_floats: int  # what one buffer per activation would cost
    intervals: dict  # buffer root -> (first step, last step)
    alias: dict  # activation name -> the buffer root it shares

    @property
    def arena_bytes(self) -> int:
        return self.arena_floats * 4

    @property
    def naive_bytes(self) -> int:
        return self.naive_floats * 4


def _round(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(g: Graph) -> Plan:
    sched = g.schedule()
    acts = {n for n, t in g.tensors.items() if t.kind == "act"}
    for n, t in g.tensors.items():
        if t.kind == "act" and t.dtype != "f32":
            raise AssertionError(f"arena holds float32 only: {n}")
    last_use = {}
    first_def = {}
    for step, node in enumerate(sched):
        for t in node.inputs.values():
            if t in acts:
                last_use[t] = step
        for t in node.outputs.values():
            first_def.setdefault(t, step)
    end = len(sched)
    for t in g.outputs:
        if t in acts:
            last_use[t] = end

    alias = {t: t for t in acts}

    def root(t):
        while alias[t] != t:
            t = alias[t]
        return t

    for step, node in enumerate(sched):
        for out_role, in_role in node.inplace.items():
            src, dst = node.inputs.get(in_role), node.outputs.get(out_role)
            if src in acts and dst in acts and last_use.get(src) == step \
                    and g.tensors[src].size == g.tensors[dst].size and src not in g.outputs:
                alias[dst] = root(src)

    intervals = {}
    sizes = {}
    for t in acts:
        r = root(t)
        a = first_def.get(t, 0)
        b = max(last_use.get(t, a), a)
        lo, hi = intervals.get(r, (a, b))
        intervals[r] = (min(lo, a), max(hi, b))
        sizes[r] = max(sizes.get(r, 0), g.tensors[t].size)

    placed = []  # (offset, size, lo, hi)
    offsets_root = {}
    for r in sorted(intervals, key=lambda r: (-sizes[r], intervals[r][0], r)):
        size, (lo, hi) = _round(sizes[r]), intervals[r]
        clashes = sorted((o, s) for o, s, a, b in placed if not (b < lo or hi < a))
        off = 0
        for o, s in clashes:
            if off + size <= o:
                break
            off = max(off, o + s)
        placed.append((off, size, lo, hi))
        offsets_root[r] = off
    arena = max((o + s for o, s, _, _ in placed), default=0)
    offsets = {t: offsets_root[root(t)] for t in acts}
    naive = sum(_round(g.tensors[t].size) for t in acts)
    return Plan(sched, offsets, arena, naive, intervals, {t: root(t) for t in acts})
