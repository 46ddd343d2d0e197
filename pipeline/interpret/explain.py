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
    """(category, score, explanation) from an answer: one JSON object, or the paper's line format
    ("Category: ...", "Score: ...", "Explanation: ..."); None when it is malformed.

    Strict where leniency would invent an answer: a category line that lists several (an echo of the
    prompt's template) is malformed, a score must be a whole number 1-5 as given (1.5 is malformed, not 1),
    and an explanation that carries JSON syntax (a trailing ``",}``, a key) is malformed."""
    data = _json_object(text)
    if data is None:
        data = _line_format(text)
    if data is None:
        return None
    category, score = data.get("category"), _score(data.get("score"))
    explanation = data.get("explanation")
    category = category.strip().rstrip(".").lower() if isinstance(category, str) else None
    if category not in CATEGORIES or score is None:
        return None
    if not isinstance(explanation, str) or not explanation.strip() or _JSON_SYNTAX.search(explanation):
        return None
    return {"category": category, "score": score, "explanation": explanation.strip()}


_KEY_LINE = re.compile(r'^[\s{"\'*#-]*(?:feature\s+)?(category|score|explanation)["\'*]*\s*[:=]\s*(.*?)\s*$', re.I)
_JSON_SYNTAX = re.compile(r'[,{}]\s*$|"(category|score|explanation)"\s*:|<one sentence>')  # leftovers, template
_SCORE = re.compile(r"([1-5])(?:\s*/\s*5)?")


def _json_object(text: str) -> dict[str, Any] | None:
    """The answer's JSON object (a trailing comma before } or ] forgiven: it changes no value), else None."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    for candidate in (match.group(0), re.sub(r",\s*([}\]])", r"\1", match.group(0))):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        return data if isinstance(data, dict) else None
    return None


def _line_format(text: str) -> dict[str, Any] | None:
    """{key: value} from "key: value" lines; None when a value is not one plain value (a JSON string with
    more after it than a comma or a brace, as in a template echo) or a key is given twice, differently."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if not match:
            continue
        key, raw = match.group(1).lower(), match.group(2)
        value: str | None = raw.rstrip(",").strip(" *")  # "**Score:** 4" in markdown
        if raw.startswith('"'):
            try:
                value, end = json.JSONDecoder().raw_decode(raw)
            except ValueError:
                return None
            if raw[end:].strip() not in ("", ",", "}", ",}"):
                return None  # '"low-level" | "high-level" | ...': several values, not one
        if key in found and found[key] != value:
            return None
        found[key] = value
    return found or None


def _score(value: Any) -> int | None:
    """A whole number 1-5 as given (4, 4.0, "4", "4/5"); None for anything else (1.5, true, "1-5")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() and 1 <= value <= 5 else None
    match = _SCORE.fullmatch(value.strip().rstrip(".")) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def usable(_: int, text: str) -> bool:
    """Whether an explainer answer parses (the chat client caches only those)."""
    return parse_answer(text) is not None


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
        replies = self.client.ask_all(self.requests(items), on_done, usable)
        return [_record(latent, reply) for (latent, _), reply in zip(items, replies)]


def _record(latent: int, reply: dict[str, Any]) -> dict[str, Any]:
    """status: ok | malformed | failed | not sent; cached: whether the answer came from the answer cache
    (a malformed one never does: it is asked again)."""
    base = {
        "latent": latent,
        "cached": reply["cached"],
        "prompt_tokens": reply.get("prompt_tokens", 0),
        "completion_tokens": reply.get("completion_tokens", 0),
    }
    if reply["status"] in ("failed", "not sent"):
        return {**base, "status": reply["status"], "error": reply["error"]}
    parsed = parse_answer(reply["text"])
    return {**base, "status": "ok" if parsed else "malformed", "answer": reply["text"], **(parsed or {})}


def summarize(records: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Counts per category, mean score, interpretable count (score >= 4, not undiscernible), spend, and what
    happened to the requests on this run: features_asked = requests_sent (answered by the server now, malformed
    ones included) + from_cache + failed + not_sent."""
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
        "requests_sent": sum(r["status"] in ("ok", "malformed") and not r["cached"] for r in records),
        "from_cache": sum(bool(r["cached"]) for r in records),
        "malformed": sum(r["status"] == "malformed" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "not_sent": sum(r["status"] == "not sent" for r in records),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": None if cost is None else round(cost, 6),
    }
