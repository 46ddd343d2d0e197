"""One shape for a stage: the folders under cache_root are spelled in pipeline/infra/layout.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from tests.support.imports import ROOT

# The folders directly under cache_root (and the answer caches below two of them).
FOLDERS = {"activations", "saes", "finetune", "evaluate", "interpret", "steer", "circuits", "plots", ".answers"}
PATH_CALLS = {"child", "path", "joinpath", "join", "Path", "PurePath"}


def _spells_folder(node: ast.AST) -> bool:
    """A string naming one of FOLDERS, alone or as the first part of a path ("saes/x", f"circuits/{name}")."""
    if isinstance(node, ast.JoinedStr):
        return bool(node.values) and _spells_folder(node.values[0])
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in FOLDERS or node.value.split("/")[0] in FOLDERS and "/" in node.value
    return False


def spelled_paths(source: str) -> list[int]:
    """Lines of ``source`` that build a path from a cache_root folder name by hand."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in PATH_CALLS and any(_spells_folder(a) for a in node.args):
                lines.append(node.lineno)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if _spells_folder(node.left) or _spells_folder(node.right):
                lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr) and _spells_folder(node):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_cache_root_folders_are_spelled_in_layout_only() -> None:
    layout = ROOT / "pipeline" / "infra" / "layout.py"
    sources = [p for p in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")] if p != layout]
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sorted(sources) for line in spelled_paths(p.read_text())]
    assert found == [], "ask pipeline/infra/layout.py for these paths"


def test_the_scan_sees_each_way_of_spelling_a_path() -> None:
    """The check itself can fail: each way a path was spelled before layout.py existed is reported."""
    source = "\n".join(
        [
            'Folder.at(root).child("interpret", ".answers")',
            'Path(root, "finetune")',
            'Path(root) / "plots" / "fit"',
            'f"circuits/{name}"',
            'progress_bar("evaluate", 10)',  # a stage's name as a label is no path
        ]
    )
    assert spelled_paths(source) == [1, 2, 3, 4]


def test_layout_paths(tmp_path: Path) -> None:
    """The folders the README and the DVC pipeline name, written out by hand."""
    layout = Layout(str(tmp_path))
    root = str(tmp_path)
    assert layout.activations("k1").url == f"{root}/activations/k1"
    assert layout.saes().url == f"{root}/saes"
    assert layout.saes("r").url == f"{root}/saes/r"
    assert layout.finetune("r-ftkl-1").url == f"{root}/finetune/r-ftkl-1"
    assert layout.evaluate().url == f"{root}/evaluate"
    assert layout.interpret("r").url == f"{root}/interpret/r"
    assert layout.steer("r").url == f"{root}/steer/r"
    assert layout.circuits("ioi-ab").url == f"{root}/circuits/ioi-ab"
    assert layout.answers("steer").url == f"{root}/steer/.answers"
    assert layout.plots("fit").url == f"{root}/plots/fit"
    assert layout.receipt("fit") == "fit.json"
    assert str(layout.interpreted("r").features) == f"{root}/interpret/r/features.parquet"
    assert str(layout.interpreted("r").report) == f"{root}/interpret/r/report.html"
    assert layout.relative(Folder.at(tmp_path / "circuits" / "ioi-ab")) == "circuits/ioi-ab"


STAGES = ("extract", "fit", "finetune", "evaluate", "interpret", "steer", "circuit")


def stage_entry(stage: str) -> tuple[str, set[str]]:
    """The class ``pipeline/<stage>/stage.py::run`` returns, and the names that module defines as dataclasses."""
    tree = ast.parse((ROOT / "pipeline" / stage / "stage.py").read_text())
    runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert len(runs) == 1, f"pipeline/{stage}/stage.py has no run(cfg)"
    returns = ast.unparse(runs[0].returns) if runs[0].returns else ""
    dataclasses = {
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(ast.unparse(d).split("(")[0] == "dataclass" for d in n.decorator_list)
    }
    return returns, dataclasses


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_through_run_returning_its_result(stage: str) -> None:
    """pipeline/<stage>/stage.py::run(cfg) -> <Stage>Result, a dataclass naming what the stage wrote; the DVC
    stage and the CLI command call that and no other function of the stage module."""
    returns, dataclasses = stage_entry(stage)
    assert returns == f"{stage.capitalize()}Result" and returns in dataclasses
    for caller in (ROOT / "stages" / f"{stage}.py", ROOT / "pipeline" / "cli" / "stages.py"):
        called = {
            alias.name
            for node in ast.walk(ast.parse(caller.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == f"pipeline.{stage}.stage"
            for alias in node.names
        }
        assert called == {"run"}, (caller.name, called)


def test_each_stage_takes_its_runs_in_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit receipt of every kind of run, and what each stage keeps of it, with the line each skip gets."""
    from pipeline.live import runs as module
    from pipeline.sae.folder import write_cfg

    kinds = {  # name -> (arch, layers, routing)
        "topk_l1": ("topk", [1], "hard"),
        "jump_l1": ("jumprelu", [1], "hard"),  # a second run at layer 1
        "route_hard": ("route", [0, 1, 2], "hard"),
        "route_soft": ("route", [0, 1, 2], "soft"),
        "tc_l2": ("transcoder", [2], "hard"),
    }
    paths = []
    for name, (arch, layers, routing) in kinds.items():
        write_cfg(Folder.at(tmp_path / name), {"sae": {"arch": arch, "layers": layers, "routing": routing}})
        paths.append(str(tmp_path / name))
    said: list[str] = []
    monkeypatch.setattr(module, "say", said.append)
    kept = {stage: [Path(p).name for p in module.taken(stage, paths)] for stage in module.TAKES}
    assert kept["evaluate"] == kept["interpret"] == list(kinds)
    assert kept["steer"] == ["topk_l1", "jump_l1", "route_hard", "tc_l2"]
    assert kept["circuit"] == ["topk_l1", "tc_l2"]  # a transcoder's latents sit at its one layer
    assert kept["finetune"] == ["topk_l1", "jump_l1", "tc_l2"]
    p = {name: str(tmp_path / name) for name in kinds}
    assert said == [
        f"steer: skipping soft-routed run {p['route_soft']} (its code has no single layer to edit)",
        f"circuit: skipping {p['jump_l1']}: layer 1 already has {p['topk_l1']}",
        f"circuit: skipping route run {p['route_hard']} (circuits are found over single-layer runs)",
        f"circuit: skipping route run {p['route_soft']} (circuits are found over single-layer runs)",
        f"finetune: skipping route run {p['route_hard']} (finetune takes single-layer SAEs and transcoders)",
        f"finetune: skipping route run {p['route_soft']} (finetune takes single-layer SAEs and transcoders)",
    ]
