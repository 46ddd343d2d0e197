"""`sae-pipe cache ...`: list, inspect, verify and repair activation caches."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.cli.options import JsonOpt
from pipeline.infra.console import console

cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation caches.")

CacheRootOpt = Annotated[
    str | None, typer.Option("--cache-root", help="Root folder (or fsspec URL) of the caches [default: cache].")
]
CachePathArg = Annotated[str, typer.Argument(help="A cache folder (cache/activations/<key>) or URL.")]


@cache_app.command("list")
def cache_list(cache_root: CacheRootOpt = None, as_json: JsonOpt = False) -> None:
    """List the caches under <cache-root>/activations."""
    from rich.table import Table

    from pipeline.cache.catalog import catalog_rows, list_caches

    caches = list_caches(cache_root or "cache")
    if as_json:
        typer.echo(json.dumps(caches))
        return
    table = Table("key", "status", "model", "layers", "rows", "MiB", "backend")
    for row in catalog_rows(caches):
        table.add_row(*row)
    console.print(table)


@cache_app.command("info")
def cache_info(path: CachePathArg, as_json: JsonOpt = False) -> None:
    """Show a cache's spec, row counts, disk use and sampled per-token statistics."""
    from pipeline.cache.catalog import summarize
    from pipeline.cache.reader import ActivationCache

    info = summarize(ActivationCache.open(path))
    if as_json:
        typer.echo(json.dumps(info))
        return
    console.print_json(json.dumps(info))


@cache_app.command("verify")
def cache_verify(path: CachePathArg) -> None:
    """Re-read every shard and compare checksums; exits non-zero and names every bad array on a mismatch."""
    from pipeline.cache.reader import ActivationCache

    cache = ActivationCache.open(path)
    cache.require_valid()
    typer.echo(f"ok: {len(cache.shards)} shard(s), {cache.rows('train') + cache.rows('heldout'):,} rows verified")


@cache_app.command("repair")
def cache_repair(path: CachePathArg) -> None:
    """Drop the shards that fail their checksums; the same extract command then rewrites just those."""
    from pipeline.cache.catalog import repair_cache

    dropped = repair_cache(path)
    if not dropped:
        typer.echo("nothing to repair: every shard verifies")
        return
    typer.echo(
        f"dropped shard(s) {', '.join(map(str, dropped))}; re-run the extract command that made this "
        "cache to rewrite them"
    )
