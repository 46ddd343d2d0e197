"""`sae-pipe interpret`: feature tables from held-out tokens, LLM explanations and their scores, a report.

Held-out sequences are split (``test_share``, seeded): the explainer sees examples from train sequences
only; the scorers judge examples from the other, test sequences.

Outputs (``<cache_root>/interpret/<run>/``):
  features.parquet      one row per latent: latent, count, frequency, mean_act, max_act,
                        q10..q99 (activation quantiles), hist (20-bin histogram over (0, max_act]),
                        train_count / test_count (activations in train / test sequences), sampled (sent to
                        the explainer), top_layer (RouteSAE), promotes / suppresses (+ _logit) and
                        output_score (pipeline/interpret/effects.py), protocol_passes / protocol_reason (with
                        --protocol), <scorer>_balanced_accuracy / _precision / _recall / _f1 / _auc / _n
  examples.parquet      per latent: split (train | test), kind (top | q0..qN quantile bins | random
                        non-activating | hard | protocol), rank, activation, row, sequence, token_id, doc,
                        pos, prefix / token / suffix (decoded context), layer (hard-routed RouteSAE: the
                        layer the token was routed to); test rows also window_tokens, window_acts, center
For a hard-routed RouteSAE, activations are those of the unscaled input: the SAE encodes w * x (w = the
routing weight), and a / w is the coefficient of the feature in the reconstruction of x itself.
  explanations.parquet  per explained latent: status, category, score, explanation, answer, tokens
  scores.parquet        every scorer verdict: scorer, latent, explained_by, control, batch, row, label,
                        marked (fuzzing), verdict, prob (P(1) from log-probabilities), status (ok | malformed |
                        failed | not sent), cached, answer (the prompt's raw answer, on its first row)
  summary.json          counts per category, mean score, scores per scorer with 95 % intervals, tokens, cost
  report.html           the page to look at
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.contexts import HeldoutIndex
from pipeline.infra.console import Stopwatch, progress_bar, say
from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.interpret.ask import Asker
from pipeline.interpret.checks import check_config
from pipeline.interpret.compare import write_comparison
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.effects import TYPES as EFFECTS
from pipeline.interpret.effects import effect_columns
from pipeline.interpret.explain import summarize
from pipeline.interpret.features import (
    Activations,
    collect,
    examples_table,
    feature_table,
    select_examples,
    with_columns,
)
from pipeline.interpret.protocol import ProtocolSettings, apply_protocol
from pipeline.interpret.report import render_report
from pipeline.interpret.splits import ScoringPlan, scoring_rows, select_tests, window_columns
from pipeline.interpret.stats import METRICS
from pipeline.live.subject import Subject, load_cache_tokenizer, load_subject


@dataclass
class InterpretResult:
    """What interpret wrote: a folder and a summary per run, and the comparison page when runs were compared."""

    folders: list[Folder]  # <cache_root>/interpret/<run> (or --out) of each run
    summaries: list[dict[str, Any]]  # each run's summary.json, with "out" (its folder's URL)
    comparison: str = ""  # comparison.html, when several runs were interpreted together


def run(cfg: InterpretConfig, runs: list[str] | None = None) -> InterpretResult:
    """Interpret ``cfg.run``; or every one of ``runs``, each into <cache_root>/interpret/<run>, with a page
    comparing them in ``--out`` (default <cache_root>/interpret). Answers already paid for are free."""
    if runs is None:
        out, summary = interpreted(cfg)
        return InterpretResult([out], [summary])
    done = [interpreted(dataclasses.replace(cfg, run=path, out="")) for path in runs]
    summaries = [summary for _, summary in done]
    root = Folder.at(cfg.out) if cfg.out else Layout(cfg.cache_root).interpret()
    return InterpretResult([out for out, _ in done], summaries, write_comparison(summaries, root))


def interpreted(cfg: InterpretConfig) -> tuple[Folder, dict[str, Any]]:
    """Build tables, explanations, scores and the report for one run; return its folder and summary."""
    check_config(cfg)
    clock = Stopwatch()
    subject = load_subject(cfg.run, resolve_device(cfg.device), cfg.cache or None)
    subject.check_infer_k(cfg.infer_k)
    out = Folder.at(cfg.out) if cfg.out else Layout(cfg.cache_root).interpret(subject.folder.name)
    tables, scanned, latents = build_tables(subject, cfg)
    if cfg.logit_effects:
        tables["features"] = with_columns(tables["features"], effect_columns(subject, tables["features"]), EFFECTS)
    asker = Asker(cfg, tables, latents)
    asker.check_cost()  # may stop the run: before anything is written or sent
    summary: dict[str, Any] = {
        "run": subject.folder.name,
        "tokens_scanned": scanned,
        "latents": tables["features"].num_rows,
        "active_latents": int(np.count_nonzero(tables["features"]["count"].to_numpy())),
        "examples": tables["examples"].num_rows,
    }
    with out.replaced() as tmp:  # a run killed in here leaves the previous result or none
        explained = _explain_and_score(asker, tables, summary, tmp, cfg)
        summary["seconds"] = round(clock.seconds, 1)
        tmp.write_json(summary, "summary.json")
        html = render_report(
            f"Features of {subject.folder.name}",
            summary,
            tables["features"],
            tables["examples"],
            explained,
            _shown(tables["features"], explained, cfg.report_features),
        )
        tmp.write_bytes(html.encode(), "report.html")
    say(f"interpreted {subject.folder.name}: {summary['active_latents']:,} active latents")
    say(f"report: {out.path('report.html')}")
    return out, {**summary, "out": out.url}


def _explain_and_score(
    asker: Asker, tables: dict[str, pa.Table], summary: dict[str, Any], out: Folder, cfg: InterpretConfig
) -> dict[int, dict[str, Any]]:
    """Write the tables, explanations and scores into ``out`` and their numbers into ``summary``; return the
    explained latents' records."""
    for name, table in tables.items():
        pq.write_table(table, out.local() / f"{name}.parquet")
    records = asker.explain(out)
    summary.update({"explanations": "skipped"} if records is None else summarize(records, cfg.explainer_model))
    scored, per_feature = asker.score(records, out)
    summary.update(scored)
    if per_feature:
        tables["features"] = _with_scores(tables["features"], per_feature)
        pq.write_table(tables["features"], out.local() / "features.parquet")
    return {r["latent"]: r for r in records or [] if r.get("category")}


