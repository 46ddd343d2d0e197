"""The `sae-pipe` command line: thin commands over the library, one module per command group (stages,
cache, interop); every stage option is generated from its config (options.py).

Results go to stdout (the last line is the path or JSON a script wants); progress and messages go
to stderr. A user error prints one message and exits non-zero, without a traceback.
"""

from __future__ import annotations

import os
import sys

# This process reports progress itself; tqdm bars of libraries (GGUF de-quantization) stay quiet.
# tqdm reads this when first imported (`import torch` does), so it is set before anything heavy.
os.environ.setdefault("TQDM_DISABLE", "1")

import click
import typer
from rich.markup import escape

from pipeline.cli import stages
from pipeline.cli.cache import cache_app
from pipeline.cli.interop import export, import_
from pipeline.infra.console import console, guarded

app = typer.Typer(
    name="sae-pipe",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Extract LLM activations once, then fit, evaluate and interpret many SAEs from the cache.",
)
app.add_typer(cache_app, name="cache")


for command in (
    stages.extract,
    stages.fit,
    stages.finetune,
    stages.evaluate,
    stages.interpret,
    stages.steer,
    stages.circuit,
):
    app.command()(command)
app.command()(export)
app.command("import")(import_)


# Usage errors: click's, and those of the copy of click that typer >= 0.20 carries (other classes).
USAGE_ERRORS: tuple[type[click.ClickException], ...] = tuple(
    {click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")}
)


def _run_app() -> None:
    try:
        app(standalone_mode=False)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except USAGE_ERRORS as err:  # one line like a user error's, with click's exit code (2 for usage)
        ctx = getattr(err, "ctx", None)  # usage errors know their command; other click errors do not
        where = f"; see `{ctx.command_path} --help`" if ctx else ""
        message = " ".join(err.format_message().split()).rstrip(".")
        console.print(f"[bold red]error:[/] {escape(message)}{where}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)


def main() -> None:
    """Console entry point of `sae-pipe`."""
    guarded(_run_app)
