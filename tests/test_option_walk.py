"""Every option of every command, fed hostile values: it ends in exit 0 with a valid result, or in one
`error:` line (exit 2, or 3 / 4 for an incomplete / corrupt input) with no traceback and no result left.

The options are read from the Typer app itself, so an option is walked the day it is added. Floats get
NaN, inf, -inf, a negative, zero and a huge value, integers the same less inf and -inf (the parser refuses
them as it refuses NaN); text gets an empty string and an unknown name; an option whose help names a file,
folder, path, root or URL also gets a missing, an empty, a non-UTF-8 and a malformed file. The other
options stay at cheap valid values (a tiny random Llama, a 1200-row cache, a 128-latent run, a 40-line corpus),
and a case that is still working after a few seconds has taken its value as a real job: it is stopped there,
like a killed run, and whatever result it left must read back whole.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import typer.main

from pipeline.cli import app, main
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from tests.support.foreign import write_saelens
from tests.support.standin_openai import Script, rule_model, standin_server

NUMBERS = ("nan", "inf", "-inf", "-1", "0", str(10**18))  # 10**18 also reads as a float: 1e18
# An integer option refuses nan, inf and -inf alike, while parsing, before our code sees them: one class,
# walked as nan (test_integer_options_refuse_every_non_number_while_parsing checks the other two).
INTEGERS = ("nan", "-1", "0", str(10**18))
TEXTS = ("", "no-such-name")
FILES = ("{case}/missing", "{hostile}/empty", "{hostile}/latin1", "{hostile}/malformed")
FILE_WORDS = re.compile(r"\b(file|folder|path|url|root|params\.yaml|parquet|jsonl)\b", re.IGNORECASE)
RESULTS = (".json", ".parquet", ".csv", ".html", ".safetensors", ".npy", ".png", ".yaml")
SECONDS = 15.0  # a case still working after this has accepted its value as a real job (a valid one: < 5 s)

# Cheap valid values per command (parameter name -> value; "" for a flag that is on). A case sets one
# parameter; CONTEXT adds what the parameter needs to matter (None removes a base value).
BASE: dict[str, dict[str, str]] = {
    "extract": {"model": "{tiny}", "layers": "1", "ctx_len": "16", "max_tokens": "64", "batch_size": "4"},
    "fit": {"cache": "{cache}", "latents": "64", "k": "4", "batch_size": "64", "max_tokens": "256"},
    "finetune": {"run": "{run}", "max_tokens": "64", "batch_size": "2"},
    "evaluate": {"runs": "{run}", "max_tokens": "64"},
    "interpret": {"run": "{run}", "explainer": "none", "max_tokens": "128", "features": "2", "top": "3"},
    "steer": {"run": "{run}", "feature": "5=add:2", "prompt": "hi", "max_new_tokens": "2"},
    "circuit": {"runs": "{run}", "task": "{task}", "method": "mask", "lambdas": "0.01", "steps": "2"},
    "export": {"run": "{run}", "fmt": "saelens", "out": "{case}/export"},
    "import": {"source": "{sae}", "out": "{case}/imported"},
    "cache list": {"cache_root": "{root}"},
    "cache info": {"path": "{cache}"},
    "cache verify": {"path": "{cache}"},
    "cache repair": {"path": "{cache}"},
}
WHERE = {"device": "cpu", "cache_root": "{case}"}  # every command that has them: CPU, results under the case
SCORING = {"explainer": "openai", "score": "detection", "test_share": "0.5", "bootstrap": "100", "features": "1"}
JUDGED = {"evaluate": "", "feature": None, "prompt": "hi", "eval_feature": "3", "strength": "1", "heldout_tokens": "64"}
CONTEXT: dict[tuple[str, str], dict[str, str | None]] = {
    **{("interpret", name): SCORING for name in ("explainer_model", "base_url", "max_cost", "concurrency", "timeout")},
    **{
        ("interpret", name): SCORING
        for name in ("score", "scorer_model", "scorer_base_url", "test_share", "score_quantiles")
    },
    **{
        ("interpret", name): SCORING
        for name in ("score_per_quantile", "score_hard", "score_batch", "fuzz_threshold", "control", "bootstrap")
    },
    ("interpret", "fuzz_threshold"): {**SCORING, "score": "fuzzing"},
    **{("steer", name): {"sample": ""} for name in ("temperature", "seed")},
    **{
        ("steer", name): JUDGED
        for name in ("out", "eval_feature", "n_features", "strength", "heldout_tokens", "batch_size")
    },
    **{("steer", name): {**JUDGED, "judge_model": "gpt-4o-mini"} for name in ("judge_model", "base_url", "max_cost")},
    ("steer", "n_features"): {**JUDGED, "eval_feature": None},
    ("steer", "evaluate"): JUDGED,
    **{("circuit", name): {"method": "ig", "sizes": "1"} for name in ("sizes", "ig_steps")},
    ("circuit", "seeds"): {"seeds": "1"},
    ("evaluate", "all_in"): {"runs": None},
    ("extract", "max_tokens"): {"dataset": "{docs}"},  # 0 and 10**18 mean the whole corpus: a small one
    ("interpret", "all_in"): {"run": None},
}


@dataclass(frozen=True)
class Case:
    command: str  # "fit", "cache info"
    name: str  # the parameter's name in the command's signature
    flag: str  # how it is spelled on the command line ("" for an argument)
    value: str | None  # None: a flag given without a value

    @property
    def id(self) -> str:
        return f"{self.command} {self.flag or self.name}" + ("" if self.value is None else f"={self.value!r}")


def commands(command: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(name, command) for every command and sub-command of the app."""
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def hostile(param: Any) -> list[str | None]:
    """The values one parameter is fed, from its declared type and help."""
    if getattr(param, "is_flag", False):
        return [None]
    annotation = str(param.type_descriptor.annotation)
    if "float" in annotation:
        return list(NUMBERS)
    if "int" in annotation:
        return list(INTEGERS)
    texts: list[str | None] = list(TEXTS)
    return texts + list(FILES) if FILE_WORDS.search(param.help or param.name or "") else texts


