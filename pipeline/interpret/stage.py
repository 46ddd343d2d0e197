"""`sae-pipe interpret`: feature tables from held-out tokens, LLM explanations, an HTML report.

Outputs (``<cache_root>/interpret/<run>/``):
  features.parquet      one row per latent: latent, count, frequency, mean_act, max_act,
                        q10..q99 (activation quantiles), hist (20-bin histogram over (0, max_act]),
                        top_layer (RouteSAE), protocol_passes / protocol_reason (with --protocol)
  examples.parquet      per latent: kind (top | q0..qN quantile bins | random non-activating), rank,
                        activation, row, token_id, doc, pos, prefix / token / suffix (decoded context),
                        layer (hard-routed RouteSAE: the layer the token was routed to)
For a hard-routed RouteSAE, activations are those of the unscaled input: the SAE encodes w * x (w = the
routing weight), and a / w is the coefficient of the feature in the reconstruction of x itself.
  explanations.parquet  per explained latent: status, category, score, explanation, answer, tokens
  summary.json          counts per category, mean score, interpretable count, tokens and cost
  report.html           the page to look at
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache.contexts import HeldoutIndex
from pipeline.infra.console import Stopwatch, progress_bar, say
from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.explain import AnswerCache, Explainer, ExplainerSettings, api_key_present, summarize
from pipeline.interpret.features import Activations, collect, examples_table, feature_table, select_examples
from pipeline.interpret.protocol import ProtocolSettings, apply_protocol
from pipeline.interpret.report import render_report
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.sae.subject import Subject, load_subject

EXPLAINERS = ("openai", "none")


def interpret(cfg: InterpretConfig) -> dict[str, Any]:
    """Build tables, explanations and the report for one run; return its summary."""
    if cfg.explainer not in EXPLAINERS:
        raise UserError(f"unknown explainer {cfg.explainer!r}; use one of {', '.join(EXPLAINERS)}.")
    if not cfg.run:
        raise UserError("no run given: pass a run folder printed by `sae-pipe fit`.")
    if cfg.batch_size < 1 or cfg.max_tokens < 0:
        raise UserError("--batch-size must be at least 1 and --max-tokens not negative (0 = all held-out tokens).")
    clock = Stopwatch()
    subject = load_subject(cfg.run, resolve_device(cfg.device), cfg.cache or None)
    subject.check_infer_k(cfg.infer_k)
    out = Folder.at(cfg.out) if cfg.out else Folder.at(cfg.cache_root).child("interpret", subject.folder.name)
    out.makedirs()
    tables, scanned = build_tables(subject, cfg)
    for name, table in tables.items():
        pq.write_table(table, out.local() / f"{name}.parquet")
    summary: dict[str, Any] = {
        "run": subject.folder.name,
        "tokens_scanned": scanned,
        "latents": tables["features"].num_rows,
        "active_latents": int(np.count_nonzero(tables["features"]["count"].to_numpy())),
        "examples": tables["examples"].num_rows,
    }
    records = _explain(tables, cfg, out)
    summary.update({"explanations": "skipped"} if records is None else summarize(records, cfg.model))
    summary["seconds"] = round(clock.seconds, 1)
    out.write_json(summary, "summary.json")
    explained = {r["latent"]: r for r in records or [] if r.get("category")}
    html = render_report(
        f"Features of {subject.folder.name}",
        summary,
        tables["features"],
        tables["examples"],
        explained,
        _shown(tables["features"], explained, cfg.report_features),
    )
    out.write_bytes(html.encode(), "report.html")
    say(f"interpreted {subject.folder.name}: {summary['active_latents']:,} active latents")
    say(f"report: {out.path('report.html')}")
    return {**summary, "out": out.url}


def build_tables(s: Subject, cfg: InterpretConfig) -> tuple[dict[str, pa.Table], int]:
    """features and examples tables (with protocol verdicts when asked); also the rows scanned."""
    spec = s.cache.manifest["spec"]["model"]
    tokenizer = load_tokenizer(resolve_model(spec["name"], spec.get("revision")))
    with progress_bar("interpret", min(cfg.max_tokens or s.cache.rows("heldout"), s.cache.rows("heldout"))) as bar:
        acts = collect(
            s.sae, s.layers, s.is_route, s.cache, cfg.max_tokens, cfg.batch_size, cfg.infer_k, cfg.theta, bar
        )
    features = feature_table(acts, s.layers if s.is_route else None)
    index = HeldoutIndex.load(s.cache, acts.n_rows)
    rng = np.random.default_rng(cfg.seed)
    chosen = select_examples(acts, cfg.top, cfg.quantile_bins, cfg.per_bin, cfg.random_examples, rng)
    if cfg.protocol:
        unique = np.unique(index.token)
        text = dict(zip(unique.tolist(), tokenizer.batch_decode([[int(t)] for t in unique])))
        verdicts, kept = apply_protocol(acts, index.token, text, ProtocolSettings(threshold=cfg.threshold))
        features = features.append_column("protocol_passes", verdicts["passes"])
        features = features.append_column("protocol_reason", verdicts["reason"])
        chosen += [
            (latent, "protocol", rank, float(acts.act[i]), int(acts.row[i]))
            for latent, picks in kept.items()
            for rank, i in enumerate(picks)
        ]
    return {
        "features": features,
        "examples": examples_table(chosen, index, tokenizer, cfg.window, cfg.after, _row_layers(acts, s.layers)),
    }, acts.n_rows


def _row_layers(acts: Activations, layers: list[int]) -> np.ndarray | None:
    """The model layer each scanned row was routed to (hard-routed RouteSAE), else None."""
    return None if acts.row_layer is None else np.asarray(layers)[acts.row_layer]


def _explain(tables: dict[str, pa.Table], cfg: InterpretConfig, out: Folder) -> list[dict[str, Any]] | None:
    """Explain a seeded sample of eligible latents: their records ([] when none is eligible), None when
    explanations are skipped."""
    if cfg.explainer == "none":
        say("explanations skipped (--explainer none)")
        return None
    latents = _eligible(tables["features"], cfg)
    if not api_key_present():
        say(
            f"explanations skipped: OPENAI_API_KEY is not set. Set it (and OPENAI_BASE_URL for another "
            f"OpenAI-compatible server) and re-run to explain {len(latents)} features; tables and report are written."
        )
        return None
    if not latents:
        say(f"[yellow]no latent fired at least {cfg.min_count} times (--min-count); nothing to explain.[/]")
        return []
    settings = ExplainerSettings(model=cfg.model, concurrency=cfg.concurrency, max_retries=cfg.max_retries)
    explainer = Explainer(settings, AnswerCache(Folder.at(cfg.cache_root).child("interpret", ".answers")))
    items = _prompt_examples(tables["examples"], latents, "protocol" if cfg.protocol else None)
    with progress_bar("explain", len(items), unit="feature") as bar:
        records = explainer.explain_all(items, lambda: bar.advance(0, 1))
    columns = [
        "latent",
        "status",
        "category",
        "score",
        "explanation",
        "answer",
        "error",
        "cached",
        "prompt_tokens",
        "completion_tokens",
    ]
    pq.write_table(
        pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]), out.local() / "explanations.parquet"
    )
    if explainer.stopped:
        missing = sum(1 for r in records if r["status"] in ("failed", "not sent"))
        say(
            f"[yellow]explainer stopped: {explainer.stopped}. {missing} feature(s) have no explanation; "
            "every answer received is cached, so a re-run asks only for the missing ones.[/]"
        )
    return records


def _prompt_examples(
    examples: pa.Table, latents: list[int], kind: str | None, limit: int = 20
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Per latent, the examples shown to the explainer: protocol contexts, or top and sampled ones."""
    grouped: dict[int, list[dict[str, Any]]] = {latent: [] for latent in latents}
    for example in examples.filter(pc.is_in(examples["latent"], pa.array(latents, pa.int32()))).to_pylist():
        if (example["kind"] == kind) if kind else example["kind"] != "random":
            grouped[example["latent"]].append(example)
    return [(latent, grouped[latent][:limit]) for latent in latents]


def _eligible(features: pa.Table, cfg: InterpretConfig) -> list[int]:
    counts = features["count"].to_numpy()
    ok = counts >= cfg.min_count
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
