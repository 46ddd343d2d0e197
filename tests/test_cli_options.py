"""One declaration per setting: a stage command's options are exactly its config's fields, named, typed and
documented after them (pipeline/cli/options.py generates them), and every params.yaml key is a field.

Not compared: the options that are not settings (NOT_SETTINGS) and the fields kept to params.yaml
(options.PARAMS_ONLY). `export`, `import` and `cache ...` have no config and declare their few options by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
import yaml

from pipeline.cli import app
from pipeline.cli.options import PARAMS_ONLY, Configured, Given, configured
from pipeline.fit.config import FitConfig
from pipeline.infra.params import DATA_KEYS, MODEL_KEYS, doc, setting

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"extract", "fit", "finetune", "evaluate", "interpret", "steer", "circuit"}
# Options that are not settings: --params (the file the settings come from), --json (the form of the output),
# --all (a folder whose runs are added to the run list).
NOT_SETTINGS = {"params", "as_json", "all_in"}


def stage_commands() -> dict[str, tuple[Configured, Any]]:
    """Command name -> (its spec, the click command Typer built from it)."""
    root = typer.main.get_command(app)
    found = {}
    for info in app.registered_commands:
        spec = getattr(info.callback, "configured", None)
        if spec is not None:
            name = info.name or info.callback.__name__  # type: ignore[union-attr]
            found[name] = (spec, root.commands[name])  # type: ignore[attr-defined]
    return found


def mismatch(spec: Configured, command: Any, params: dict[str, Any]) -> dict[str, set[str]]:
    """What is declared on one side only (empty sets when the command and the config agree)."""
    fields = {f.name for f in dataclasses.fields(spec.cls)}
    field_of = {spec.names.get(f, f): f for f in fields}  # parameter -> field (steer's singular options)
    offered = {field_of.get(p.name, p.name) for p in command.params} - NOT_SETTINGS
    kept = set(PARAMS_ONLY.get(spec.section, ()))
    shared = {"model": MODEL_KEYS, "data": DATA_KEYS}
    keys = {shared[s].get(k, f"{s}.{k}") for s in spec.shared for k in params.get(s) or {}}
    return {
        "field without option": fields - offered - kept,
        "option without field": offered - fields,
        "params.yaml key without field": (keys | set(params.get(spec.section) or {})) - fields,
        "kept field with an option, or no field": kept & offered | kept - fields,
    }


def test_every_stage_command_is_generated() -> None:
    assert set(stage_commands()) == STAGES


def test_options_are_the_fields() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, (spec, command) in stage_commands().items():
        assert not any(mismatch(spec, command, params).values()), (name, mismatch(spec, command, params))


def test_options_are_named_typed_and_documented_by_their_field() -> None:
    """--field-name (or the spec's rename), the field's type (or its form's) as X | None, the field's doc."""
    for name, (spec, command) in stage_commands().items():
        hints = typing.get_type_hints(spec.cls)
        by_param = {p.name: p for p in command.params}
        for field in spec.fields():
            param = by_param[spec.names.get(field, field)]
            assert param.help == doc(spec.cls, field), (name, field)
            if field not in spec.arguments:
                assert param.opts == [f"--{spec.names.get(field, field).replace('_', '-')}"], (name, field)
                assert param.default is None, (name, field)
            declared = spec.forms[field].annotation if field in spec.forms else hints[field]
            assert param.type_descriptor.annotation == without_none(declared), (name, field)


def without_none(hint: Any) -> Any:
    """``int | None`` -> ``int``; ``list[str]`` stays."""
    if isinstance(hint, types.UnionType):
        (kind,) = [k for k in typing.get_args(hint) if k is not type(None)]
        return kind
    return hint


# The check itself can fail: each side gains something the other lacks.


def _fit() -> tuple[Configured, Any]:
    return stage_commands()["fit"]


def test_a_field_without_option_is_caught() -> None:
    spec, command = _fit()
    grown = dataclasses.make_dataclass("Grown", [("knob", int, setting(0, "a new knob"))], bases=(FitConfig,))
    found = mismatch(dataclasses.replace(spec, cls=grown), command, {})
    assert found["field without option"] == {"knob"}


def test_an_option_without_field_is_caught() -> None:
    spec, _ = _fit()
    verbose = (Annotated[bool, typer.Option("--verbose", help="talk more")], False)
    extra = dataclasses.replace(spec, extras={**spec.extras, "verbose": verbose})
    probe = typer.Typer(add_completion=False)

    @probe.command()
    @configured(extra)
    def fit(given: Given[FitConfig]) -> None:
        """A fit command with one option too many."""

    command = typer.main.get_command(probe)  # the app's only command
    assert mismatch(extra, command, {})["option without field"] == {"verbose"}


def test_a_params_key_without_field_is_caught() -> None:
    spec, command = _fit()
    assert mismatch(spec, command, {"fit": {"lr": 1e-3, "learning_rate": 1e-3}})["params.yaml key without field"] == {
        "learning_rate"
    }
    spec, command = stage_commands()["extract"]
    assert mismatch(spec, command, {"model": {"name": "x", "revision": "main", "colour": 1}})[
        "params.yaml key without field"
    ] == {"model.colour"}
