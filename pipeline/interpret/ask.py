"""The paid part of `interpret`: explain the sampled features, then score the explanations.

Both go through one answer cache and one :class:`Budget`. Before anything is sent (and before any
file is written) the cost of every uncached request is estimated and printed; above ``--max-cost`` the
run stops there. Scorer prompts depend on the explanations, so their estimate uses a sentence-long
placeholder explanation for every sampled feature (an upper bound, like the answers counted at their
token limit).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.infra.chat import AnswerCache, Budget, ChatClient, ClientSettings, Estimate, api_key_present
from pipeline.infra.console import progress_bar, say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.explain import Explainer, usable
from pipeline.interpret.score import Batch, ScoreSettings, build_batches, run_scorer
from pipeline.interpret.score import usable as usable_verdicts
from pipeline.interpret.stats import score_features, summarize_scores

PLACEHOLDER = "x" * 150  # a one-sentence explanation, for estimating scorer prompts before explanations exist
EXPLANATION_COLUMNS = ["latent", "status", "category", "score", "explanation", "answer", "error", "cached"]
TOKEN_COLUMNS = ["prompt_tokens", "completion_tokens"]
PerFeature = dict[tuple[str, bool], dict[int, dict[str, Any]]]


class Asker:
    """The explainer and scorer clients of one run, sharing the answer cache and the budget."""

    def __init__(self, cfg: InterpretConfig, tables: dict[str, pa.Table], latents: list[int]) -> None:
        self.cfg, self.tables, self.latents = cfg, tables, latents
        cache = AnswerCache(Layout(cfg.cache_root).answers("interpret"))
        budget = Budget(cfg.max_cost)
        explainer = ClientSettings(cfg.explainer_model, cfg.base_url, cfg.concurrency, cfg.max_retries, cfg.timeout)
        self.explainer = ChatClient(explainer, cache, budget)
        scorer = ClientSettings(
            cfg.scorer_model,
            cfg.scorer_base_url or cfg.base_url,
            cfg.concurrency,
            cfg.max_retries,
            cfg.timeout,
            temperature=0.0,  # the verdict the scorer thinks most likely
            max_answer_tokens=10 + 4 * cfg.score_batch,  # "[1, 0, ...]" and a little slack
            logprobs=cfg.logprobs,
        )
        self.scorer = ChatClient(scorer, cache, budget)
        self.items = _prompt_examples(tables["examples"], latents, "protocol" if cfg.protocol else None)
        self.score_settings = ScoreSettings(cfg.score_batch, cfg.fuzz_threshold, cfg.control, cfg.seed)

    @property
    def active(self) -> bool:
        return self.cfg.explainer != "none" and api_key_present()

    def check_cost(self) -> None:
        """Print the estimate of every uncached request; stop here when it is above --max-cost."""
        if self.cfg.explainer == "none" or not self.latents:
            return
        estimates = [self.explainer.estimate(Explainer.requests(self.items), usable)]
        if self.cfg.score:
            batches = self._batches(dict.fromkeys(self.latents, PLACEHOLDER))
            estimates.append(self.scorer.estimate([b.messages for b in batches], usable_verdicts(batches)))
        for what, estimate in zip(("explain", "score"), estimates):
            say(estimate.line(f"cost estimate, {what}"))
        total = sum(e.usd or 0.0 for e in estimates)
        unpriced = sorted({e.model for e in estimates if e.usd is None})
        if len(estimates) > 1:
            say(f"cost estimate, total: ${total:.4f}" + (f" plus {', '.join(unpriced)}" if unpriced else ""))
        if self.active and self.cfg.max_cost > 0:
            if unpriced:
                say(f"[yellow]--max-cost cannot limit {', '.join(unpriced)}: no list price for it.[/]")
            if total > self.cfg.max_cost:
                raise UserError(
                    f"the estimated cost ${total:.4f} is above --max-cost ${self.cfg.max_cost:g}; nothing was sent. "
                    "Raise --max-cost, or lower --features or --score-per-quantile, or use cheaper models."
                )

    def explain(self, out: Folder) -> list[dict[str, Any]] | None:
        """Records of the sampled latents ([] when none is eligible), None when explanations are skipped."""
        if self.cfg.explainer == "none":
            say("explanations skipped (--explainer none)")
            return None
        if not api_key_present():
            say(
                f"explanations and scores skipped: OPENAI_API_KEY is not set. Set it (and OPENAI_BASE_URL or "
                f"--base-url for another OpenAI-compatible server) and re-run to explain {len(self.latents)} "
                "features; tables and report are written."
            )
            return None
        if not self.latents:
            say(f"[yellow]no latent fired at least {self.cfg.min_count} times (--min-count); nothing to explain.[/]")
            return []
        with progress_bar("explain", len(self.items), unit="feature") as bar:
            records = Explainer(self.explainer).explain_all(self.items, lambda: bar.advance(0, 1))
        table = pa.Table.from_pylist([{c: r.get(c) for c in EXPLANATION_COLUMNS + TOKEN_COLUMNS} for r in records])
        pq.write_table(table, out.local() / "explanations.parquet")
        _said_stopped("explainer", self.explainer, sum(r["status"] in ("failed", "not sent") for r in records))
        _said_malformed(
            "explainer",
            self.cfg.explainer_model,
            [r["status"] for r in records],
            "a larger --explainer-model, or one that follows the line format "
            "(Category: ..., Score: 1-5, Explanation: ...)",
        )
        return records

    def score(self, records: list[dict[str, Any]] | None, out: Folder) -> tuple[dict[str, Any], PerFeature]:
        """Summary entries of the scores (``scores``: per scorer, or why skipped) and per-feature metrics."""
        if not self.cfg.score:
            return {}, {}
        if records is None:
            return {"scores": "skipped"}, {}
        explained = {r["latent"]: r["explanation"] for r in records if r.get("category") and r.get("explanation")}
        batches = self._batches(explained)
        with progress_bar("score", len(batches), unit="prompt") as bar:
            verdicts = run_scorer(self.scorer, batches, lambda: bar.advance(0, 1))
        pq.write_table(pa.Table.from_pylist(verdicts, schema=_SCORES_SCHEMA), out.local() / "scores.parquet")
        prompts = list({r["batch"]: r for r in verdicts}.values())  # one record per prompt
        statuses = [r["status"] for r in prompts]
        _said_stopped("scorer", self.scorer, sum(s in ("failed", "not sent") for s in statuses))
        _said_malformed(
            "scorer", self.cfg.scorer_model, statuses, "a larger --scorer-model that can write a JSON list of 0/1"
        )
        per_feature = score_features(verdicts)
        spent = Estimate(
            self.cfg.scorer_model,
            len(prompts),
            sum(r["cached"] for r in prompts),
            sum(r["prompt_tokens"] for r in verdicts),
            sum(r["completion_tokens"] for r in verdicts),
        )
        return {
            "scores": summarize_scores(per_feature, self.cfg.bootstrap, self.cfg.seed),
            "scorer_model": self.cfg.scorer_model,
            "scorer_prompts": len(prompts),  # = sent + from cache + failed + not sent, on this run
            "scorer_requests_sent": sum(r["status"] in ("ok", "malformed") and not r["cached"] for r in prompts),
            "scorer_from_cache": spent.cached,
            "scorer_malformed": statuses.count("malformed"),
            "scorer_failed": statuses.count("failed"),
            "scorer_not_sent": statuses.count("not sent"),
            "scorer_prompt_tokens": spent.prompt_tokens,
            "scorer_completion_tokens": spent.completion_tokens,
            "scorer_cost_usd": None if spent.usd is None else round(spent.usd, 6),
        }, per_feature

    def _batches(self, explanations: dict[int, str]) -> list[Batch]:
        examples = self.tables["examples"]
        test = examples.filter(pc.equal(examples["split"], "test")).to_pylist()
        tests: dict[int, list[dict[str, Any]]] = {}
        for example in test:
            tests.setdefault(example["latent"], []).append(example)
        features = self.tables["features"]
        max_acts = dict(zip(features["latent"].to_pylist(), features["max_act"].to_pylist()))
        return [
            b
            for scorer in self.cfg.score
            for b in build_batches(scorer, explanations, tests, max_acts, self.score_settings)
        ]


_SCORES_SCHEMA = pa.schema(
    [
        ("scorer", pa.string()),
        ("latent", pa.int32()),
        ("explained_by", pa.int32()),
        ("control", pa.bool_()),
        ("batch", pa.int32()),
        ("row", pa.int64()),
        ("sequence", pa.int64()),
        ("kind", pa.string()),
        ("label", pa.int8()),
        ("marked", pa.list_(pa.int32())),
        ("verdict", pa.int8()),
        ("prob", pa.float32()),
        ("status", pa.string()),
        ("cached", pa.bool_()),
        ("answer", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)


def _said_stopped(who: str, client: ChatClient, missing: int) -> None:
    if client.stopped:
        say(
            f"[yellow]{who} stopped: {client.stopped}. {missing} request(s) have no answer; every answer received "
            "is cached, so a re-run asks only for the missing ones.[/]"
        )


def _said_malformed(who: str, model: str, statuses: list[str], what_to_try: str) -> None:
    """One line when most answers of this run could not be parsed: the model is not following the format."""
    answered = sum(s in ("ok", "malformed") for s in statuses)
    malformed = statuses.count("malformed")
    if answered and 2 * malformed > answered:
        say(
            f"[yellow]{malformed} of {answered} {who} answers from {model} were malformed (not in the asked format), "
            f"so they count for nothing and are asked again on a re-run; try {what_to_try}.[/]"
        )


def _prompt_examples(
    examples: pa.Table, latents: list[int], kind: str | None, limit: int = 20
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Per latent, the examples shown to the explainer (train split only): protocol contexts, or top and
    sampled ones."""
    grouped: dict[int, list[dict[str, Any]]] = {latent: [] for latent in latents}
    mine = pc.and_(pc.is_in(examples["latent"], pa.array(latents, pa.int32())), pc.equal(examples["split"], "train"))
    for example in examples.filter(mine).to_pylist():
        if (example["kind"] == kind) if kind else example["kind"] != "random":
            grouped[example["latent"]].append(example)
    return [(latent, grouped[latent][:limit]) for latent in latents]