def cases() -> list[Case]:
    found = []
    for command, cmd in commands():
        for param in cmd.params:
            spellings = [*param.opts, *param.secondary_opts] if getattr(param, "is_flag", False) else param.opts[:1]
            for flag in spellings:
                for value in hostile(param):
                    found.append(Case(command, param.name, flag if flag.startswith("-") else "", value))
    return found


CASES = cases()


def argv(command: str, places: dict[str, str], case: Case | None = None) -> list[str]:
    """A command line: the base values, then (for a case) its context and its own value."""
    cmd = dict(commands())[command]
    names = {p.name for p in cmd.params}
    values: dict[str, str | None] = {**{k: v for k, v in WHERE.items() if k in names}, **BASE[command]}
    if case is not None:
        values.update(CONTEXT.get((command, case.name), {}))
        values[case.name] = case.value if case.value is not None else ""
    line = command.split()
    for param in cmd.params:
        value = values.get(param.name)
        if value is None:
            continue
        value = value.format(**places)
        if not param.opts[0].startswith("-"):
            line.append(value)
        elif getattr(param, "is_flag", False):
            line.append(case.flag if case is not None and param.name == case.name else param.opts[0])
        else:
            line.append(f"{param.opts[0]}={value}")
    return line


def hostile_files(folder: Path) -> dict[str, str]:
    folder.mkdir()
    (folder / "empty").write_bytes(b"")
    (folder / "latin1").write_bytes("caf\u00e9 cr\u00e8me \u00ff".encode("latin-1"))
    (folder / "malformed").write_text('{"a": [1, 2,\n: not: valid\t{{\n')
    return {"hostile": str(folder)}


