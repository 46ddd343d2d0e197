"""dvc.yaml stays honest: each stage depends on exactly the code it imports and on every parameter it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.circuit.config import CircuitConfig
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.finetune.config import FinetuneConfig
from pipeline.fit.config import FitConfig
from pipeline.infra.params import build_config, load_params
from pipeline.interpret.config import InterpretConfig
from pipeline.steer.config import SteerConfig
from tests.support.imports import package_of, reachable

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_code(stage: str) -> set[str]:
    """The stage module and the pipeline/ packages it reaches through its imports, as dvc paths."""
    packages = {package_of(m) for m in reachable(f"stages.{stage}") if m.startswith("pipeline.")}
    return {f"stages/{stage}.py"} | {f"pipeline/{p}" for p in packages if p != "pipeline"}


@pytest.mark.parametrize("stage", ["extract", "fit", "finetune", "evaluate", "interpret", "steer", "circuit"])
def test_code_deps_are_exactly_the_imports(stage: str) -> None:
    declared = {d for d in STAGES[stage]["deps"] if d.startswith(("pipeline", "stages"))}
    assert declared == imported_code(stage)
    assert STAGES[stage]["cmd"] == f"python -m stages.{stage}"


def test_explainer_edits_never_rerun_extraction() -> None:
    assert "pipeline/interpret" not in STAGES["extract"]["deps"]
    assert "pipeline/interpret" in STAGES["interpret"]["deps"]
    assert "pipeline.interpret.explain" in reachable("stages.interpret")


def test_params_are_tracked_and_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    tracked = set(STAGES["extract"]["params"])
    assert {f"model.{k}" for k in params["model"]} | {f"data.{k}" for k in params["data"]} | {"extract"} == tracked
    for stage in ("fit", "finetune", "evaluate", "interpret", "steer", "circuit"):
        assert STAGES[stage]["params"] == [stage]
    build_config(ExtractConfig, params, "extract", {}, shared=("model", "data"))  # unknown keys would raise
    configs = [
        (FitConfig, "fit"),
        (FinetuneConfig, "finetune"),
        (EvaluateConfig, "evaluate"),
        (InterpretConfig, "interpret"),
        (SteerConfig, "steer"),
        (CircuitConfig, "circuit"),
    ]
    for cls, stage in configs:
        build_config(cls, params, stage, {})
