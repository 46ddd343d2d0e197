"""The `sae-pipe` command line: thin commands over the library.

Results go to stdout (the last line is the path or JSON a script wants); progress and messages go
to stderr. A user error prints one message and exits non-zero, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

# This process reports progress itself; tqdm bars of libraries (GGUF de-quantization) stay quiet.
# tqdm reads this when first imported (`import torch` does), so it is set before anything heavy.
os.environ.setdefault("TQDM_DISABLE", "1")

import click
import typer

from pipeline.infra.console import console, guarded

app = typer.Typer(
    name="sae-pipe",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Extract LLM activations once, then fit, evaluate and interpret many SAEs from the cache.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation caches.")
app.add_typer(cache_app, name="cache")

# Options shared by several commands, defined once.
ParamsOpt = Annotated[
    str | None,
    typer.Option("--params", help="Read defaults from this params.yaml (options given on the command line win)."),
]
CacheRootOpt = Annotated[
    str | None, typer.Option("--cache-root", help="Root folder (or fsspec URL) of the cache [default: cache].")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N [default: auto].")]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", help="Batch size (sequences for the LLM, tokens for the SAE in fit and interpret)."),
]
InferKOpt = Annotated[int | None, typer.Option("--infer-k", help="Encode with this k instead of the trained one.")]
ThetaOpt = Annotated[float | None, typer.Option("--theta", help="Encode with an activation threshold, not top-k.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Token budget.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (its last line).")]
CachePathArg = Annotated[str, typer.Argument(help="A cache folder (cache/activations/<key>) or URL.")]


def _params(path: str | None) -> dict[str, Any] | None:
    from pipeline.infra.params import load_params

    return load_params(path) if path else None


@app.command()
def extract(
    model: Annotated[
        str | None, typer.Option("--model", help="smollm2-135m, a .gguf file, a model folder or a hub id.")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="builtin, a hub dataset id (Skylion007/openwebtext) or a local file/folder."),
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="Dataset split [default: train].")] = None,
    text_column: Annotated[
        str | None, typer.Option("--text-column", help="Column with the text [default: text].")
    ] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="6 | 3,7,11 | 3:11 | all | route.")] = None,
    ctx_len: Annotated[int | None, typer.Option("--ctx-len", help="Tokens per packed sequence.")] = None,
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = None,
    normalize: Annotated[str | None, typer.Option("--normalize", help="standardize | scale | none.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Stored dtype: float16 | float32.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="zarr | memmap.")] = None,
    heldout: Annotated[
        float | None, typer.Option("--heldout", help="Share of sequences held out [default: 0.05].")
    ] = None,
    shard_mb: Annotated[float | None, typer.Option("--shard-mb", help="Target shard size in MiB.")] = None,
    cache_root: CacheRootOpt = None,
    device: DeviceOpt = None,
    compute_dtype: Annotated[str | None, typer.Option("--compute-dtype", help="auto | float32 | bfloat16.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of the model.")] = None,
    trust_remote_code: Annotated[
        bool | None, typer.Option("--trust-remote-code", help="Run model code from the hub.")
    ] = None,
    params: ParamsOpt = None,
) -> None:
    """Run the LLM once and cache normalized hidden states; prints the cache folder last."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.extract.stage import ExtractConfig
    from pipeline.extract.stage import extract as run_extract
    from pipeline.infra.params import build_config

    cfg = build_config(ExtractConfig, _params(params), "extract", overrides, shared=("model", "data"))
    from pipeline.infra.distributed import Ranks

    ranks = Ranks.from_env()
    folder = run_extract(cfg, ranks)
    if ranks.is_main:  # under torchrun, one line from rank 0
        typer.echo(folder.url)


@app.command()
def fit(
    cache: Annotated[str | None, typer.Option("--cache", help="Cache folder from `sae-pipe extract`.")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="topk | route.")] = None,
    layer: Annotated[int | None, typer.Option("--layer", help="TopK: the model layer to train on.")] = None,
    route_layers: Annotated[str | None, typer.Option("--route-layers", help="RouteSAE: layers to route over.")] = None,
    latents: Annotated[int | None, typer.Option("--latents", help="Dictionary size.")] = None,
    expansion: Annotated[
        int | None, typer.Option("--expansion", help="Latents per input dim (if no --latents).")
    ] = None,
    k: Annotated[int | None, typer.Option("--k", help="Active latents per token.")] = None,
    routing: Annotated[str | None, typer.Option("--routing", help="RouteSAE: hard | soft.")] = None,
    aggregate: Annotated[str | None, typer.Option("--aggregate", help="RouteSAE router input: sum | mean.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="adam | signum.")] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="warmup-decay | constant.")] = None,
    batch_size: BatchOpt = None,
    max_tokens: MaxTokensOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the training split.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Weight initialization seed.")] = None,
    data_seed: Annotated[int | None, typer.Option("--data-seed", help="Shuffling seed (shared by a sweep).")] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="Encoder GEMM: auto | float32 | bfloat16.")
    ] = None,
    sweep: Annotated[
        list[str] | None, typer.Option("--sweep", help="key=v1,v2 (repeatable): train every combination from one read.")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", help="Folder for run folders [default: cache/saes].")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Continue unfinished runs with the same settings.")
    ] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Retrain runs that already finished.")] = None,
    cache_root: CacheRootOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Train TopK / RouteSAE SAEs on a cache (a sweep from one read); prints one run folder per line."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.fit.plan import parse_sweep
    from pipeline.fit.stage import FitConfig
    from pipeline.fit.stage import fit as run_fit
    from pipeline.infra.params import build_config

    overrides["sweep"] = parse_sweep(sweep) if sweep else None
    cfg = build_config(FitConfig, _params(params), "fit", overrides)
    from pipeline.infra.distributed import Ranks

    ranks = Ranks.from_env()
    folders = run_fit(cfg, ranks)
    if ranks.is_main:
        for folder in folders:
            typer.echo(folder.url)


