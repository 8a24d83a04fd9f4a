"""`nbformer bench`: llama-bench style model benchmarks, and single kernels on the roofline."""
from __future__ import annotations

import click

from .common import device_option, friendly, no_compile_progress

_KERNEL_HELP = ("benchmark one kernel family instead of a model: linear, attention, attention_backward, layernorm, "
                "rmsnorm, softmax, cross_entropy, embedding, adam (repeatable, paired with --shape)")


def _ints(text, flag, minimum):
    """'1,8' -> [1, 8] (each >= minimum)."""
    from nbformer.errors import InputError

    vals = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise InputError(f"{flag} {text!r}: expected a comma-separated list of integers") from None
        if v < minimum:
            raise InputError(f"{flag} {text!r}: values must be >= {minimum}, got {v}")
        vals.append(v)
    if not vals:
        raise InputError(f"{flag}: expected at least one value")
    return list(dict.fromkeys(vals))  # (duplicates run once)


@click.command()
@click.argument("model", required=False)
@click.option("--model", "-m", "model_opt", default=None, metavar="MODEL",
              help="the model (as MODEL): a Hugging Face directory, .safetensors or .gguf file (default: "
                   "weights/kjv-gpt; with --embed the default embedding model)")
@click.option("-p", "--n-prompt", "prompts", default=None, metavar="N[,N..]",
              help="prompt lengths: ppN rows (encoders: embedN; --train: trainN); 0 skips [256, or the model's "
                   "positions if fewer]")
@click.option("-n", "--n-gen", "gens", default=None, metavar="N[,N..]",
              help="tokens to generate: tgN rows; 0 skips [128, or the model's positions if fewer]")
@click.option("-b", "--batch", "batches", default="1", show_default=True, metavar="B[,B..]",
              help="sequences processed together")
@click.option("-t", "--threads", "threads", default=None, metavar="T[,T..]",
              help="Numba threads (BLAS runs one thread per GEMM block inside them) [the current count]")
@click.option("-r", "--repetitions", "reps", default="5", show_default=True, metavar="R",
              help="timed repetitions per row, after one warm-up that is excluded")
@click.option("--embed", is_flag=True, help="embedding rows (encoder models; without MODEL the default embedding "
                                            "model)")
@click.option("--train", is_flag=True, help="add a training-step row per -p length (forward+backward+AdamW)")
@click.option("-o", "--output", "fmt", default="md", show_default=True, metavar="md|csv|json|jsonl",
              help="output format")
@click.option("--kernel", "kernels", multiple=True, metavar="NAME", help=_KERNEL_HELP)
@click.option("--shape", "shapes", multiple=True, metavar="D1,D2,..",
              help="the kernel's sizes, e.g. attention B,H,T,D (or B,H,Tq,Tk,D), linear M,K,N, layernorm N,C, "
                   "softmax N,V, embedding B,T,C[,V], adam N (repeatable)")
@click.option("--causal", is_flag=True, help="attention kernels: causal mask")
@click.option("--act", default=None, metavar="ACT", help="linear: activation none|relu|gelu|gelu_tanh|silu")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="a keyword for the kernel launcher, e.g. block_q=128 (repeatable)")
@click.option("--tuned", is_flag=True,
              help="linear / attention: run with this machine's tuned configuration (`nbformer tune`), as a "
                   "model would, and say where it came from")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="draw the roofline with the benchmarked kernels on it (needs matplotlib: "
                   "pip install \"nbformer[plot]\")")
