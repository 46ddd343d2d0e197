"""`sae-pipe steer`: generate from prompts with and without latent edits, side by side; with ``evaluate``, the
dose-response grid of :mod:`pipeline.steer.grid`. :func:`run` is the stage's one entry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.subject import Live
from pipeline.steer.config import SteerConfig
from pipeline.steer.edits import Positions, parse_edit
from pipeline.steer.generation import check_length, generate
from pipeline.steer.grid import evaluate_steering
from pipeline.steer.intervene import Tally, Target, routed_generate, steering
from pipeline.steer.report import headline
from pipeline.steer.session import feature_table, max_activations, open_session, prompt_list


@dataclass
class SteerResult:
    """What one steer wrote or generated."""

    records: list[dict[str, Any]] = field(default_factory=list)  # side by side: one per prompt
    folder: Folder | None = None  # with evaluate: steering.csv, generations.jsonl, summary.json, the plot and page
    headline: dict[str, float] = field(default_factory=dict)  # with evaluate: the numbers at the largest strength


def run(cfg: SteerConfig) -> SteerResult:
    """Side-by-side generations with and without the edits of ``cfg``, or with ``cfg.evaluate`` the grid."""
    if cfg.evaluate:
        grid = evaluate_steering(cfg)
        return SteerResult(folder=grid.folder, headline=headline(grid.rows))
    return SteerResult(records=side_by_side(cfg))


def side_by_side(cfg: SteerConfig) -> list[dict[str, Any]]:
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
