"""Every command shown in the README and in docs/ exists with the options it uses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The commands of every bash block in README.md and docs/*.md (details moved there keep their commands)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL)]
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_readme_has_commands() -> None:
    words = {cmd[0] for cmd in readme_commands()}
    assert {"make", "sae-pipe", "export"} <= words


def cli_words(words: list[str]) -> list[str] | None:
    """The `sae-pipe ...` part of a command, also when torchrun runs it as `-m pipeline.cli`."""
    if words[0] == "sae-pipe":
        return words
    if words[0] == "torchrun" and "pipeline.cli" in words:
        return ["sae-pipe", *words[words.index("pipeline.cli") + 1 :]]
    return None


def test_sae_pipe_commands_and_options_exist() -> None:
    root = typer.main.get_command(app)
    checked = 0
    for line in readme_commands():
        words = cli_words(line)
        if words is None:
            continue
        command = root
        args = words[1:]
        while hasattr(command, "commands"):  # a group: descend into the named subcommand
            assert args and args[0] in command.commands, f"unknown command in README: {' '.join(words)}"
            command, args = command.commands[args[0]], args[1:]
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=")[0] in options, f"{arg} is not an option of: {' '.join(words)}"
        checked += 1
    assert checked >= 13


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for words in readme_commands():
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.MULTILINE), words
    assert "make test" in (ROOT / ".ci" / "run").read_text()
