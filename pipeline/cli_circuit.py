"""The `sae-pipe circuit` command: the few SAE latents a task needs, over SAEs at several layers."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.circuit.config import CircuitConfig
from pipeline.cli_cache import ParamsOpt, opt, params_of
from pipeline.infra.errors import UserError
from pipeline.infra.params import doc


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    """A comma-separated option as a list of numbers (None when not given)."""
    if not text:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r} must be comma-separated {kind.__name__}s, e.g. 0.001,0.01.") from None


def circuit(
    runs: Annotated[list[str] | None, typer.Argument(help=doc(CircuitConfig, "runs"))] = None,
    task: Annotated[str | None, opt(CircuitConfig, "task")] = None,
    method: Annotated[str | None, opt(CircuitConfig, "method")] = None,
    lambdas: Annotated[str | None, opt(CircuitConfig, "lambdas")] = None,
    sizes: Annotated[str | None, opt(CircuitConfig, "sizes")] = None,
    layers: Annotated[str | None, opt(CircuitConfig, "layers")] = None,
    pairs: Annotated[int | None, opt(CircuitConfig, "pairs")] = None,
    val_share: Annotated[float | None, opt(CircuitConfig, "val_share")] = None,
    test_share: Annotated[float | None, opt(CircuitConfig, "test_share")] = None,
    min_gap: Annotated[float | None, opt(CircuitConfig, "min_gap")] = None,
    seed: Annotated[int | None, opt(CircuitConfig, "seed")] = None,
    seeds: Annotated[str | None, opt(CircuitConfig, "seeds")] = None,
    ablation: Annotated[str | None, opt(CircuitConfig, "ablation")] = None,
    steps: Annotated[int | None, opt(CircuitConfig, "steps")] = None,
    lr: Annotated[float | None, opt(CircuitConfig, "lr")] = None,
    t_max: Annotated[float | None, opt(CircuitConfig, "t_max")] = None,
    ig_steps: Annotated[int | None, opt(CircuitConfig, "ig_steps")] = None,
    batch_size: Annotated[int | None, opt(CircuitConfig, "batch_size")] = None,
    device: Annotated[str | None, opt(CircuitConfig, "device")] = None,
    cache_root: Annotated[str | None, opt(CircuitConfig, "cache_root")] = None,
    out: Annotated[str | None, opt(CircuitConfig, "out")] = None,
    params: ParamsOpt = None,
) -> None:
    """Find the SAE latents a task needs (learned masks, integrated gradients, attribution patching), choose a
    circuit on validation pairs and measure every circuit on held-out test pairs; prints the output folder last."""
    overrides = {k: v for k, v in locals().items() if k != "params"}
    from pipeline.circuit.stage import circuit as run_circuit
    from pipeline.infra.params import build_config

    overrides.update(
        runs=runs or None,
        method=[m for m in method.split(",") if m] if method else None,
        lambdas=_numbers(lambdas, float, "--lambdas"),
        sizes=_numbers(sizes, int, "--sizes"),
        layers=_numbers(layers, int, "--layers"),
        seeds=_numbers(seeds, int, "--seeds"),
    )
    cfg = build_config(CircuitConfig, params_of(params), "circuit", overrides)
    typer.echo(run_circuit(cfg).url)