@app.command()
def evaluate(
    runs: Annotated[list[str] | None, typer.Argument(help="Run folder(s) printed by `sae-pipe fit`.")] = None,
    all_in: Annotated[
        str | None,
        typer.Option(
            "--all", help="Evaluate every finished run in this folder and write a comparison table and plots."
        ),
    ] = None,
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma list of nmse, kl, ce.")] = None,
    infer_k: InferKOpt = None,
    theta: ThetaOpt = None,
    device: DeviceOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="Folder for metrics [default: cache/evaluate].")] = None,
    cache_root: CacheRootOpt = None,
    as_json: JsonOpt = False,
    params: ParamsOpt = None,
) -> None:
    """Reconstruction metrics on held-out tokens, and KL / CE with the SAE spliced into the LLM."""
    overrides = {k: v for k, v in locals().items() if k not in ("params", "all_in", "as_json", "runs")}
    from pipeline.evaluate.compare import find_runs, write_comparison
    from pipeline.evaluate.stage import EvaluateConfig
    from pipeline.evaluate.stage import evaluate as run_evaluate
    from pipeline.infra.files import Folder
    from pipeline.infra.params import build_config

    overrides["metrics"] = metrics.split(",") if metrics else None
    overrides["runs"] = (runs or []) + (find_runs(all_in) if all_in else [])
    cfg = build_config(EvaluateConfig, _params(params), "evaluate", overrides)
    results = run_evaluate(cfg)
    if all_in:
        root = Folder.at(cfg.out) if cfg.out else Folder.at(cfg.cache_root).child("evaluate")
        for path in write_comparison(results, root):
            console.print(f"wrote {path}")
    typer.echo(
        json.dumps(results[0] if len(results) == 1 else results)
        if as_json
        else "\n".join(
            f"{r['run']}: nmse {r['nmse']:.4f} l0 {r['l0']:.1f}"
            + (f" kl {r['kl_per_token']:.4f} ce_recovered {r['ce_recovered']:.3f}" if "kl_per_token" in r else "")
            for r in results
        )
    )


@app.command()
def interpret(
    run: Annotated[str, typer.Argument(help="A run folder printed by `sae-pipe fit`.")],
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = None,
    infer_k: InferKOpt = None,
    theta: ThetaOpt = None,
    top: Annotated[int | None, typer.Option("--top", help="Top-activating examples per latent.")] = None,
    window: Annotated[int | None, typer.Option("--window", help="Context tokens before the activating token.")] = None,
    features: Annotated[
        int | None, typer.Option("--features", help="Latents to explain (sampled with --seed).")
    ] = None,
    explainer: Annotated[str | None, typer.Option("--explainer", help="openai | none.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Explainer model [default: gpt-4o].")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Explainer requests in flight.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the feature sample.")] = None,
    protocol: Annotated[bool | None, typer.Option("--protocol", help="Apply the RouteSAE context filter.")] = None,
    cache: Annotated[str | None, typer.Option("--cache", help="Cache to read (must be the run's own).")] = None,
    device: DeviceOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="Output folder [default: cache/interpret/<run>].")] = None,
    cache_root: CacheRootOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Feature tables (parquet), GPT-4o explanations and an HTML report for one run; prints the output folder."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.infra.params import build_config
    from pipeline.interpret.stage import InterpretConfig
    from pipeline.interpret.stage import interpret as run_interpret

    cfg = build_config(InterpretConfig, _params(params), "interpret", overrides)
    typer.echo(run_interpret(cfg)["out"])


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="A TopK run folder printed by `sae-pipe fit`.")],
    fmt: Annotated[str, typer.Option("--format", help="saelens | sparsify.")],
    out: Annotated[str, typer.Option("--out", help="New folder to write (must not exist or be empty).")],
) -> None:
    """Write a run in the layout SAELens or sparsify loads; prints the folder to load from."""
    from pipeline.sae.export import export_run

    typer.echo(export_run(run, fmt, out).url)


@cache_app.command("list")
def cache_list(cache_root: CacheRootOpt = None, as_json: JsonOpt = False) -> None:
    """List the caches under <cache-root>/activations."""
    from rich.table import Table

    from pipeline.cache.catalog import list_caches

    caches = list_caches(cache_root or "cache")
    if as_json:
        typer.echo(json.dumps(caches))
        return
    table = Table("key", "status", "model", "layers", "rows", "MiB", "backend")
    for c in caches:
        table.add_row(
            c["key"],
            c["status"],
            str(c.get("model", "")),
            str(c.get("layers", "")),
            f"{c['rows']:,}" if c.get("rows") else "-",
            f"{c['bytes'] / 2**20:,.1f}" if c.get("bytes") else "-",
            str(c.get("backend", "")),
        )
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


def _run_app() -> None:
    try:
        app(standalone_mode=False)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.ClickException as err:  # usage errors: click's own message and exit code
        err.show()
        sys.exit(err.exit_code)


def main() -> None:
    """Console entry point of `sae-pipe`."""
    guarded(_run_app)


if __name__ == "__main__":
    main()
