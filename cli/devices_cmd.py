"""`nbformer devices`: the devices usable on this machine (and why CUDA is not, when it is not)."""
from __future__ import annotations

import click

from .common import fmt_bytes, friendly


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@click.command()
@friendly
def devices():
    """List the devices nbformer can run on here ('cpu', 'cuda:N'), with what each is."""
    import os

    from nbformer import devices as d

    click.echo(f"cpu      {_cpu_name()}, {os.cpu_count()} threads")
    names = d.available_devices()[1:]
    for name in names:
        dev = d.get_device(name)
        free, total = dev.free_bytes(), dev.total_bytes()
        memory = "" if free is None else f", {fmt_bytes(free)} free of {fmt_bytes(total)}"
        cc = getattr(dev.cuda.get_current_device(), "compute_capability", None)
        click.echo(f"{name:<8} {dev.gpu_name}{'' if cc is None else f', compute capability {cc[0]}.{cc[1]}'}{memory}")
    if not names:
        click.echo(f"(no cuda: {d.cuda_unavailable_reason()})")
    default = d.default_device_name()
    click.echo(f"default: {default}" + (f" (from ${d.ENV_VAR})" if os.environ.get(d.ENV_VAR) else ""))
