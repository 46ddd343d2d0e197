"""The `sae-pipe` command line: thin commands over the library.

Results go to stdout (the last line is the path or JSON a script wants); progress and messages go
to stderr. A user error prints one message and exits non-zero, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

# This process reports progress itself; tqdm bars of libraries (GGUF de-quantization) stay quiet.
# tqdm reads this when first imported (`import torch` does), so it is set before anything heavy.
os.environ.setdefault("TQDM_DISABLE", "1")

import click
import typer
from rich.markup import escape

from pipeline.cli_cache import JsonOpt, ParamsOpt, cache_app, opt, params_of
from pipeline.cli_circuit import circuit
from pipeline.cli_interop import export, import_
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.fit.config import FitConfig
from pipeline.infra.console import console, guarded
from pipeline.infra.params import doc
from pipeline.interpret.config import InterpretConfig
from pipeline.steer.config import SteerConfig

app = typer.Typer(
    name="sae-pipe",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Extract LLM activations once, then fit, evaluate and interpret many SAEs from the cache.",
)
app.add_typer(cache_app, name="cache")


@app.command()
def extract(
    model: Annotated[str | None, opt(ExtractConfig, "model")] = None,
    dataset: Annotated[str | None, opt(ExtractConfig, "dataset")] = None,
    split: Annotated[str | None, opt(ExtractConfig, "split")] = None,
    text_column: Annotated[str | None, opt(ExtractConfig, "text_column")] = None,
    layers: Annotated[str | None, opt(ExtractConfig, "layers")] = None,
    ctx_len: Annotated[int | None, opt(ExtractConfig, "ctx_len")] = None,
    max_tokens: Annotated[int | None, opt(ExtractConfig, "max_tokens")] = None,
    batch_size: Annotated[int | None, opt(ExtractConfig, "batch_size")] = None,
    normalize: Annotated[str | None, opt(ExtractConfig, "normalize")] = None,
    dtype: Annotated[str | None, opt(ExtractConfig, "dtype")] = None,
    backend: Annotated[str | None, opt(ExtractConfig, "backend")] = None,
    heldout: Annotated[float | None, opt(ExtractConfig, "heldout")] = None,
    shard_mb: Annotated[float | None, opt(ExtractConfig, "shard_mb")] = None,
    cache_root: Annotated[str | None, opt(ExtractConfig, "cache_root")] = None,
    device: Annotated[str | None, opt(ExtractConfig, "device")] = None,
    compute_dtype: Annotated[str | None, opt(ExtractConfig, "compute_dtype")] = None,
    revision: Annotated[str | None, opt(ExtractConfig, "revision")] = None,
    trust_remote_code: Annotated[bool | None, opt(ExtractConfig, "trust_remote_code")] = None,
    params: ParamsOpt = None,
) -> None:
    """Run the LLM once and cache normalized hidden states; prints the cache folder last."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.extract.stage import extract as run_extract
    from pipeline.infra.params import build_config

    cfg = build_config(ExtractConfig, params_of(params), "extract", overrides, shared=("model", "data"))
    from pipeline.infra.distributed import Ranks

    ranks = Ranks.from_env()
    folder = run_extract(cfg, ranks)
    if ranks.is_main:  # under torchrun, one line from rank 0
        typer.echo(folder.url)


