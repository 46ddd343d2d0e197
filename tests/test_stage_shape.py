"""One shape for a stage: the folders under cache_root are spelled in pipeline/infra/layout.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

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