def build_tables(s: Subject, cfg: InterpretConfig) -> tuple[dict[str, pa.Table], int, list[int]]:
    """features and examples tables (with protocol verdicts when asked), the rows scanned, and the
    latents sampled for the explainer."""
    tokenizer = load_cache_tokenizer(s.cache)
    with progress_bar("interpret", min(cfg.max_tokens or s.cache.rows("heldout"), s.cache.rows("heldout"))) as bar:
        acts = collect(s.sae, s.layers, s.cache, cfg.max_tokens, cfg.batch_size, cfg.infer_k, cfg.theta, bar)
    features = feature_table(acts, s.layers if s.is_route else None)
    index = HeldoutIndex.load(s.cache, acts.n_rows)
    test = scoring_rows(index.sequence, index.doc, cfg.test_share, cfg.seed)
    if cfg.score and len(test) and (test.all() or not test.any()):
        raise UserError(
            f"all {len(np.unique(index.sequence))} held-out sequence(s) scanned are one block (documents run across "
            "them), so none can go to the scorers without the explainer seeing part of their documents; scan more "
            "with --max-tokens (0 = all), extract with a smaller --heldout (held-out sequences further apart), or "
            "leave out --score."
        )
    train = acts.where(~test)  # all the explainer (and the report's examples) may draw from
    counts = {"train_count": train.counts, "test_count": acts.counts - train.counts}
    features = with_columns(features, {k: dict(enumerate(v.tolist())) for k, v in counts.items()}, _INT64)
    rng = np.random.default_rng(cfg.seed)
    chosen = select_examples(
        train, cfg.top, cfg.quantile_bins, cfg.per_bin, cfg.random_examples, rng, np.flatnonzero(~test)
    )
    if cfg.protocol:
        unique = np.unique(index.token)
        text = dict(zip(unique.tolist(), tokenizer.batch_decode([[int(t)] for t in unique])))
        verdicts, kept = apply_protocol(train, index.token, text, ProtocolSettings(threshold=cfg.threshold))
        features = features.append_column("protocol_passes", verdicts["passes"])
        features = features.append_column("protocol_reason", verdicts["reason"])
        chosen += [
            (latent, "protocol", rank, float(train.act[i]), int(train.row[i]))
            for latent, picks in kept.items()
            for rank, i in enumerate(picks)
        ]
    latents = _eligible(features, cfg)
    features = with_columns(features, {"sampled": {latent: True for latent in latents}}, {"sampled": pa.bool_()})
    plan = ScoringPlan(cfg.score_quantiles, cfg.score_per_quantile, cfg.score_hard, cfg.window, cfg.after)
    tests = select_tests(acts, test, latents, plan, index, cfg.seed)
    layers = _row_layers(acts, s.layers)
    parts = [examples_table(chosen, index, tokenizer, cfg.window, cfg.after, "train", layers)]
    if tests:
        table = examples_table(tests, index, tokenizer, cfg.window, cfg.after, "test", layers)
        for name, column in window_columns(tests, acts, index, tokenizer, cfg.window, cfg.after).items():
            table = table.append_column(name, column)
        parts.append(table)
    examples = pa.concat_tables(parts, promote_options="default")
    return {"features": features, "examples": examples}, acts.n_rows, latents


