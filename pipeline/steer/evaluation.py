"""`sae-pipe steer RUN --evaluate`: a dose-response grid of features x strengths, written to a folder.

Features are the given ones or the run's best by output score (the feature table's column when
`interpret` wrote one, else computed here); strengths are `direction` edits in units of each
feature's largest activation. See :mod:`pipeline.steer.dose` for what is measured.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.infra.chat import ClientSettings
from pipeline.infra.console import Stopwatch, say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.llm.unembed import unembedding
from pipeline.sae.logits import feature_output_scores, logit_effects
from pipeline.steer.config import SteerConfig
from pipeline.steer.dose import NEUTRAL_PROMPTS, Bench, Setting, generation_effect, held_out_cost
from pipeline.steer.generation import check_length
from pipeline.steer.judge import judge
from pipeline.steer.report import write_outputs
from pipeline.steer.stage import Session, feature_table, max_activations, open_session, prompt_list

PROMOTED = 10  # promoted tokens whose log-probability gain counts as effect


def evaluate_steering(cfg: SteerConfig) -> Folder:
    """Run the grid and write steering.csv, generations.jsonl, dose_response.png and steering.html."""
    if not cfg.strengths or not all(abs(s) < 1e6 for s in cfg.strengths):
        raise UserError("--strengths must list finite numbers, e.g. 0,2,4,8.")
    if cfg.heldout_tokens < 1 or cfg.batch_size < 1 or cfg.n_features < 1:
        raise UserError("--heldout-tokens, --batch-size and --n-features must be at least 1.")
    clock = Stopwatch()
    session = open_session(cfg)
    table = feature_table(session.subject, cfg)
    a_max = max_activations(table)
    w_u = unembedding(session.model).to(session.device)  # (V, D)
    scores = choose_features(session, cfg, table, w_u, a_max)
    bench = make_bench(session, cfg, list(scores), w_u, a_max)
    strengths = sorted({float(s) for s in cfg.strengths})
    settings = [Setting(f, s) for f in scores for s in strengths]
    cost = held_out_cost(bench, settings, cfg.batch_size)
    rows, generations = [], []
    for setting in settings:
        activation, perplexity, texts = generation_effect(bench, setting, cfg.max_new_tokens)
        kl, gain = cost[setting]
        rows.append(
            {**setting._asdict(), "effect": activation, "logprob_gain": gain, "kl": kl, "perplexity": perplexity}
        )
        generations += [{**setting._asdict(), "prompt": p, "text": t} for p, t in zip(_prompts(cfg), texts)]
    words = {f: [session.tokenizer.decode([int(t)]) for t in bench.promoted[f]] for f in scores}
    concepts = feature_concepts(session, cfg, words)
    judged = rate_generations(cfg, generations, concepts)
    for row in rows:
        mine = [g for g in generations if (g["feature"], g["strength"]) == (row["feature"], row["strength"])]
        for column in ("concept", "fluency"):
            values = [g[column] for g in mine if g.get(column) is not None]
            row[column] = sum(values) / len(values) if values else None
    summary = {
        "run": session.subject.folder.name,
        "layers": session.subject.layers,
        "mode": cfg.mode,
        "features": {str(f): {"output_score": s, "a_max": a_max.get(f, 1.0)} for f, s in scores.items()},
        "promoted": {str(f): words[f] for f in scores},
        "concepts": {str(f): concepts[f] for f in scores},
        "judge": cfg.judge_model if judged else "skipped (no OPENAI_API_KEY)",
        "strengths": strengths,
        "heldout_positions": int(bench.mask.sum()),
        "prompts": _prompts(cfg),
        "max_new_tokens": cfg.max_new_tokens,
        "seconds": round(clock.seconds, 1),
    }
    out = Folder.at(cfg.out) if cfg.out else Folder.at(cfg.cache_root).child("steer", session.subject.folder.name)
    write_outputs(out, summary, rows, generations)
    say(f"steering evaluation: {len(scores)} features x {len(strengths)} strengths in {clock.seconds:.0f} s")
    return out


def choose_features(
    session: Session, cfg: SteerConfig, table: pa.Table | None, w_u: torch.Tensor, a_max: dict[int, float]
) -> dict[int, float]:
    """latent -> output score of the features to evaluate: the given ones, else the best-scoring live ones."""
    n_latents = session.sae.cfg.n_latents
    bad = [i for i in cfg.eval_features if not 0 <= i < n_latents]
    if bad:
        raise UserError(f"--eval-features {bad} out of range; this SAE has latents 0..{n_latents - 1}.")
    candidates = list(cfg.eval_features) or (sorted(a_max) if a_max else list(range(n_latents)))
    if table is not None and "output_score" in table.column_names:
        known = dict(zip(table["latent"].to_pylist(), table["output_score"].to_pylist()))
        scores = torch.tensor([float(known[i]) for i in candidates])
    else:
        scores = feature_output_scores(
            session.model,
            session.blocks,
            session.tokenizer,
            session.subject.sae,
            session.subject.layers[0],
            session.subject.normalizer,
            w_u,
            candidates,
            a_max,
        )
    order = scores.argsort(descending=True)
    keep = order if cfg.eval_features else order[: cfg.n_features]
    return {candidates[int(i)]: float(scores[i]) for i in keep}


def feature_concepts(session: Session, cfg: SteerConfig, words: dict[int, list[str]]) -> dict[int, str]:
    """What the judge looks for: the feature's explanation from `interpret`, else its top promoted tokens."""
    interpret = Folder.at(cfg.cache_root).child("interpret", session.subject.folder.name).local()
    concepts = {f: "text about tokens like " + ", ".join(repr(w) for w in ws[:5]) for f, ws in words.items()}
    if (interpret / "explanations.parquet").is_file():
        data = pq.read_table(interpret / "explanations.parquet", columns=["latent", "explanation"]).to_pydict()
        concepts.update({int(i): e for i, e in zip(data["latent"], data["explanation"]) if i in words and e})
    return concepts


