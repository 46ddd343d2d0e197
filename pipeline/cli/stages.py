"""The stage commands (extract, fit, finetune, evaluate, interpret, steer, circuit): each option is generated from the
stage's config (pipeline/cli/options.py); a body here only builds the config and prints what a script wants."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.circuit.config import CircuitConfig
from pipeline.cli.options import Configured, Form, Given, JsonOpt, commas, configured
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.finetune.config import FinetuneConfig
from pipeline.fit.config import FitConfig
from pipeline.infra.console import console
from pipeline.interpret.config import InterpretConfig
from pipeline.steer.config import SteerConfig


def _sweep(items: list[str], flag: str) -> dict[str, list[str]]:
    """--sweep k=32,64 --sweep lr=1e-3 as FitConfig.sweep's mapping (fit types the values)."""
    from pipeline.fit.plan import parse_sweep

    return parse_sweep(items)


# --all FOLDER: every finished run in it. Not a setting: it adds to the runs the command is given.
EvaluateAll = Annotated[
    str | None,
    typer.Option("--all", help="Evaluate every finished run in this folder and write a comparison table and plots."),
]
InterpretAll = Annotated[
    str | None, typer.Option("--all", help="Interpret every finished run in this folder and write a comparison page.")
]


def with_all(runs: list[str], all_in: str | None) -> list[str]:
    """The runs given, then with --all DIR every finished run in DIR (the one place --all is decided)."""
    from pipeline.live.runs import finished_runs

    return runs + (finished_runs(all_in) if all_in else [])


# steer's repeatable options are singular (one edit, prompt, latent or strength per use); their fields are lists.
SINGULAR = {"features": "feature", "prompts": "prompt", "eval_features": "eval_feature", "strengths": "strength"}


@configured(Configured(ExtractConfig, "extract", shared=("model", "data")))
def extract(given: Given[ExtractConfig]) -> None:
    """Run the LLM once and cache normalized hidden states; prints the cache folder last."""
    from pipeline.extract.stage import run
    from pipeline.infra.distributed import Ranks

    ranks = Ranks.from_env()
    result = run(given.config(), ranks)
    if ranks.is_main:  # under torchrun, one line from rank 0
        typer.echo(result.folder.url)


@configured(Configured(FitConfig, "fit", forms={"sweep": Form(list[str] | None, _sweep)}))
def fit(given: Given[FitConfig]) -> None:
    """Train SAEs of any trainable architecture on a cache (a sweep from one read); prints one run folder per line."""
    from pipeline.fit.stage import run
    from pipeline.infra.distributed import Ranks

    ranks = Ranks.from_env()
    result = run(given.config(), ranks)
    if ranks.is_main:
        for folder in result.runs:
            typer.echo(folder.url)


@configured(Configured(FinetuneConfig, "finetune", arguments=("run",), required=("run",)))
def finetune(given: Given[FinetuneConfig]) -> None:
    """Train a run further with its SAE spliced into the LLM, on the model's KL (or CE) on the cache's training
    sequences, into a new run folder (the parent is never written); prints the new run folder."""
    from pipeline.finetune.stage import run

    typer.echo(run(given.config()).folder.url)


@configured(
    Configured(
        EvaluateConfig,
        "evaluate",
        arguments=("runs",),
        forms={"metrics": commas(), "suite": commas(empty=[])},
        extras={"all_in": (EvaluateAll, None), "as_json": (JsonOpt, False)},
    )
)
def evaluate(given: Given[EvaluateConfig]) -> None:
    """Reconstruction metrics on held-out tokens, and KL / CE with the SAE spliced into the LLM."""
    from pipeline.evaluate.compare import one_line
    from pipeline.evaluate.stage import run

    all_in = given.extras["all_in"]
    result = run(given.config(runs=with_all(given.overrides["runs"] or [], all_in)), compare=bool(all_in))
    for path in result.comparison:
        console.print(f"wrote {path}")
    if given.extras["as_json"]:
        typer.echo(json.dumps(result.metrics[0] if len(result.metrics) == 1 else result.metrics))
    else:
        typer.echo("\n".join(map(one_line, result.metrics)))


@configured(
    Configured(
        InterpretConfig,
        "interpret",
        arguments=("run",),
        forms={"score": commas(empty=[])},  # --score "" turns the scorers of params.yaml off
        extras={"all_in": (InterpretAll, None)},
    )
)
def interpret(given: Given[InterpretConfig]) -> None:
    """Feature tables (parquet), GPT-4o explanations, their scores on held-out examples and an HTML report;
    prints the output folder (with --all, the comparison page)."""
    from pipeline.interpret.stage import run

    cfg, all_in, given_run = given.config(), given.extras["all_in"], given.overrides["run"]
    if all_in:
        typer.echo(run(cfg, with_all([given_run] if given_run else [], all_in)).comparison)
    else:
        typer.echo(run(cfg).folders[0].url)


@configured(
    Configured(
        SteerConfig,
        "steer",
        arguments=("run",),
        required=("run",),
        names=SINGULAR,
        extras={"as_json": (JsonOpt, False)},
    )
)
def steer(given: Given[SteerConfig]) -> None:
    """Generate with and without latent edits, side by side (with --json: one object per prompt).

    With --evaluate: measure effect against cost for features x strengths; prints the output folder last."""
    from pipeline.steer.stage import run

    result = run(given.config())
    if result.folder is not None:  # --evaluate
        typer.echo(result.folder.url)
        return
    for record in result.records:
        if given.extras["as_json"]:
            typer.echo(json.dumps(record))
        else:
            typer.echo(f"prompt:   {record['prompt']}\nunedited: {record['unedited']}\nedited:   {record['edited']}\n")


@configured(
    Configured(
        CircuitConfig,
        "circuit",
        arguments=("runs",),
        forms={"method": commas(), "lambdas": commas(float), **{n: commas(int) for n in ("sizes", "layers", "seeds")}},
    )
)
def circuit(given: Given[CircuitConfig]) -> None:
    """Find the SAE latents a task needs (learned masks, integrated gradients, attribution patching), choose a
    circuit on validation pairs and measure every circuit on held-out test pairs; prints the output folder last."""
    from pipeline.circuit.stage import run

    typer.echo(run(given.config()).folder.url)