@pytest.fixture(scope="module")
def places(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The fixtures every case reads (never writes): a tiny model, a cache, a run, a checkpoint, a task."""
    world = tmp_path_factory.mktemp("walk-world")
    base = {"model": str(tiny_llama), "ctx_len": 32, "max_tokens": 1200, "device": "cpu"}
    cache = extract.run(ExtractConfig(**base, layers="1", cache_root=str(world))).folder  # type: ignore[arg-type]
    cfg = FitConfig(cache=cache.url, latents=128, k=4, batch_size=256, out=str(world / "saes"), device="cpu")
    run = fit.run(cfg).runs[0]
    write_saelens(world / "sae", "topk", str(tiny_llama))
    pair = {"clean_prefix": "The pilot", "patch_prefix": "The pilots", "clean_answer": " is", "patch_answer": " are"}
    (world / "task.jsonl").write_text((json.dumps(pair) + "\n") * 12)
    docs = (json.dumps({"text": f"Document {i} is short, about {i * 7} words."}) + "\n" for i in range(40))
    (world / "docs.jsonl").write_text("".join(docs))  # the whole corpus in a second (~500 tokens)
    found = {"tiny": str(tiny_llama), "cache": cache.url, "run": run.url, "sae": str(world / "sae")}
    found |= {"task": str(world / "task.jsonl"), "docs": str(world / "docs.jsonl"), "root": str(world)}
    found |= hostile_files(world / "hostile")
    with standin_server(Script(rule=answer)) as url:
        yield warmed({**found, "url": url}, tmp_path_factory.mktemp("walk-warm"))


def warmed(places: dict[str, str], folder: Path) -> dict[str, str]:
    """Run every command once at its base values, which must succeed: the walk starts from valid lines, and
    the modules a command imports on first use load here, never under a case's alarm (an import cut in half
    leaves a module that breaks every later case)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("OPENAI_API_KEY", "sk-option-walk")
        patch.setenv("OPENAI_BASE_URL", places["url"])
        for command, _ in commands():
            line = argv(command, {**places, "case": str(folder / command.replace(" ", "-"))})
            patch.setattr(sys, "argv", ["sae-pipe", *line])
            main()  # a SystemExit here: the base line of `command` is not valid
    return places