def rate_generations(cfg: SteerConfig, generations: list[dict[str, Any]], concepts: dict[int, str]) -> bool:
    """Add the LLM judge's concept and fluency ratings to each generation; False when it was skipped."""
    settings = ClientSettings(cfg.judge_model, cfg.base_url, temperature=0.0, max_answer_tokens=30)
    ratings = judge(generations, concepts, settings, cfg.max_cost, Folder.at(cfg.cache_root))
    for generation, rating in zip(generations, ratings or []):
        generation["concept"], generation["fluency"] = rating if rating else (None, None)
    return ratings is not None


def make_bench(
    session: Session, cfg: SteerConfig, features: list[int], w_u: torch.Tensor, a_max: dict[int, float]
) -> Bench:
    """Prompts, held-out text and each feature's promoted tokens, loaded once."""
    tokens, mask = session.subject.cache.heldout_sequences(cfg.heldout_tokens)
    prompts = [session.tokenizer(p, return_tensors="pt").input_ids.to(session.device) for p in _prompts(cfg)]
    for ids in prompts:
        check_length(session.model, ids.shape[1] + cfg.max_new_tokens)
    directions = session.sae.W_dec[torch.tensor(features, device=session.device)]  # (F, D)
    promoted = logit_effects(directions, w_u, PROMOTED).top_ids.to(session.device)  # (F, 10)
    return Bench(
        subject=session.subject,
        sae=session.sae,
        model=session.model,
        blocks=session.blocks,
        tokenizer=session.tokenizer,
        prompts=prompts,
        heldout=torch.from_numpy(tokens).long().to(session.device),
        mask=torch.from_numpy(mask).to(session.device),
        promoted={f: promoted[i] for i, f in enumerate(features)},
        a_max=a_max,
        mode=cfg.mode,
        router=session.router,
    )


def _prompts(cfg: SteerConfig) -> list[str]:
    return prompt_list(cfg) or list(NEUTRAL_PROMPTS)