_INT64 = {"train_count": pa.int64(), "test_count": pa.int64()}


def _with_scores(features: pa.Table, per_feature: dict[tuple[str, bool], dict[int, dict[str, Any]]]) -> pa.Table:
    """features with <scorer>_<metric> columns (the real explanations; the control stays in scores.parquet)."""
    columns: dict[str, dict[int, object]] = {}
    types: dict[str, pa.DataType] = {}
    for (scorer, control), by_latent in per_feature.items():
        if control:
            continue
        for metric in (*METRICS, "n"):
            columns[f"{scorer}_{metric}"] = {latent: m[metric] for latent, m in by_latent.items()}
            types[f"{scorer}_{metric}"] = pa.int32() if metric == "n" else pa.float64()
    return with_columns(features, columns, types)


def _row_layers(acts: Activations, layers: list[int]) -> np.ndarray | None:
    """The model layer each scanned row was routed to (hard-routed RouteSAE), else None."""
    return None if acts.row_layer is None else np.asarray(layers)[acts.row_layer]


def _eligible(features: pa.Table, cfg: InterpretConfig) -> list[int]:
    """A seeded sample of the latents with at least ``min_count`` activations the explainer may see."""
    ok = features["train_count"].to_numpy() >= cfg.min_count
    if cfg.protocol:
        ok &= features["protocol_passes"].to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(ok)
    rng = np.random.default_rng(cfg.seed)
    if not len(candidates):
        return []
    return sorted(int(x) for x in rng.choice(candidates, min(cfg.features, len(candidates)), replace=False))


def _shown(features: pa.Table, explained: dict[int, dict[str, Any]], limit: int) -> list[int]:
    """Explained latents first, then the most frequent active ones, up to ``limit``."""
    counts = features["count"].to_numpy()
    frequent = [int(x) for x in np.argsort(-counts, kind="stable") if counts[x] > 0 and int(x) not in explained]
    return (sorted(explained) + frequent)[: max(limit, len(explained))]
