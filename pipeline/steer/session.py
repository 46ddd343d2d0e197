"""What both kinds of steering start from: the run with its model (a soft-routed run refused), the prompts, the
decoding options, and the run's feature table from `interpret` (direction strengths are in units of max_act)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.layout import Layout
from pipeline.live.edit import MODES
from pipeline.live.runs import takes
from pipeline.live.subject import Live, Subject, go_live, load_subject
from pipeline.steer.config import SteerConfig

MIN_TEMPERATURE = 0.01  # below it sampling is greedy decoding in all but name, and logits / t overflow


def open_session(cfg: SteerConfig) -> Live:
    """Load the run, the model its cache came from and the tokenizer."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown --mode {cfg.mode!r}; use one of {', '.join(MODES)}.")
    check_decoding(cfg)
    subject = load_subject(cfg.run, resolve_device(cfg.device), cfg.cache or None)
    if not takes("steer", subject.cfg["sae"]):
        raise UserError(
            f"run {subject.folder.name} uses soft routing: its code mixes layers, so an edit has no single "
            "layer to land on; steer a hard-routed run (fit --routing hard, the default)."
        )
    return go_live(subject)


def check_decoding(cfg: SteerConfig) -> None:
    """One clear error for decoding options no generation can honour."""
    if cfg.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    if cfg.sample and not (math.isfinite(cfg.temperature) and cfg.temperature >= MIN_TEMPERATURE):
        raise UserError(
            f"--temperature {cfg.temperature:g} cannot sample: give a finite temperature >= {MIN_TEMPERATURE:g} "
            "with --sample (1 = the model's own distribution), or leave out --sample for greedy decoding."
        )
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed {cfg.seed} is out of range; give a seed between 0 and 2**63 - 1.")


def feature_table(subject: Subject, cfg: SteerConfig) -> pa.Table | None:
    """The run's features.parquet (from `interpret`, or --feature-table), or None when there is none."""
    default = Layout(cfg.cache_root).interpreted(subject.folder.name).features
    table = Path(cfg.feature_table) if cfg.feature_table else default
    if cfg.feature_table and not table.is_file():
        raise UserError(f"--feature-table {cfg.feature_table} does not exist; `sae-pipe interpret RUN` writes one.")
    if not table.is_file():
        return None
    try:
        data = pq.read_table(table)
    except (pa.ArrowException, OSError):
        raise UserError(f"{table} is not a parquet file; `sae-pipe interpret RUN` writes features.parquet.") from None
    missing = {"latent", "max_act"} - set(data.column_names)
    if missing:
        raise UserError(
            f"{table} lacks the column(s) {', '.join(sorted(missing))}; `sae-pipe interpret RUN` writes one."
        )
    return data


def max_activations(table: pa.Table | None) -> dict[int, float]:
    """latent -> max_act of the features that fired (direction strengths are in these units)."""
    if table is None:
        return {}
    data = table.select(["latent", "max_act"]).to_pydict()
    return {int(latent): float(value) for latent, value in zip(data["latent"], data["max_act"]) if value and value > 0}


def prompt_list(cfg: SteerConfig) -> list[str]:
    """--prompt values, then the lines of --prompts-file; an empty prompt or file is one clear error."""
    if any(not p.strip() for p in cfg.prompts):
        raise UserError("--prompt is empty: give text to generate from, e.g. --prompt 'The weather today'.")
    if not cfg.prompts_file:
        return list(cfg.prompts)
    file = Path(cfg.prompts_file)
    if not file.is_file():
        raise UserError(f"--prompts-file {cfg.prompts_file} does not exist.")
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--prompts-file {cfg.prompts_file} is not UTF-8 text; save it as UTF-8.") from None
    if not lines:
        raise UserError(f"--prompts-file {cfg.prompts_file} holds no prompt; write one prompt per line.")
    return list(cfg.prompts) + lines
