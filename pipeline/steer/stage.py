"""`sae-pipe steer`: generate from prompts with and without latent edits, side by side."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.layout import Layout
from pipeline.live.edit import MODES
from pipeline.live.subject import Live, Subject, go_live, load_subject
from pipeline.steer.config import SteerConfig
from pipeline.steer.edits import Positions, parse_edit
from pipeline.steer.generation import check_length, generate
from pipeline.steer.intervene import Tally, Target, routed_generate, steering

MIN_TEMPERATURE = 0.01  # below it sampling is greedy decoding in all but name, and logits / t overflow


def open_session(cfg: SteerConfig) -> Live:
    """Load the run, the model its cache came from and the tokenizer."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown --mode {cfg.mode!r}; use one of {', '.join(MODES)}.")
    check_decoding(cfg)
    subject = load_subject(cfg.run, resolve_device(cfg.device), cfg.cache or None)
    if subject.soft_routed:
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


def steer(cfg: SteerConfig) -> list[dict[str, Any]]:
    """One record per prompt: the prompt, the unedited and the edited continuation, the edits."""
    positions = Positions.parse(cfg.positions)
    prompts = prompt_list(cfg)
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    session = open_session(cfg)
    target = make_target(session, cfg)
    records = []
    for prompt in prompts:
        ids = session.tokenizer(prompt, return_tensors="pt").input_ids.to(session.device)  # (1, T)
        check_length(session.model, ids.shape[1] + cfg.max_new_tokens)
        options = (cfg.max_new_tokens, cfg.sample, cfg.temperature, cfg.seed)
        tally = Tally()
        if target.site.routed:  # same loop both times, so the only difference is the edit
            unedited = routed_generate(
                session.model, session.blocks, dataclasses.replace(target, edits=[]), cfg.mode, positions, ids, options
            )
            edited = routed_generate(session.model, session.blocks, target, cfg.mode, positions, ids, options, tally)
        else:
            unedited = generate(session.model, ids, *options)
            with steering(session.model, session.blocks, [target], cfg.mode, positions, ids.shape[1]) as tally:
                edited = generate(session.model, ids, *options)
        if not tally.positions:
            raise UserError(
                f"--positions {cfg.positions} edits no position of the prompt {prompt!r} ({ids.shape[1]} tokens, "
                f"then {edited.shape[1] - ids.shape[1]} generated; special tokens are never edited), so the "
                "'edited' text would be the unedited one: give positions inside the generation (0 = the first "
                "prompt token), all, prompt, generated (with --max-new-tokens >= 2) or last."
            )
        decode = session.tokenizer.decode
        records.append(
            {
                "prompt": prompt,
                "unedited": decode(unedited[0, ids.shape[1] :], skip_special_tokens=True),
                "edited": decode(edited[0, ids.shape[1] :], skip_special_tokens=True),
                "edits": [f"{e.latent}={e.kind}:{e.value:g}" for e in target.edits],
                "mode": cfg.mode,
                "positions": cfg.positions,
                "layers": session.subject.layers,  # a RouteSAE edits each token at its routed layer
            }
        )
    return records


def make_target(session: Live, cfg: SteerConfig) -> Target:
    """The run's SAE with the parsed edits and, for direction edits, each feature's largest activation."""
    if not cfg.features:
        raise UserError("no edit: pass --feature LATENT=KIND:VALUE, e.g. --feature 1592=scale:0.")
    edits = [parse_edit(text, session.subject.sae.cfg.n_latents) for text in cfg.features]
    a_max = max_activations(feature_table(session.subject, cfg))
    return Target(session.site, edits, session.special, a_max)


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
