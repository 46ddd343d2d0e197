"""`sae-pipe steer RUN --evaluate`: a dose-response grid of features x strengths, written to a folder.

Features are the given ones or the run's best by output score (the feature table's column when
`interpret` wrote one, else computed here); strengths are `direction` edits in units of each
feature's largest activation. See :mod:`pipeline.steer.dose` for what is measured.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.infra.chat import ClientSettings
from pipeline.infra.console import Stopwatch, say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.live.edit import Mode
from pipeline.live.logits import SCORE_PROMPT, feature_output_scores, logit_effects
from pipeline.live.subject import Live
from pipeline.llm.unembed import unembedding
from pipeline.steer.config import SteerConfig
from pipeline.steer.dose import NEUTRAL_PROMPTS, Bench, Setting, generation_effect, held_out_cost
from pipeline.steer.generation import check_length
from pipeline.steer.judge import plan_judge
from pipeline.steer.report import write_outputs
from pipeline.steer.session import feature_table, max_activations, open_session, prompt_list

PROMOTED = 10  # promoted tokens whose log-probability gain counts as effect


class Grid(NamedTuple):
    """The evaluation's folder and its rows (one per feature x strength, as steering.csv holds them)."""

    folder: Folder
    rows: list[dict[str, Any]]


def evaluate_steering(cfg: SteerConfig) -> Grid:
    """Run the grid and write steering.csv, generations.jsonl, dose_response.png and steering.html.

    The judge's cost is estimated before any request; the grid is written before the judge is asked (or
    refused for its cost), so nothing computed is lost."""
    check_evaluation(cfg)
    prompts = evaluation_prompts(cfg, selected=not cfg.eval_features)
    clock = Stopwatch()
    session = open_session(cfg)
    out = output_folder(session, cfg)
    table = feature_table(session.subject, cfg)
    a_max = max_activations(table)
    w_u = unembedding(session.model).to(session.device)  # (V, D)
    scores = choose_features(session, cfg, table, w_u, a_max)
    bench = make_bench(session, cfg, prompts, list(scores), w_u, a_max)
    strengths = sorted({float(s) for s in cfg.strengths})
    rows, generations = run_grid(bench, [Setting(f, s) for f in scores for s in strengths], prompts, cfg)
    words = {f: [session.tokenizer.decode([int(t)]) for t in bench.promoted[f]] for f in scores}
    concepts = feature_concepts(session, cfg, words)
    settings = ClientSettings(cfg.judge_model, cfg.base_url, temperature=0.0, max_answer_tokens=30)
    plan = plan_judge(generations, concepts, settings, cfg.max_cost, Layout(cfg.cache_root).answers("steer"))
    summary = {
        "run": session.subject.folder.name,
        "layers": session.subject.layers,
        "mode": cfg.mode,
        "features": {str(f): {"output_score": s, "a_max": a_max.get(f, 1.0)} for f, s in scores.items()},
        "promoted": {str(f): words[f] for f in scores},
        "concepts": {str(f): concepts[f] for f in scores},
        "judge": plan.status,
        "strengths": strengths,
        "heldout_positions": int(bench.mask.sum()),
        "prompts": prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "seconds": round(clock.seconds, 1),
    }
    write_outputs(out, summary, rows, generations)  # whatever was computed, before any request or refusal
    if plan.refusal:
        raise UserError(f"{plan.refusal} The grid without the judge's ratings is written to {out.url}.")
    if plan.client is not None:
        add_ratings(rows, generations, plan.ask())
        write_outputs(out, {**summary, "judge": settings.model}, rows, generations)
    say(f"steering evaluation: {len(scores)} features x {len(strengths)} strengths in {clock.seconds:.0f} s")
    return Grid(out, rows)


def check_evaluation(cfg: SteerConfig) -> None:
    """One clear error for evaluation options that cannot give a valid grid."""
    if not cfg.strengths or not all(abs(s) < 1e6 for s in cfg.strengths):
        raise UserError("--strengths must list finite numbers, e.g. 0,2,4,8.")
    if cfg.heldout_tokens < 1 or cfg.batch_size < 1 or cfg.n_features < 1:
        raise UserError("--heldout-tokens, --batch-size and --n-features must be at least 1.")
    if not (math.isfinite(cfg.max_cost) and cfg.max_cost >= 0):
        raise UserError(f"--max-cost {cfg.max_cost:g} must be a finite number of USD >= 0 (0 = no cap).")


def output_folder(session: Live, cfg: SteerConfig) -> Folder:
    """Where the grid goes; a folder holding something else is refused (it would be replaced whole)."""
    name = session.subject.folder.name
    out = Folder.at(cfg.out) if cfg.out else Layout(cfg.cache_root).steer(name)
    if out.exists() and out.list() and not out.exists("steering.csv"):
        raise UserError(
            f"--out {out.url} exists and is not a steering result (no steering.csv); it would be replaced "
            "whole: give a new or empty folder, or a previous `steer --evaluate` output."
        )
    return out


def evaluation_prompts(cfg: SteerConfig, selected: bool) -> list[str]:
    """The prompts generations start from; when features are selected by output score, none of them may
    start with the prompt that score is measured on (a selection tested on its own prompt flatters itself)."""
    prompts = prompt_list(cfg) or list(NEUTRAL_PROMPTS)
    shared = [p for p in prompts if p.strip().startswith(SCORE_PROMPT)]
    if selected and shared:
        raise UserError(
            f"--prompt {shared[0]!r} overlaps {SCORE_PROMPT!r}, the prompt features are selected on by output "
            "score; evaluate on other prompts, or name the features with --eval-feature."
        )
    return prompts


