"""Benchmarks of whole models and single kernels: what `nbformer bench` runs.

    models.py    llama-bench style rows: prompt processing (ppN), token generation (tgN),
                 embeddings (embedN) and training steps (trainN), tokens/s mean +- sd over
                 repetitions after an excluded warm-up (its one-time cost reported apart)
    kernels.py   one kernel family at one shape: median time with a spread, FLOPs and
                 compulsory bytes per call, GFLOP/s, GB/s and the fraction of the roofline
    roofline.py  this machine's peak sgemm rate and streaming-read bandwidth, measured once per
                 device / thread count and kept under nbformer's cache directory; the plot
    report.py    md / csv / json / jsonl output, machine info and the git commit
    env.py       Numba / BLAS thread counts (set and observed), git commit of a checkout
    timing.py    repetition statistics

Importing this package is cheap: numba and the kernels load inside the functions that use them.
"""