@app.command()
def fit(
    cache: Annotated[str | None, opt(FitConfig, "cache")] = None,
    arch: Annotated[str | None, opt(FitConfig, "arch")] = None,
    layer: Annotated[int | None, opt(FitConfig, "layer")] = None,
    route_layers: Annotated[str | None, opt(FitConfig, "route_layers")] = None,
    latents: Annotated[int | None, opt(FitConfig, "latents")] = None,
    expansion: Annotated[int | None, opt(FitConfig, "expansion")] = None,
    k: Annotated[int | None, opt(FitConfig, "k")] = None,
    routing: Annotated[str | None, opt(FitConfig, "routing")] = None,
    aggregate: Annotated[str | None, opt(FitConfig, "aggregate")] = None,
    lr: Annotated[float | None, opt(FitConfig, "lr")] = None,
    router_lr: Annotated[float | None, opt(FitConfig, "router_lr")] = None,
    recipe: Annotated[str | None, opt(FitConfig, "recipe")] = None,
    optimizer: Annotated[str | None, opt(FitConfig, "optimizer")] = None,
    schedule: Annotated[str | None, opt(FitConfig, "schedule")] = None,
    batch_size: Annotated[int | None, opt(FitConfig, "batch_size")] = None,
    max_tokens: Annotated[int | None, opt(FitConfig, "max_tokens")] = None,
    epochs: Annotated[int | None, opt(FitConfig, "epochs")] = None,
    seed: Annotated[int | None, opt(FitConfig, "seed")] = None,
    data_seed: Annotated[int | None, opt(FitConfig, "data_seed")] = None,
    precision: Annotated[str | None, opt(FitConfig, "precision")] = None,
    dead_tokens: Annotated[int | None, opt(FitConfig, "dead_tokens")] = None,
    k_aux: Annotated[int | None, opt(FitConfig, "k_aux")] = None,
    aux_alpha: Annotated[float | None, opt(FitConfig, "aux_alpha")] = None,
    revive: Annotated[float | None, opt(FitConfig, "revive")] = None,
    route_balance: Annotated[float | None, opt(FitConfig, "route_balance")] = None,
    prefixes: Annotated[str | None, opt(FitConfig, "prefixes")] = None,
    multi_topk: Annotated[bool | None, opt(FitConfig, "multi_topk")] = None,
    sparsity_coeff: Annotated[float | None, opt(FitConfig, "sparsity_coeff")] = None,
    sparsity_warmup: Annotated[float | None, opt(FitConfig, "sparsity_warmup")] = None,
    bandwidth: Annotated[float | None, opt(FitConfig, "bandwidth")] = None,
    sweep: Annotated[list[str] | None, opt(FitConfig, "sweep")] = None,
    out: Annotated[str | None, opt(FitConfig, "out")] = None,
    resume: Annotated[bool | None, opt(FitConfig, "resume")] = None,
    overwrite: Annotated[bool | None, opt(FitConfig, "overwrite")] = None,
    cache_root: Annotated[str | None, opt(FitConfig, "cache_root")] = None,
    device: Annotated[str | None, opt(FitConfig, "device")] = None,
    params: ParamsOpt = None,
) -> None:
    """Train SAEs of any trainable architecture on a cache (a sweep from one read); prints one run folder per line."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.fit.plan import parse_sweep
    from pipeline.fit.stage import fit as run_fit
    from pipeline.infra.params import build_config

    overrides["sweep"] = parse_sweep(sweep) if sweep else None
    cfg = build_config(FitConfig, params_of(params), "fit", overrides)
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
    max_tokens: Annotated[int | None, opt(EvaluateConfig, "max_tokens")] = None,
    batch_size: Annotated[int | None, opt(EvaluateConfig, "batch_size")] = None,
    metrics: Annotated[str | None, opt(EvaluateConfig, "metrics")] = None,
    infer_k: Annotated[int | None, opt(EvaluateConfig, "infer_k")] = None,
    theta: Annotated[float | None, opt(EvaluateConfig, "theta")] = None,
    splice: Annotated[str | None, opt(EvaluateConfig, "splice")] = None,
    cache: Annotated[str | None, opt(EvaluateConfig, "cache")] = None,
    device: Annotated[str | None, opt(EvaluateConfig, "device")] = None,
    compute_dtype: Annotated[str | None, opt(EvaluateConfig, "compute_dtype")] = None,
    out: Annotated[str | None, opt(EvaluateConfig, "out")] = None,
    cache_root: Annotated[str | None, opt(EvaluateConfig, "cache_root")] = None,
    as_json: JsonOpt = False,
    params: ParamsOpt = None,
) -> None:
    """Reconstruction metrics on held-out tokens, and KL / CE with the SAE spliced into the LLM."""
    overrides = {k: v for k, v in locals().items() if k not in ("params", "all_in", "as_json", "runs")}
    from pipeline.evaluate.compare import find_runs, one_line, write_comparison
    from pipeline.evaluate.stage import evaluate as run_evaluate
    from pipeline.infra.files import Folder
    from pipeline.infra.params import build_config

    overrides["metrics"] = metrics.split(",") if metrics else None
    overrides["runs"] = (runs or []) + (find_runs(all_in) if all_in else [])
    cfg = build_config(EvaluateConfig, params_of(params), "evaluate", overrides)
    results = run_evaluate(cfg)
    if all_in:
        root = Folder.at(cfg.out) if cfg.out else Folder.at(cfg.cache_root).child("evaluate")
        for path in write_comparison(results, root):
            console.print(f"wrote {path}")
    typer.echo(
        json.dumps(results[0] if len(results) == 1 else results) if as_json else "\n".join(map(one_line, results))
    )


@app.command()
def interpret(
    run: Annotated[str | None, typer.Argument(help="A run folder printed by `sae-pipe fit`.")] = None,
    all_in: Annotated[
        str | None,
        typer.Option("--all", help="Interpret every finished run in this folder and write a comparison page."),
    ] = None,
    max_tokens: Annotated[int | None, opt(InterpretConfig, "max_tokens")] = None,
    batch_size: Annotated[int | None, opt(InterpretConfig, "batch_size")] = None,
    infer_k: Annotated[int | None, opt(InterpretConfig, "infer_k")] = None,
    theta: Annotated[float | None, opt(InterpretConfig, "theta")] = None,
    top: Annotated[int | None, opt(InterpretConfig, "top")] = None,
    window: Annotated[int | None, opt(InterpretConfig, "window")] = None,
    features: Annotated[int | None, opt(InterpretConfig, "features")] = None,
    explainer: Annotated[str | None, opt(InterpretConfig, "explainer")] = None,
    model: Annotated[str | None, opt(InterpretConfig, "model")] = None,
    base_url: Annotated[str | None, opt(InterpretConfig, "base_url")] = None,
    score: Annotated[str | None, opt(InterpretConfig, "score")] = None,
    scorer_model: Annotated[str | None, opt(InterpretConfig, "scorer_model")] = None,
    scorer_base_url: Annotated[str | None, opt(InterpretConfig, "scorer_base_url")] = None,
    max_cost: Annotated[float | None, opt(InterpretConfig, "max_cost")] = None,
    test_share: Annotated[float | None, opt(InterpretConfig, "test_share")] = None,
    score_quantiles: Annotated[int | None, opt(InterpretConfig, "score_quantiles")] = None,
    score_per_quantile: Annotated[int | None, opt(InterpretConfig, "score_per_quantile")] = None,
    score_hard: Annotated[float | None, opt(InterpretConfig, "score_hard")] = None,
    score_batch: Annotated[int | None, opt(InterpretConfig, "score_batch")] = None,
    fuzz_threshold: Annotated[float | None, opt(InterpretConfig, "fuzz_threshold")] = None,
    control: Annotated[bool | None, opt(InterpretConfig, "control")] = None,
    bootstrap: Annotated[int | None, opt(InterpretConfig, "bootstrap")] = None,
    concurrency: Annotated[int | None, opt(InterpretConfig, "concurrency")] = None,
    timeout: Annotated[float | None, opt(InterpretConfig, "timeout")] = None,
    seed: Annotated[int | None, opt(InterpretConfig, "seed")] = None,
    protocol: Annotated[bool | None, opt(InterpretConfig, "protocol")] = None,
    cache: Annotated[str | None, opt(InterpretConfig, "cache")] = None,
    device: Annotated[str | None, opt(InterpretConfig, "device")] = None,
    out: Annotated[str | None, opt(InterpretConfig, "out")] = None,
    cache_root: Annotated[str | None, opt(InterpretConfig, "cache_root")] = None,
    params: ParamsOpt = None,
) -> None:
    """Feature tables (parquet), GPT-4o explanations, their scores on held-out examples and an HTML report;
    prints the output folder (with --all, the comparison page)."""
    overrides = {k: v for k, v in locals().items() if k not in ("params", "all_in", "run")}
    from pipeline.evaluate.compare import find_runs
    from pipeline.infra.params import build_config
    from pipeline.interpret.compare import interpret_all
    from pipeline.interpret.stage import interpret as run_interpret

    overrides["score"] = [s for s in score.split(",") if s] if score is not None else None
    cfg = build_config(InterpretConfig, params_of(params), "interpret", {**overrides, "run": run})
    if all_in:
        typer.echo(interpret_all(cfg, ([run] if run else []) + find_runs(all_in)))
    else:
        typer.echo(run_interpret(cfg)["out"])


@app.command()
def steer(
    run: Annotated[str, typer.Argument(help=doc(SteerConfig, "run"))],
    feature: Annotated[list[str] | None, opt(SteerConfig, "features", "--feature")] = None,
    prompt: Annotated[list[str] | None, opt(SteerConfig, "prompts", "--prompt")] = None,
    prompts_file: Annotated[str | None, opt(SteerConfig, "prompts_file")] = None,
    positions: Annotated[str | None, opt(SteerConfig, "positions")] = None,
    mode: Annotated[str | None, opt(SteerConfig, "mode")] = None,
    max_new_tokens: Annotated[int | None, opt(SteerConfig, "max_new_tokens")] = None,
    sample: Annotated[bool | None, opt(SteerConfig, "sample")] = None,
    temperature: Annotated[float | None, opt(SteerConfig, "temperature")] = None,
    seed: Annotated[int | None, opt(SteerConfig, "seed")] = None,
    cache: Annotated[str | None, opt(SteerConfig, "cache")] = None,
    feature_table: Annotated[str | None, opt(SteerConfig, "feature_table")] = None,
    device: Annotated[str | None, opt(SteerConfig, "device")] = None,
    cache_root: Annotated[str | None, opt(SteerConfig, "cache_root")] = None,
    evaluate: Annotated[bool | None, opt(SteerConfig, "evaluate")] = None,
    out: Annotated[str | None, opt(SteerConfig, "out")] = None,
    eval_feature: Annotated[list[int] | None, opt(SteerConfig, "eval_features", "--eval-feature")] = None,
    n_features: Annotated[int | None, opt(SteerConfig, "n_features")] = None,
    strength: Annotated[list[float] | None, opt(SteerConfig, "strengths", "--strength")] = None,
    heldout_tokens: Annotated[int | None, opt(SteerConfig, "heldout_tokens")] = None,
    batch_size: Annotated[int | None, opt(SteerConfig, "batch_size")] = None,
    judge_model: Annotated[str | None, opt(SteerConfig, "judge_model")] = None,
    base_url: Annotated[str | None, opt(SteerConfig, "base_url")] = None,
    max_cost: Annotated[float | None, opt(SteerConfig, "max_cost")] = None,
    params: ParamsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate with and without latent edits, side by side (with --json: one object per prompt).

    With --evaluate: measure effect against cost for features x strengths; prints the output folder last."""
    given = {k: v for k, v in locals().items() if k not in ("as_json", "params")}
    renamed = {"feature": "features", "prompt": "prompts", "eval_feature": "eval_features", "strength": "strengths"}
    overrides = {renamed.get(k, k): (v or None) if isinstance(v, list) else v for k, v in given.items()}
    from pipeline.infra.params import build_config

    cfg = build_config(SteerConfig, params_of(params), "steer", overrides)
    if cfg.evaluate:
        from pipeline.steer.evaluation import evaluate_steering

        typer.echo(evaluate_steering(cfg).url)
        return
    from pipeline.steer.stage import steer as run_steer

    for record in run_steer(cfg):
        if as_json:
            typer.echo(json.dumps(record))
        else:
            typer.echo(f"prompt:   {record['prompt']}\nunedited: {record['unedited']}\nedited:   {record['edited']}\n")


app.command()(circuit)
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


if __name__ == "__main__":
    main()