@click.option("--remeasure", is_flag=True, help="measure this machine's roofline again (peak sgemm, read bandwidth)")
@device_option
@friendly
def bench(model, model_opt, prompts, gens, batches, threads, reps, embed, train, fmt, kernels, shapes, causal, act,
          params, tuned, plot_path, remeasure, device):
    """Benchmark a model (llama-bench style rows: ppN, tgN, embedN, trainN; tokens/s mean ± sd) or,
    with --kernel/--shape, single kernels (time, GFLOP/s, GB/s, fraction of this machine's roofline).

    \b
    nbformer bench                                  # weights/kjv-gpt: pp and tg rows
    nbformer bench MODEL -p 64,128 -n 32 -b 1,8 -t 1,2 -r 5 -o json
    nbformer bench --kernel attention --shape 1,12,256,64 --causal --plot roofline.png
    """
    from nbformer.bench.report import check_format
    from nbformer.errors import InputError

    fmt = check_format(fmt)
    if fmt != "md":
        no_compile_progress()
    src = click.get_current_context().get_parameter_source
    if model is not None and model_opt is not None:
        raise InputError(f"MODEL given twice ({model!r} and --model {model_opt!r}); pass one")
    model = model if model is not None else model_opt
    rep = _ints(reps, "-r/--repetitions", 1)
    if len(rep) != 1:
        raise InputError(f"-r/--repetitions {reps!r}: expected one number")
    thread_list = None if threads is None else _ints(threads, "-t/--threads", 1)
    if thread_list is not None:
        from nbformer.bench.env import check_threads

        check_threads(thread_list)
    if kernels or shapes:
        explicit = [f for f, p in (("MODEL", model is not None), ("-p", prompts is not None), ("-n", gens is not None),
                                   ("-b", src("batches") != click.core.ParameterSource.DEFAULT),
                                   ("--embed", embed), ("--train", train)) if p]
        if explicit:
            raise InputError(f"{', '.join(explicit)}: model options do not apply to --kernel benchmarks")
        _kernels(kernels, shapes, causal, act, params, tuned, thread_list, rep[0], fmt, plot_path, remeasure, device)
        return
    for flag, given in (("--causal", causal), ("--act", act is not None), ("--param", bool(params)), ("--tuned", tuned),
                        ("--plot", plot_path is not None), ("--remeasure", remeasure)):
        if given:
            raise InputError(f"{flag} applies to kernel benchmarks: add --kernel NAME --shape SIZES")
    _models(model, prompts, gens, batches, thread_list, rep[0], embed, train, fmt, device)


def _note(line):
    _progress.clear()
    click.echo(line, err=True)


class _Progress:
    """'bench [3/12] pp128 batch 8, 1 thread' on stderr while a row runs, when stderr is a terminal."""

    def __init__(self):
        self.shown = False

    def __call__(self, i, n, what):
        import sys

        if not sys.stderr.isatty():
            return
        click.echo(f"\r\x1b[2Kbench [{i + 1}/{n}] {what} ...", err=True, nl=False)
        self.shown = True

    def clear(self):
        if self.shown:
            click.echo("\r\x1b[2K", err=True, nl=False)
            self.shown = False


_progress = _Progress()


def _echo(line):
    _progress.clear()
    click.echo(line)


def _models(model, prompts, gens, batches, thread_list, reps, embed, train, fmt, device):
    from nbformer.bench import models
    from nbformer.bench.env import current_threads
    from nbformer.bench.kernels import bench_device
    from nbformer.bench.report import Writer, build_info, machine_info

    dev = bench_device(device)
    b = models.Bench(model, device=dev.name, embed=embed)
    cfg = b.config
    limit = cfg.max_positions if cfg.positions != "none" else None
    if b.embedder is not None:
        limit = min(limit or b.embedder.max_seq_length, b.embedder.max_seq_length)

    notes = []

    def default(text, flag, value, used=True):
        if text is not None:
            return _ints(text, flag, 0)
        if limit is not None and value > limit:
            if used:
                notes.append(f"bench: {flag} defaults to {limit} for {b.name} ({limit} positions)")
            return [limit]
        return [value]

    p_list = default(prompts, "-p/--n-prompt", 256)
    n_list = default(gens, "-n/--n-gen", 128, used=cfg.arch != "encoder")
    tests = b.tests(p_list, n_list, train, explicit_gen=gens is not None)
    for line in notes:  # (only once the arguments are known to be good)
        _note(line)
    batch_list = _ints(batches, "-b/--batch", 1)
    w = Writer(fmt, "model", build_info(), machine_info(b.device), _echo)
    models.run(b, tests, batch_list, thread_list or [current_threads()], reps, on_row=w.row, progress=_progress)
    _progress.clear()
    w.close()


