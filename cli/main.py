"""`nbformer` command line: thin commands over the public API, one module per command.

Heavy imports (numba, numpy kernels) happen inside the commands so `nbformer --help` is instant.
Every NbformerError becomes one line on stderr and exit status 1, never a traceback (cli.common).
"""
from __future__ import annotations

import click

from .bench_cmd import bench
from .chat_cmd import chat
from .devices_cmd import devices
from .embed_cmd import embed
from .generate_cmd import generate, translate
from .inspect_cmd import inspect
from .quantize_cmd import quantize
from .train_cmd import train
from .tune_cmd import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbformer", prog_name="nbformer")
def main():
    """nbformer: transformer models on Numba kernels, no torch at run time."""


for _command in (embed, generate, translate, chat, inspect, train, devices, bench, tune, quantize):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