def run_grid(
    bench: Bench, settings: list[Setting], prompts: list[str], cfg: SteerConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per setting (effect, log-prob gain, KL, perplexity; judge columns empty) and its generations."""
    cost = held_out_cost(bench, settings, cfg.batch_size)
    rows: list[dict[str, Any]] = []
    generations: list[dict[str, Any]] = []
    for setting in settings:
        activation, perplexity, texts = generation_effect(bench, setting, cfg.max_new_tokens)
        kl, gain = cost[setting]
        measured = {"effect": activation, "logprob_gain": gain, "kl": kl, "perplexity": perplexity}
        rows.append({**setting._asdict(), **measured, "concept": None, "fluency": None})
        generations += [{**setting._asdict(), "prompt": p, "text": t} for p, t in zip(prompts, texts)]
    return rows, generations


def add_ratings(
    rows: list[dict[str, Any]], generations: list[dict[str, Any]], ratings: list[tuple[int, int] | None]
) -> None:
    """The judge's concept and fluency on each generation, and their means on each row."""
    for generation, rating in zip(generations, ratings):
        generation["concept"], generation["fluency"] = rating if rating else (None, None)
    for row in rows:
        mine = [g for g in generations if (g["feature"], g["strength"]) == (row["feature"], row["strength"])]
        for column in ("concept", "fluency"):
            values = [g[column] for g in mine if g.get(column) is not None]
            row[column] = sum(values) / len(values) if values else None


def choose_features(
    session: Live, cfg: SteerConfig, table: pa.Table | None, w_u: torch.Tensor, a_max: dict[int, float]
) -> dict[int, float]:
    """latent -> output score of the features to evaluate: the given ones, else the best-scoring live ones."""
    n_latents = session.subject.sae.cfg.n_latents
    bad = [i for i in cfg.eval_features if not 0 <= i < n_latents]
    if bad:
        raise UserError(f"--eval-features {bad} out of range; this SAE has latents 0..{n_latents - 1}.")
    candidates = list(cfg.eval_features) or (sorted(a_max) if a_max else list(range(n_latents)))
    if table is not None and "output_score" in table.column_names:
        known = table_scores(table)
        unscored = [i for i in candidates if i not in known]
        if cfg.eval_features and unscored:
            raise UserError(
                f"--eval-feature {unscored[0]} has no output score in the run's feature table: it never fired on "
                "`interpret`'s tokens, so it has no largest activation to scale strengths by; pick latents that "
                "fired (features.parquet, count > 0)."
            )
        candidates = [i for i in candidates if i in known]
        if not candidates:
            raise UserError("no latent has an output score in the run's feature table; re-run `sae-pipe interpret`.")
        scores = torch.tensor([known[i] for i in candidates])
    else:
        scores = feature_output_scores(
            session.model,
            session.blocks,
            session.tokenizer,
            session.site,
            w_u,
            candidates,
            a_max,
        )
    order = scores.argsort(descending=True)
    keep = order if cfg.eval_features else order[: cfg.n_features]
    return {candidates[int(i)]: float(scores[i]) for i in keep}


def table_scores(table: pa.Table) -> dict[int, float]:
    """latent -> output score from `interpret`'s table, for the latents that have one (dead ones do not)."""
    data = table.select(["latent", "output_score"]).to_pydict()
    return {
        int(latent): float(score)
        for latent, score in zip(data["latent"], data["output_score"])
        if score is not None and math.isfinite(score)
    }


def feature_concepts(session: Live, cfg: SteerConfig, words: dict[int, list[str]]) -> dict[int, str]:
    """What the judge looks for: the feature's explanation from `interpret`, else its top promoted tokens."""
    explanations = Layout(cfg.cache_root).interpreted(session.subject.folder.name).explanations
    concepts = {f: "text about tokens like " + ", ".join(repr(w) for w in ws[:5]) for f, ws in words.items()}
    if explanations.is_file():
        data = pq.read_table(explanations, columns=["latent", "explanation"]).to_pydict()
        concepts.update({int(i): e for i, e in zip(data["latent"], data["explanation"]) if i in words and e})
    return concepts


def make_bench(
    session: Live,
    cfg: SteerConfig,
    texts: list[str],
    features: list[int],
    w_u: torch.Tensor,
    a_max: dict[int, float],
) -> Bench:
    """Prompts ``texts``, held-out text and each feature's promoted tokens, loaded once."""
    tokens, mask = session.subject.cache.heldout_sequences(cfg.heldout_tokens)
    prompts = [session.tokenizer(p, return_tensors="pt").input_ids.to(session.device) for p in texts]
    for ids in prompts:
        check_length(session.model, ids.shape[1] + cfg.max_new_tokens)
    directions = session.subject.sae.directions(features)  # (F, D)
    promoted = logit_effects(directions, w_u, PROMOTED).top_ids.to(session.device)  # (F, 10)
    return Bench(
        live=session,
        prompts=prompts,
        heldout=torch.from_numpy(tokens).long().to(session.device),
        mask=torch.from_numpy(mask).to(session.device),
        promoted={f: promoted[i] for i, f in enumerate(features)},
        a_max=a_max,
        mode=Mode(cfg.mode),
    )