def _kernels(kernels, shapes, causal, act, params, tuned, thread_list, reps, fmt, plot_path, remeasure, device):
    from nbformer.bench import kernels as K
    from nbformer.bench import roofline
    from nbformer.bench.env import current_threads
    from nbformer.bench.report import Writer, build_info, machine_info
    from nbformer.errors import InputError

    if not kernels:
        raise InputError("--shape needs --kernel NAME (" + ", ".join(K.FAMILIES) + ")")
    if not shapes:
        raise InputError(f"--kernel {kernels[0]}: give its sizes with --shape ({K.family(kernels[0]).usage()})")
    fams = [K.family(k) for k in kernels]
    if len(fams) == 1:
        pairs = [(fams[0], s) for s in shapes]
    elif len(shapes) == 1:
        pairs = [(f, shapes[0]) for f in fams]
    elif len(shapes) == len(fams):
        pairs = list(zip(fams, shapes))
    else:
        raise InputError(f"{len(fams)} --kernel and {len(shapes)} --shape options: give one --shape per --kernel "
                         f"(in order), or one kernel with several shapes")
    options = {"causal": causal}
    if act is not None:
        options["act"] = act.strip().lower()
        if options["act"] not in K.ACTS:
            raise InputError(f"--act {act!r}: expected one of {', '.join(K.ACTS)}")
    for flag, opt, given in (("--causal", "causal", causal), ("--act", "act", act is not None)):
        if given and not any(opt in f.options for f in fams):
            users = [f.name for f in K.FAMILIES.values() if opt in f.options]
            raise InputError(f"{flag}: applies to {', '.join(users)}, not to {', '.join(f.name for f in fams)}")
    specs = [(f, K.parse_shape(f, s), options) for f, s in pairs]
    par = K.parse_params(params)
    if plot_path is not None:
        roofline._pyplot()  # a missing matplotlib is said before anything runs
        from pathlib import Path

        pp = Path(plot_path)
        if not pp.parent.exists():
            raise InputError(f"--plot {plot_path}: the directory {pp.parent} does not exist")
        if pp.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
            raise InputError(f"--plot {plot_path}: expected a .png, .svg, .pdf or .jpg file name")
    dev = K.bench_device(device)
    if dev.kind != "cpu" and thread_list is not None:
        _note(f"bench: -t/--threads does not apply to kernels on {dev.name} (one row per kernel)")
    w = Writer(fmt, "kernel", build_info(), machine_info(dev.name), _echo)
    measured = set()

    def roof(dev_name, threads):
        again = remeasure and (dev_name, threads) not in measured
        measured.add((dev_name, threads))
        return roofline.get(dev_name, threads, remeasure=again, log=_note)

    rows = K.run(specs, dev.name, thread_list or [current_threads()], reps, roof, params=par, on_row=w.row,
                 on_roofline=w.roofline, progress=_progress, tuned=tuned)
    _progress.clear()
    w.close()
    if plot_path is not None:
        roofs = w.rooflines
        index = {(r.device, r.threads): i for i, r in enumerate(roofs)}
        points = []
        for r in rows:
            opts = "".join(f" {k}" if v is True else f" {k}={v}" for k, v in r["options"].items()
                           if v not in (False, "none"))
            label = f"{r['kernel']}{opts} {r['shape']}"  # (the roofline, i.e. the thread count, is the colour)
            points.append({"label": label, "intensity": r["intensity"], "gflops": r["gflops"],
                           "roof": index.get((r["device"], r["n_threads"]), 0)})
        roofline.plot(plot_path, roofs, points)
        _note(f"bench: roofline plot written to {plot_path}")
