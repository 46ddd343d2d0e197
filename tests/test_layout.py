"""The architecture stays visible: imports only point down the layers, and pipeline/ keeps its shape."""

from __future__ import annotations

import ast

from tests.support.imports import ROOT, imports_of, package_of

# package -> the packages it may import (besides itself). The order of layers:
# infra < llm < cache < sae < live, interop < one package per stage < cli; stages/ sits on top of everything.
LOWER = {
    "infra": set(),
    "llm": {"infra"},
    "cache": {"infra", "llm"},
    "sae": {"infra", "llm", "cache"},
    "live": {"infra", "llm", "cache", "sae"},  # an SAE inside the running LLM
    "interop": {"infra", "llm", "cache", "sae"},  # SAELens / sparsify formats
}
STAGE_BASE = {"infra", "llm", "cache", "sae", "live", "interop"}
ALLOWED = {
    **LOWER,
    "extract": STAGE_BASE,
    "fit": STAGE_BASE,
    "finetune": STAGE_BASE,
    "evaluate": STAGE_BASE,
    "interpret": STAGE_BASE,
    "steer": STAGE_BASE,
    "circuit": STAGE_BASE,
    "cli": {
        *STAGE_BASE,
        "extract",
        "fit",
        "finetune",
        "evaluate",
        "interpret",
        "steer",
        "circuit",
    },  # the top: may import all
}


def upward_imports() -> list[str]:
    """Every import in pipeline/ that ALLOWED does not permit, as 'file -> module'."""
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = package_of(module)
        for target in imports_of(path):
            there = package_of(target)
            if target.startswith("stages") or (here in ALLOWED and there != here and there not in ALLOWED[here]):
                bad.append(f"{path.relative_to(ROOT)} -> {target}")
    return bad


def test_imports_point_down() -> None:
    assert upward_imports() == []


def test_an_upward_import_is_caught(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The check itself can fail: a cache module importing a stage is reported."""
    original = ROOT / "pipeline" / "cache" / "manifest.py"
    source = original.read_text() + "\nfrom pipeline.fit.plan import FitConfig\n"
    real_read = type(original).read_text
    monkeypatch.setattr(type(original), "read_text", lambda p, *a, **k: source if p == original else real_read(p))
    assert upward_imports() == ["pipeline/cache/manifest.py -> pipeline.fit.plan"]


def test_every_package_is_placed() -> None:
    """A new sub-package gets a place in the layers before it gets code."""
    packages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


def test_shape() -> None:
    """At most five modules at the top; no module over ~300 lines; no function over ~60 lines."""
    top = [p.name for p in (ROOT / "pipeline").glob("*.py")]
    assert len(top) <= 5, top
    long_modules, long_functions = [], []
    for path in (ROOT / "pipeline").rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 320:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 65:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert long_modules == []
    assert long_functions == []
