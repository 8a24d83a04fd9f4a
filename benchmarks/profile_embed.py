"""Where does nbformer's embed time go? Per-op wall time, non-kernel overhead, graph-build cost.

Instruments the cached executors from outside (wraps each step's launcher with a timer); no
library code is changed. Prints: time per op kind (and per op kind x shape), time in
Executor.run vs the rest of encode (tokenise, pad, prepare_inputs), cost of building + planning
a graph for a new batch shape, and the top of a cProfile of encode.

    python benchmarks/profile_embed.py [--threads 2] [--n 256] [--batch 64] [--repeat 3] [--case varied]
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict

from common import bench_args, set_threads


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=1, repeat=3)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--case", default="varied", help="texts as in bench_embed: varied, uniform20, words5, tokens128")
    p.add_argument("--cprofile", type=int, default=25, help="rows of cProfile output (0: skip)")
    args = p.parse_args(argv)
    set_threads(args.threads, torch=False)

    from bench_embed import CASES, make_long, make_sentences, make_uniform

    from nbformer import Embedder
    from nbformer.executor import Executor
    from nbformer.graph.build import build_embed

    if args.case not in CASES:
        p.error(f"--case: {args.case!r}, expected one of {list(CASES)}")
    nb = Embedder()
    tk = nb.tokenizer
    texts = {"varied": lambda: make_sentences(args.n), "uniform20": lambda: make_uniform(tk, args.n, 19, 21),
             "words5": lambda: make_sentences(args.n, seed=3, lo=5, hi=5),
             "tokens128": lambda: make_long(tk, args.n, 128)}[args.case]()
    for _ in range(max(1, args.warmup)):
        nb.encode(texts, batch_size=args.batch)

    # --- wrap every cached executor's launchers with timers
    per_op = defaultdict(float)
    per_op_shape = defaultdict(float)
    calls = defaultdict(int)
    run_time = [0.0]
    execs = list(nb.model._executors.values())
    for ex in execs:
        wrapped = []
        for fn, node in ex.steps:
            shape = ex.graph.tensors[next(iter(node.outputs.values()))].shape
            key = (node.op, node.attrs.get("act", ""), shape)

            def timed(*a, _fn=fn, _key=key, _op=node.op, **kw):
                t0 = time.perf_counter()
                r = _fn(*a, **kw)
                dt = time.perf_counter() - t0
                per_op[_op] += dt
                per_op_shape[_key] += dt
                calls[_op] += 1
                return r

            wrapped.append((timed, node))
        ex.steps = wrapped
        orig_run = ex.run

        def run(*a, _orig=orig_run, **kw):
            t0 = time.perf_counter()
            r = _orig(*a, **kw)
            run_time[0] += time.perf_counter() - t0
            return r

        ex.run = run

    t0 = time.perf_counter()
    for _ in range(args.repeat):
        nb.encode(texts, batch_size=args.batch)
    total = (time.perf_counter() - t0) / args.repeat
    run_t = run_time[0] / args.repeat
    kern_t = sum(per_op.values()) / args.repeat
    print(f"encode({args.n} texts, batch {args.batch}): {total * 1e3:.1f} ms per call, "
          f"{len(execs)} cached graphs, {sum(len(e.steps) for e in execs)} nodes in all")
    print(f"  Executor.run total      {run_t * 1e3:8.1f} ms ({100 * run_t / total:.1f}%)")
    print(f"    inside launchers      {kern_t * 1e3:8.1f} ms")
    print(f"    executor loop overhead {(run_t - kern_t) * 1e3:7.1f} ms "
          f"({(run_t - kern_t) / max(1, sum(calls.values()) / args.repeat) * 1e6:.1f} us per node)")
    print(f"  outside run (tokenise, pad, prepare_inputs) {(total - run_t) * 1e3:.1f} ms")
    print("\nper op kind (ms per encode, % of encode, calls per encode):")
    for op, t in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:14s} {t / args.repeat * 1e3:8.1f} ms {100 * t / args.repeat / total:5.1f}%  "
              f"{calls[op] // args.repeat:4d}")
    print("\nper op x activation x output shape (top 15):")
    for (op, act, shape), t in sorted(per_op_shape.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {op:10s} {act:6s} {str(shape):18s} {t / args.repeat * 1e3:8.1f} ms")

    # --- cost of a graph for a batch shape not seen before (build + plan + Executor)
    cfg = nb.model.config
    t0 = time.perf_counter()
    g = build_embed(cfg, 7, 13, nb.pooling, True)
    t1 = time.perf_counter()
    ex = Executor(g, nb.model.bound, "cpu")
    t2 = time.perf_counter()
    print(f"\nnew batch shape: build_embed {1e3 * (t1 - t0):.1f} ms, plan + Executor {1e3 * (t2 - t1):.1f} ms, "
          f"{len(ex.steps)} nodes, arena {ex.plan.arena_floats * 4 / 2**20:.1f} MiB")

    # --- pure executor overhead: the same schedule with every launcher replaced by a no-op
    import numpy as np

    ex0 = execs[0]
    real_steps = ex0.steps
    ex0.steps = [(lambda **kw: None, node) for _, node in real_steps]
    B0, T0 = ex0.graph.tensors["input_ids"].shape
    ids = np.full((B0, T0), 100, dtype=np.int64)
    inputs = nb.model.prepare_inputs(ids, np.ones((B0, T0), np.uint8), np.zeros((B0, T0), np.int64))
    n_it = 200
    t0 = time.perf_counter()
    for _ in range(n_it):
        ex0.run(inputs, copy_outputs=False)
    dt = (time.perf_counter() - t0) / n_it
    ex0.steps = real_steps
    print(f"executor overhead with no-op launchers: {dt * 1e6:.0f} us per run of {len(real_steps)} nodes "
          f"({dt / len(real_steps) * 1e6:.1f} us per node)")
    t0 = time.perf_counter()
    for _ in range(n_it):
        nb.model.prepare_inputs(ids, np.ones((B0, T0), np.uint8), np.zeros((B0, T0), np.int64))
    print(f"prepare_inputs at {(B0, T0)}: {(time.perf_counter() - t0) / n_it * 1e6:.0f} us")
    nb.encode(["hello world"])
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        nb.encode(["hello world"])
        ts.append(time.perf_counter() - t0)
    print(f"single-sentence encode latency (B=1, T=4): median {sorted(ts)[10] * 1e3:.2f} ms, min {min(ts) * 1e3:.2f} ms")

    if args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        nb.encode(texts, batch_size=args.batch)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.cprofile)
        print("\ncProfile of one encode (sorted by tottime):")
        print("\n".join(s.getvalue().splitlines()[:args.cprofile + 12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
