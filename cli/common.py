"""What every command shares: NbformerError -> one 'error:' line and exit status 1, byte sizes."""
from __future__ import annotations

import functools
import os
import sys

import click


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nbformer.errors import NbformerError

        try:
            return fn(*args, **kwargs)
        except NbformerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `nbformer generate ... | head`: the reader left; stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush must not fail again
            except (OSError, ValueError):
                pass
            sys.exit(141)

    return wrapper


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def device_option(fn):
    """--device / -d for the commands that run a model."""
    return click.option("--device", "-d", "device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: $NBFORMER_DEVICE, else cpu); see `nbformer devices`")(fn)


def no_compile_progress():
    """--json output: no 'compiling kernels' progress line on stderr (a first run stays silent)."""
    from nbformer.kernels.cpu import precompile

    precompile.PROGRESS = False
