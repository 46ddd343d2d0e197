"""dvc.yaml stays honest: each stage depends on exactly the code it imports and on every parameter it reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.evaluate import EvaluateConfig
from pipeline.extract import ExtractConfig
from pipeline.fit import FitConfig
from pipeline.interpret import InterpretConfig
from pipeline.params import build_config, load_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_files(module: str) -> set[str]:
    """Project files a module imports, transitively (module level and inside functions)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "stages")]
    return {name.replace(".", "/") + ".py" for name in seen if name != "pipeline"}


@pytest.mark.parametrize("stage", ["extract", "fit", "evaluate", "interpret"])
def test_code_deps_are_exactly_the_imports(stage: str) -> None:
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert declared == imported_files(f"stages.{stage}")
    assert STAGES[stage]["cmd"] == f"python -m stages.{stage}"


def test_explainer_edits_never_rerun_extraction() -> None:
    assert "pipeline/explain.py" not in STAGES["extract"]["deps"]
    assert "pipeline/explain.py" in STAGES["interpret"]["deps"]


def test_params_are_tracked_and_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    tracked = set(STAGES["extract"]["params"])
    assert {f"model.{k}" for k in params["model"]} | {f"data.{k}" for k in params["data"]} | {"extract"} == tracked
    for stage in ("fit", "evaluate", "interpret"):
        assert STAGES[stage]["params"] == [stage]
    build_config(ExtractConfig, params, "extract", {}, shared=("model", "data"))  # unknown keys would raise
    for cls, stage in ((FitConfig, "fit"), (EvaluateConfig, "evaluate"), (InterpretConfig, "interpret")):
        build_config(cls, params, stage, {})
