"""A command's options, generated from its config dataclass: one option per field, named after it
(``--field-name``), typed after it, with the field's `setting()` doc as its help and no default of its own
(None = not given, so params.yaml and then the dataclass default apply through `build_config`).

A setting is therefore declared once, in its config; a field added there is an option the same day.
What a command spells differently is declared here, at its command, and nowhere else:

- ``arguments``: fields given positionally (a run folder), optionally required;
- ``names``: a field whose option is named otherwise (steer's repeatable singular --feature, one edit per
  use, fills the plural list field ``features``);
- ``forms``: a field whose option has another type than the field (a comma-separated list, --sweep's
  key=v1,v2 items);
- ``extras``: parameters that are not settings (--json, --all);
- ``PARAMS_ONLY``: fields kept off the command line, set in params.yaml.
Every configured command also takes ``--params`` (the file its defaults come from).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

import typer

from pipeline.infra.errors import UserError
from pipeline.infra.params import build_config, doc, load_params

C = TypeVar("C")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (its last line).")]
ParamsOpt = Annotated[
    str | None,
    typer.Option("--params", help="Read defaults from this params.yaml (options given on the command line win)."),
]

# Fields without an option, per params.yaml section: knobs a run rarely turns, set in params.yaml (or left at
# their default). Giving one an option is deleting it here; the option walk (tests/test_option_walk.py) then
# feeds it hostile values, so its config must refuse bad ones with a UserError first.
PARAMS_ONLY: dict[str, tuple[str, ...]] = {
    "extract": ("dataset_config",),
    "fit": ("betas", "log_every", "checkpoint_every", "pool_mb", "verify"),
    "finetune": ("enabled",),
    "interpret": (
        *("quantile_bins", "per_bin", "random_examples", "after", "min_count", "report_features"),
        *("logprobs", "max_retries", "logit_effects", "threshold"),
    ),
}


def _bare(hint: Any) -> Any:
    """``int | None`` -> ``int``; any other type stays."""
    if isinstance(hint, types.UnionType):
        (kind,) = [h for h in typing.get_args(hint) if h is not type(None)]
        return kind
    return hint


@dataclass(frozen=True)
class Form:
    """How a field is spelled on the command line when the option's type is not the field's."""

    annotation: Any  # the option's type, as Typer reads it
    read: Callable[[Any, str], Any]  # (the option's value, its flag) -> the field's value


def _split(text: str, flag: str, *, kind: type, empty: list | None) -> list | None:
    if not text:
        return empty
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated {kind.__name__}s, e.g. 0.001,0.01.") from None


def commas(kind: type = str, empty: list | None = None) -> Form:
    """A list field given as one comma-separated option (``--lambdas 0.001,0.01``); an empty one means
    ``empty`` (None: the default)."""
    return Form(str | None, functools.partial(_split, kind=kind, empty=empty))


@dataclass(frozen=True)
class Given(Generic[C]):
    """What one command line gave: field values (None = not given), the extras, the --params file."""

    spec: Configured[C]
    overrides: dict[str, Any]
    extras: dict[str, Any]
    params: str | None

    def config(self, **more: Any) -> C:
        """The command's config: dataclass defaults < params.yaml < these options (and ``more``)."""
        loaded = load_params(self.params) if self.params else None
        return build_config(self.spec.cls, loaded, self.spec.section, {**self.overrides, **more}, self.spec.shared)


@dataclass(frozen=True)
class Configured(Generic[C]):
    """The options of a command that runs config ``cls`` (params.yaml section ``section``)."""

    cls: type[C]
    section: str
    shared: tuple[str, ...] = ()  # params.yaml sections read before the command's own (model, data)
    arguments: tuple[str, ...] = ()  # fields given positionally, in this order
    required: tuple[str, ...] = ()  # arguments the command cannot run without
    names: dict[str, str] = field(default_factory=dict)  # field -> parameter name, where they differ
    forms: dict[str, Form] = field(default_factory=dict)
    extras: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (Annotated type, default)

    def fields(self) -> list[str]:
        """The fields with a parameter: arguments first, then options in the config's order."""
        skipped = set(PARAMS_ONLY.get(self.section, ())) | set(self.arguments)
        names = [f.name for f in dataclasses.fields(self.cls)]  # type: ignore[arg-type]
        return [*self.arguments, *(n for n in names if n not in skipped)]

    def flag(self, name: str) -> str:
        """How field ``name`` is spelled on the command line."""
        return f"--{self.names.get(name, name).replace('_', '-')}"

    def parameter(self, name: str, hint: Any) -> inspect.Parameter:
        """The parameter of field ``name`` (of type ``hint``) in the generated signature: ``X | None``,
        default None; a required argument has neither."""
        kind = self.forms[name].annotation if name in self.forms else _bare(hint) | None
        default: Any = None
        if name in self.required:
            kind, default, info = _bare(kind), inspect.Parameter.empty, typer.Argument(help=doc(self.cls, name))
        elif name in self.arguments:
            info = typer.Argument(help=doc(self.cls, name))
        else:
            info = typer.Option(self.flag(name), help=doc(self.cls, name))
        keyword = inspect.Parameter.KEYWORD_ONLY  # any order: a required argument may follow defaults
        return inspect.Parameter(self.names.get(name, name), keyword, default=default, annotation=Annotated[kind, info])

    def signature(self) -> inspect.Signature:
        hints = typing.get_type_hints(self.cls)
        params = [self.parameter(name, hints[name]) for name in self.fields()]
        params += [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
            for n, (a, d) in {**self.extras, "params": (ParamsOpt, None)}.items()
        ]
        return inspect.Signature(params, return_annotation=None)

    def given(self, values: dict[str, Any]) -> Given[C]:
        """The command line's values by field (an empty repeatable option is not given)."""
        overrides = {}
        for name in self.fields():
            value = values[self.names.get(name, name)]
            value = None if isinstance(value, (list, tuple)) and not value else value
            if value is not None and name in self.forms:
                value = self.forms[name].read(value, self.flag(name))
            overrides[name] = value
        extras = {name: values[name] for name in self.extras}
        return Given(self, overrides, extras, values["params"])


def configured(spec: Configured[C]) -> Callable[[Callable[[Given[C]], None]], Callable[..., None]]:
    """Decorator: a command whose options are those of ``spec``; its body receives the `Given` values."""

    def wrap(body: Callable[[Given[C]], None]) -> Callable[..., None]:
        def command(**values: Any) -> None:
            body(spec.given(values))

        command.__name__, command.__doc__ = body.__name__, body.__doc__
        command.__signature__ = spec.signature()  # type: ignore[attr-defined]
        command.configured = spec  # type: ignore[attr-defined]
        return command

    return wrap
