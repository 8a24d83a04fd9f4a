"""`nbformer inspect`: a model's config, parameter count and planned memory (forward, KV cache, training)."""
from __future__ import annotations

import click

from .common import device_option, fmt_bytes, friendly


@click.command()
@click.argument("model_path", required=False)
@click.option("--batch", "-b", default=1, show_default=True, type=int)
@click.option("--seq", "-s", default=128, show_default=True, type=int)
@click.option("--train", "train_plan", is_flag=True, help="also print the training memory plan (Adam)")
@click.option("--tuning", "show_tuning", is_flag=True,
              help="show which config each tunable kernel of the plan will use, and where it comes from "
                   "(default or this machine's tuning cache; see `nbformer tune`)")
@device_option
@friendly
def inspect(model_path, batch, seq, train_plan, device, show_tuning):
    """Print a model's config, parameter count and planned forward arena at (--batch, --seq)."""
    import nbformer
    from nbformer.errors import InputError

    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be positive (got {batch}, {seq})")
    if model_path is None:
        from nbformer.defaults import default_embedder_path

        model_path = str(default_embedder_path())
    m = nbformer.load(model_path, device=device)
    cfg = m.config
    if seq > cfg.max_positions:
        raise InputError(f"--seq {seq} exceeds the model's {cfg.max_positions} positions")
    click.echo(f"model: {m.ckpt.path}")
    click.echo(f"family: {cfg.family}   arch: {cfg.arch}   norm: {cfg.norm}-LN   activation: {cfg.activation}   "
               f"positions: {cfg.positions}")
    layers = (f"{cfg.n_layers} encoder + {cfg.n_decoder_layers} decoder" if cfg.arch == "encoder_decoder"
              else str(cfg.n_layers))
    click.echo(f"layers: {layers}   d_model: {cfg.d_model}   heads: {cfg.n_heads} x {cfg.head_size}   "
               f"d_ff: {cfg.d_ff}   vocab: {cfg.vocab_size}   max positions: {cfg.max_positions}")
    n = m.num_parameters
    click.echo(f"parameters: {n:,} ({fmt_bytes(4 * n)} float32)")
    if (m.ckpt.metadata or {}).get("gguf_tensors"):  # a .gguf file: its metadata, tensor types, bytes per token
        from nbformer.weights.gguf_io import summary_lines

        for line in summary_lines(m.ckpt):
            click.echo(line)
    dev = m.dev
    where = "" if dev.kind == "cpu" else f" on {dev.name}"
    if dev.kind != "cpu":
        free, total = dev.free_bytes(), dev.total_bytes()
        memory = "" if free is None else f"; {fmt_bytes(free)} of {fmt_bytes(total)} free"
        click.echo(f"device: {dev.name} ({dev.gpu_name}){memory}; parameters uploaded once as one flat buffer "
                   f"of {fmt_bytes(4 * int(m.param_buffer.size))}")
    plan = m.plan(batch, seq)
    click.echo(f"forward graph at batch {batch} x seq {seq}: {len(plan.schedule)} nodes")
    click.echo(f"planned activation arena{where}: {fmt_bytes(plan.arena_bytes)} "
               f"(one buffer per tensor would need {fmt_bytes(plan.naive_bytes)})")
    if cfg.lm_head and cfg.arch != "encoder":
        from nbformer.kv_cache import KVCache

        kv = KVCache.plan_bytes(cfg, batch, seq, seq if cfg.arch == "encoder_decoder" else None)
        click.echo(f"KV cache{where} for decoding {batch} x {seq} positions"
                   f"{' (source of ' + str(seq) + ')' if cfg.arch == 'encoder_decoder' else ''}: {fmt_bytes(kv)}")
    if show_tuning:
        _print_tuning(m, batch, seq)
    if train_plan:
        from nbformer.graph.build import build_train
        from nbformer.graph.plan import plan_memory

        loss = "lm" if cfg.lm_head else "vjp"
        g, grads = build_train(cfg, batch, seq, loss=loss, S=seq if cfg.arch == "encoder_decoder" else None)
        tp = plan_memory(g)
        n_grad = sum(g.tensors[t].size for t in grads.values())
        click.echo(f"training step at batch {batch} x seq {seq} ({'LM loss' if loss == 'lm' else 'output VJP'}, "
                   f"Adam): {len(tp.schedule)} nodes")
        click.echo(f"  parameters:        {fmt_bytes(4 * n)}")
        click.echo(f"  gradients:         {fmt_bytes(4 * n_grad)}")
        click.echo(f"  optimizer state:   {fmt_bytes(8 * n)} (Adam m and v)")
        click.echo(f"  activations arena: {fmt_bytes(tp.arena_bytes)} (saved for backward + transient; one "
                   f"buffer per tensor would need {fmt_bytes(tp.naive_bytes)})")
        total = 4 * n + 4 * n_grad + 8 * n + tp.arena_bytes
        click.echo(f"  total:             {fmt_bytes(total)}{where}")
        free = dev.free_bytes()
        if free is not None:
            fits = "fits in" if total <= free else "does NOT fit in"
            click.echo(f"  {fits} the {fmt_bytes(free)} free on {dev.name}")


def _print_tuning(m, batch, seq):
    """One line per distinct tunable kernel shape of the plan: config, source, node count."""
    from nbformer.tuning import runtime
    from nbformer.tuning.cache import default_path
    from nbformer.tuning.tuner import model_graphs

    cfg, kind = m.config, m.dev.kind
    phases = ["prefill", "decode"] if cfg.arch == "decoder" and cfg.lm_head else (
        ["embed"] if cfg.arch == "encoder" else ["forward"])
    mode = runtime.mode()
    if mode == "off":
        where = f"{default_path(kind)} (not read)"
    else:
        cache = runtime.cache_for(kind)
        where = str(cache.path) + ("" if cache.path.exists() else " (none yet: run `nbformer tune`)")
        if cache.ignored:
            where += f"; {cache.ignored}"
    click.echo(f"tuning (NBFORMER_TUNING={mode}; cache: {where}):")
    for ph, g in model_graphs(m, batch, seq, phases).items():
        from nbformer.graph.plan import plan_memory

        binds = runtime.bind_schedule(g, plan_memory(g).schedule, kind, allow_tune=False)
        groups = {}
        for b in binds:
            if b is not None:
                groups.setdefault(id(b), [b, 0])[1] += 1
        if not groups:
            click.echo(f"  {ph}: no tunable kernels")
        for b, n in groups.values():
            conf = " ".join(f"{k}={v}" for k, v in b.config.items())
            click.echo(f"  {ph:8s} {b.description} x{n}: {conf}  [{b.source}]")