def answer(body: dict[str, Any]) -> tuple[str, list[float] | None]:
    """The stand-in model: explainer and scorers by rule, the steering judge with two ratings."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if "interpret features" in system or "Explanation: " in user:
        return rule_model(body)
    return json.dumps({"concept": 1, "fluency": 2}), None


class Overtime(BaseException):
    """Raised into a case that is still working after SECONDS (a BaseException: no `except Exception` eats it)."""


def _overtime(signum: int, frame: object) -> None:
    raise Overtime


def tree(*folders: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}


def results(before: dict[Path, tuple[int, int]], after: dict[Path, tuple[int, int]]) -> list[Path]:
    """Files new or changed since ``before`` that a later stage would read as a result: not hidden ones (the
    temporary folders of Folder.replaced, memos of file hashes)."""
    changed = [p for p, stamp in after.items() if before.get(p) != stamp]
    found = [p for p in changed if p.suffix in RESULTS and not any(part.startswith(".") for part in p.parts)]
    return [p for p in found if not unfinished(p.parent)]


def unfinished(folder: Path) -> bool:
    """A cache or run stopped in the middle (its manifest or cfg.json says so): resumable by design, and
    refused by every stage that reads one."""
    marks = [folder / "manifest.json", folder / "cfg.json"]
    return any(m.is_file() and json.loads(m.read_text()).get("status", "complete") != "complete" for m in marks)


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def valid(path: Path) -> None:
    """A result file reads back: JSON without NaN / Infinity, a parquet file that opens."""
    if path.suffix == ".json":
        json.loads(path.read_text(), parse_constant=_strict)
    elif path.suffix == ".parquet":
        pq.read_table(path)


def run_case(line: list[str], monkeypatch: pytest.MonkeyPatch) -> int | str:
    """Run one command line in this process; its exit code ("overtime" when it was stopped)."""
    monkeypatch.setattr(sys, "argv", ["sae-pipe", *line])
    previous = signal.signal(signal.SIGALRM, _overtime)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        main()
        code: int | str = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except Overtime:
        code = "overtime"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code


def one_error_line(err: str) -> bool:
    """One `error:` line, the last one written, no traceback and no boxed panel."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err and "╭" not in err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_value(
    case: Case,
    places: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)  # a command without --cache-root writes under ./cache: the case's own folder
    monkeypatch.setenv("OPENAI_API_KEY", "sk-option-walk")
    monkeypatch.setenv("OPENAI_BASE_URL", places["url"])
    line = argv(case.command, {**places, "case": str(tmp_path)}, case)
    world = Path(places["root"])
    before = tree(world, tmp_path)
    capsys.readouterr()
    code = run_case(line, monkeypatch)
    out, err = capsys.readouterr()
    left = results(before, tree(world, tmp_path))
    last = ([s for s in err.splitlines() if s.strip()] or [""])[-1][:300]
    shown = f"exit {code}: {last} || sae-pipe {' '.join(line)}\nstdout: {out[-600:]}\nstderr: {err[-1500:]}"
    assert code in (0, 2, 3, 4, "overtime"), shown
    if code in (0, "overtime"):  # finished, or stopped mid-job like a kill: what it left reads back whole
        for path in left:
            valid(path)
        return
    assert one_error_line(err), shown
    assert not left, f"left {[p.name for p in left]} after {shown}"


def test_the_walk_covers_every_parameter() -> None:
    """Every parameter of every command is walked, floats with all six numbers, integers with their four."""
    walked = {(c.command, c.name) for c in CASES}
    declared = {(name, p.name) for name, cmd in commands() for p in cmd.params}
    assert walked == declared and len(declared) > 150
    values: dict[tuple[str, str], set[str | None]] = {}
    for c in CASES:
        values.setdefault((c.command, c.name), set()).add(c.value)
    floats, integers = numeric_options(float), numeric_options(int)
    assert ("circuit", "lr") in floats and ("fit", "max_tokens") in integers
    assert len(floats) >= 25 and len(integers) >= 40
    assert all(values[key] == set(NUMBERS) for key in floats)
    assert all(values[key] == set(INTEGERS) for key in integers)
    assert not [key for key, found in values.items() if "nan" in found and key not in floats | integers]


def numeric_options(kind: type) -> set[tuple[str, str]]:
    """(command, parameter) of every option declared as ``kind`` (int or float), alone or as a list."""
    return {
        (name, p.name)
        for name, cmd in commands()
        for p in cmd.params
        if str(p.type_descriptor.annotation) in (str(kind), f"list[{kind.__name__}]")
    }


def test_integer_options_refuse_every_non_number_while_parsing() -> None:
    """nan, inf and -inf given to an integer option stop in the parser, which names the option: no stage code
    runs, so the walk feeds them nan alone (and sees that one reach the user as one `error:` line)."""
    places = dict.fromkeys(("tiny", "cache", "run", "sae", "task", "docs", "root", "hostile", "url", "case"), "x")
    for command, name in sorted(numeric_options(int)):
        cmd = dict(commands())[command]
        flag = next(p.opts[0] for p in cmd.params if p.name == name and p.opts[0].startswith("-"))
        for value in ("nan", "inf", "-inf"):
            line = argv(command, places, Case(command, name, flag, value))
            with pytest.raises(typer.BadParameter) as refused:
                cmd.make_context(command, line[len(command.split()) :])
            assert refused.value.param is not None and refused.value.param.name == name, (command, name, value)
