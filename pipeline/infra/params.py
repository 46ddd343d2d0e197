"""params.yaml: one section per stage plus ``model`` and ``data``, mapped onto config dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.infra.errors import UserError

T = TypeVar("T")

# params.yaml key -> config field, for the shared sections
MODEL_KEYS = {
    "name": "model",
    "revision": "revision",
    "trust_remote_code": "trust_remote_code",
}
DATA_KEYS = {"dataset": "dataset", "split": "split", "text_column": "text_column", "config": "dataset_config"}
# Keys an older params.yaml may still have: (section, key) -> where the setting lives now
MOVED = {
    ("interpret", "model"): "interpret.explainer_model (the explainer's chat model; `model` is the LLM studied)",
    # only extract read them: every other stage picks its own device (--device) and precision
    ("model", "device"): "extract.device",
    ("model", "dtype"): "extract.compute_dtype",
}


def setting(default: Any = dataclasses.MISSING, doc: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its one-line doc: the one place it is written, read by the CLI's --help and
    checked against the comment beside the key in params.yaml (tests/test_params.py)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def doc(cls: type, name: str) -> str:
    """The doc of field ``name`` of config dataclass ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return str(fields[name].metadata["doc"])


def load_params(path: str | Path) -> dict[str, Any]:
    """The whole params file as a dict, with a clear message when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"params file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    except yaml.YAMLError as err:  # its message spans lines (a snippet with a caret): one line here
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "cannot be parsed"
        raise UserError(f"params file {path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(data, dict):
        raise UserError(f"params file {path} must hold sections (model, data, extract, fit, ...).")
    return data


def section_values(
    params: dict[str, Any], section: str, keys: dict[str, str] | None, fields: set[str]
) -> dict[str, Any]:
    """Values of one section renamed to config fields; unknown keys are errors (typos)."""
    values = params.get(section) or {}
    if not isinstance(values, dict):
        raise UserError(f"params section [{section}] must be a mapping of keys to values.")
    known = keys if keys is not None else {f: f for f in fields}
    unknown = sorted(set(values) - set(known))
    moved = [f"{section}.{key} is now {MOVED[section, key]}" for key in unknown if (section, key) in MOVED]
    if moved:
        raise UserError(f"params.yaml has a key that moved: {'; '.join(moved)}. Move it there.")
    if unknown:
        raise UserError(
            f"params section [{section}] has unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}."
        )
    return {known[k]: v for k, v in values.items() if known[k] in fields}


def build_config(
    cls: type[T], params: dict[str, Any] | None, stage: str, overrides: dict[str, Any], shared: tuple[str, ...] = ()
) -> T:
    """Dataclass defaults < params.yaml (shared sections, then the stage's) < command-line options."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, tuple[Any, str]] = {}  # field -> (value, where it came from)
    if params is not None:
        mapping = {"model": MODEL_KEYS, "data": DATA_KEYS}
        for section in shared:
            values.update(
                {k: (v, section) for k, v in section_values(params, section, mapping[section], fields).items()}
            )
        values.update({k: (v, stage) for k, v in section_values(params, stage, None, fields).items()})
    values.update({k: (v, "command line") for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    return cls(**{name: coerce(value, hints[name], f"{name} ({where})") for name, (value, where) in values.items()})


def coerce(value: Any, hint: Any, what: str) -> Any:
    """``value`` as the type the config field declares (YAML reads ``4e-3`` as a string, ``12`` as an int)."""
    options = [h for h in typing.get_args(hint) if h is not type(None)] if type(hint) is types.UnionType else [hint]
    if value is None and len(options) < len(typing.get_args(hint) or [hint]):
        return None
    target = options[0]
    origin = typing.get_origin(target) or target
    try:
        if target is bool:  # a --sweep value arrives as text: "true" / "false"
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if target in (int, float):
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError
            if target is int and number != int(number):
                raise ValueError
            return target(number)
        if target is str:
            return str(value)
        if origin is tuple:
            return tuple(float(v) for v in value)
        if not isinstance(value, origin):
            raise ValueError
        return value
    except (TypeError, ValueError):
        name = getattr(target, "__name__", str(target))
        raise UserError(f"{what}: {value!r} is not a valid {name}.") from None
