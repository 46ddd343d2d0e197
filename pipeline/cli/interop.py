"""The `sae-pipe import` and `export` commands: SAEs in and out of the SAELens and sparsify layouts."""

from __future__ import annotations

from typing import Annotated

import typer


def export(
    run: Annotated[str, typer.Argument(help="A TopK run folder printed by `sae-pipe fit`.")],
    fmt: Annotated[str, typer.Option("--format", help="saelens | sparsify.")],
    out: Annotated[str, typer.Option("--out", help="New folder to write (must not exist or be empty).")],
) -> None:
    """Write a run in the layout SAELens or sparsify loads; prints the folder to load from."""
    from pipeline.interop.export import export_run

    typer.echo(export_run(run, fmt, out).url)


def import_(
    source: Annotated[
        str, typer.Argument(help="A SAELens or sparsify checkpoint folder, or a hub repo id (org/name).")
    ],
    fmt: Annotated[str, typer.Option("--format", help="saelens | sparsify | auto (detected from the files).")] = "auto",
    hookpoint: Annotated[
        str | None,
        typer.Option(
            help="Which SAE of a folder (or hub repo) holding several: its subfolder, e.g. layers.6 (one that is "
            "not there is refused, listing those that are)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="The model the SAE is used with (default: the one the checkpoint names); checked against it."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Run folder to write (default <cache-root>/saes/imported-...).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Accept a model other than the one the checkpoint names.")] = False,
    cache_root: Annotated[str, typer.Option(help="Root of saes/ (default run folders go there).")] = "cache",
) -> None:
    """Import a SAELens or sparsify SAE as a run folder (every command that takes a run takes it); prints it last."""
    from pipeline.interop.importing import import_checkpoint

    typer.echo(import_checkpoint(source, fmt, hookpoint, model, out, force, cache_root).url)
