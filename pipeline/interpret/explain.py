"""Asking an LLM (GPT-4o by default, official `openai` client) what a feature means.

The protocol follows the RouteSAE paper: each feature is classified as low-level, high-level or
undiscernible and scored 1-5 for monosemanticity. Requests go through :mod:`pipeline.infra.chat`
(retries, answer cache, cost estimate and cap; the key never leaves the environment).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pipeline.infra.chat import ChatClient, Messages, usd

CATEGORIES = ("low-level", "high-level", "undiscernible")

SYSTEM = (
    "You interpret features of a sparse autoencoder trained on the hidden states of a language model. "
    "Reply with one JSON object and nothing else."
)
INSTRUCTIONS = """Below are text excerpts where one feature of the autoencoder is active. In each excerpt the \
token on which the feature fires is wrapped in [[ ]], and the feature's activation there is given (higher = stronger).

Classify the feature as one of:
- low-level: tied to particular words or word senses (one token, a word in one meaning, a narrow family of words)
- high-level: tied to longer-range structure or an abstract pattern (enumerations, a role in a sentence or argument)
- undiscernible: no consistent pattern, noise

Rate its monosemanticity from 1 to 5:
5 = one clear pattern, no exceptions; 4 = a clear pattern with one or two exceptions; 3 = a clear overall pattern \
with many exceptions; 2 = only a loose common theme; 1 = no pattern.

Excerpts:
{excerpts}

Reply with JSON: {{"category": "low-level" | "high-level" | "undiscernible", "score": 1-5, \
"explanation": "<one sentence>"}}"""


def build_messages(examples: list[dict[str, Any]]) -> Messages:
    """Chat messages for one feature; examples carry prefix, token, suffix and activation."""
    lines = [
        f"{i}. (activation {e['activation']:.2f}) {_clean(e['prefix'])}[[{_clean(e['token'])}]]{_clean(e['suffix'])}"
        for i, e in enumerate(examples, 1)
    ]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTIONS.format(excerpts="\n".join(lines))},
    ]


def _clean(text: str) -> str:
    return " ".join(text.replace("[[", "[").replace("]]", "]").split()) if text.strip() else text.strip()


def parse_answer(text: str) -> dict[str, Any] | None:
    """(category, score, explanation) from an answer, JSON or the paper's line format; None if malformed."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    data: dict[str, Any] = {}
    if match:
        try:
            data = json.loads(match.group(0))
        except ValueError:
            data = {}
    if not data:
        patterns = {
            "category": r"category\W*(low-level|high-level|undiscernible)",
            "score": r"score\W*([1-5])",
            "explanation": r"explanation\W*(.+)",
        }
        found = {key: re.search(pattern, text, re.IGNORECASE) for key, pattern in patterns.items()}
        data = {key: m.group(1) for key, m in found.items() if m}
    category = str(data.get("category") or "").strip().lower()
    try:
        score = int(str(data.get("score")).strip())
    except ValueError:
        return None
    if category not in CATEGORIES or not 1 <= score <= 5:
        return None
    return {"category": category, "score": score, "explanation": str(data.get("explanation") or "").strip()}


class Explainer:
    """Explains features through the shared chat client (cached, retried, cost-capped)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    @staticmethod
    def requests(items: list[tuple[int, list[dict[str, Any]]]]) -> list[Messages]:
        return [build_messages(examples) for _, examples in items]

    def explain_all(
        self, items: list[tuple[int, list[dict[str, Any]]]], on_done: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """One record per (latent, examples), in order; ``on_done`` is called as each finishes."""
        replies = self.client.ask_all(self.requests(items), on_done)
        return [_record(latent, reply) for (latent, _), reply in zip(items, replies)]


def _record(latent: int, reply: dict[str, Any]) -> dict[str, Any]:
    if reply["status"] in ("failed", "not sent"):
        return {"latent": latent, "status": reply["status"], "error": reply["error"]}
    parsed = parse_answer(reply["text"])
    record = {
        "latent": latent,
        "status": reply["status"] if parsed else "malformed",
        "answer": reply["text"],
        "cached": reply["cached"],
        "prompt_tokens": reply["prompt_tokens"],
        "completion_tokens": reply["completion_tokens"],
    }
    return {**record, **(parsed or {})}


def summarize(records: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Counts per category, mean score, interpretable count (score >= 4, not undiscernible), spend."""
    parsed = [r for r in records if r.get("category")]
    prompt = sum(r.get("prompt_tokens", 0) for r in records)
    completion = sum(r.get("completion_tokens", 0) for r in records)
    cost = usd(model, prompt, completion)
    return {
        "explainer_model": model,
        "features_asked": len(records),
        "explained": len(parsed),
        "per_category": {c: sum(r["category"] == c for r in parsed) for c in CATEGORIES},
        "mean_score": sum(r["score"] for r in parsed) / len(parsed) if parsed else None,
        "interpretable": sum(r["score"] >= 4 and r["category"] != "undiscernible" for r in parsed),
        "requests_sent": sum(r["status"] in ("ok", "malformed") and not r.get("cached") for r in records),
        "from_cache": sum(bool(r.get("cached")) for r in records),
        "malformed": sum(r["status"] == "malformed" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "not_sent": sum(r["status"] == "not sent" for r in records),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": None if cost is None else round(cost, 6),
    }
