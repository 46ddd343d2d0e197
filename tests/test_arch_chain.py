"""Every trainable residual architecture through the whole chain from one cache: a sweep over `arch` trains them
from one read, then `evaluate --all`, `interpret`, `steer`, `circuit` and `export --format saelens` take each run
through the CLI with no architecture named anywhere but the sweep (issue 30's "every later stage takes every
architecture"); a skip transcoder, trained on a cache of the MLP's sites, through the same stages (issue 31)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.sae.interface import REGISTRY, trainable_archs
from tests.support.caches import tiny_extract_args

SAELENS_ARCHS = ("topk", "jumprelu", "standard", "gated")  # sparsify's cfg.json names none: topk
ARCHS = [a for a in trainable_archs() if REGISTRY[a].sites == ("resid",) and not REGISTRY[a].multi_layer]


def cli(*args: str) -> list[str]:
    """Run ``sae-pipe args``; the lines it printed (it must succeed)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def sweep(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("chain")
    argv = tiny_extract_args(tiny_llama, root)
    cache = cli(*argv[: argv.index("--max-tokens")], "--max-tokens", "1200")[-1]
    runs = cli(
        *("fit", "--cache", cache, "--layer", "1", "--latents", "64", "--k", "4", "--batch-size", "128"),
        *("--epochs", "2", "--device", "cpu", "--cache-root", str(root), "--sweep", f"arch={','.join(ARCHS)}"),
    )
    return root, runs


@pytest.fixture(scope="module")
def transcoder(sweep: tuple[Path, list[str]], tiny_llama: Path) -> str:
    """A skip transcoder of layer 1, from a cache of the same model with its MLP's input and output."""
    root, _ = sweep
    argv = tiny_extract_args(tiny_llama, root)
    cache = cli(*argv[: argv.index("--max-tokens")], "--max-tokens", "1200", "--sites", "resid,mlp_in,mlp_out")[-1]
    (run,) = cli(
        *("fit", "--cache", cache, "--layer", "1", "--latents", "64", "--k", "4", "--batch-size", "128"),
        *("--epochs", "2", "--device", "cpu", "--cache-root", str(root), "--arch", "transcoder", "--skip"),
    )
    return run


def test_the_sweep_trains_every_architecture_from_one_read(sweep: tuple[Path, list[str]]) -> None:
    _, runs = sweep
    archs = [json.loads((Path(run) / "cfg.json").read_text())["sae"]["arch"] for run in runs]
    assert sorted(archs) == sorted(ARCHS) and len(ARCHS) >= 6


def test_evaluate_all_takes_every_run(sweep: tuple[Path, list[str]]) -> None:
    root, runs = sweep
    cli("evaluate", "--all", str(root / "saes"), "--max-tokens", "64", "--device", "cpu", "--cache-root", str(root))
    for run in runs:
        metrics = json.loads((root / "evaluate" / Path(run).name / "metrics.json").read_text())
        assert 0 < metrics["fvu"] < 2 and metrics["kl_per_token"] >= 0, (run, metrics)


@pytest.mark.parametrize("arch", [*ARCHS, "transcoder"])
def test_interpret_steer_circuit_and_export_take_it(
    arch: str, sweep: tuple[Path, list[str]], request: pytest.FixtureRequest
) -> None:
    root, runs = sweep
    named = [r for r in runs if json.loads((Path(r) / "cfg.json").read_text())["sae"]["arch"] == arch]
    (run,) = named or [request.getfixturevalue("transcoder")]
    common = ("--device", "cpu", "--cache-root", str(root))
    cli("interpret", run, "--explainer", "none", "--max-tokens", "128", "--features", "4", *common)
    cli("steer", run, "--feature", "3=add:10", "--prompt", "The function", "--max-new-tokens", "2", *common)
    circuit = ("--task", "sva", "--pairs", "16", "--method", "mask", "--steps", "2", "--sizes", "1", "--min-gap", "0")
    cli("circuit", run, *circuit, "--lambdas", "0.01", *common)
    out = root / "exports" / arch
    fmt = "sparsify" if arch == "transcoder" else "saelens"  # SAELens has no TopK skip transcoder
    written = Path(cli("export", run, "--format", fmt, "--out", str(out))[-1])
    assert json.loads((written / "cfg.json").read_text()).get("architecture", "topk") in SAELENS_ARCHS
