"""Asking an LLM (GPT-4o by default, official `openai` client) what a feature means.

The protocol follows the RouteSAE paper: each feature is classified as low-level, high-level or
undiscernible and scored 1-5 for monosemanticity. Key and base URL come from the standard
environment variables (OPENAI_API_KEY, OPENAI_BASE_URL), so any OpenAI-compatible server works.
Every answer is cached on disk under a hash of (model, prompt): a re-run pays nothing twice.
The key is never printed, logged or written; API errors are recorded by type and status only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.infra.files import Folder

CATEGORIES = ("low-level", "high-level", "undiscernible")
# USD per million (input, output) tokens, OpenAI list prices for these models.
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60)}
STOP_AFTER_FAILURES = 3  # consecutive features whose request failed after all retries: stop asking

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


@dataclass
class ExplainerSettings:
    """How the explainer is called."""

    model: str = "gpt-4o"  # chat model name
    concurrency: int = 4  # requests in flight
    max_retries: int = 4  # per request, with exponential backoff (429, 5xx, timeouts)
    timeout: float = 60.0  # seconds per request
    temperature: float = 0.1  # as in the RouteSAE protocol
    max_answer_tokens: int = 200  # completion budget per feature


def build_messages(examples: list[dict[str, Any]]) -> list[dict[str, str]]:
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


class AnswerCache:
    """One JSON file per (model, messages) hash; written atomically, safe across threads and runs."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    @staticmethod
    def key(model: str, messages: list[dict[str, str]]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.folder.read_json(f"{key}.json") if self.folder.exists(f"{key}.json") else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.folder.write_json(value, f"{key}.json")


def api_key_present() -> bool:
    return bool(os.environ.get("OPENAI_API_KEY"))


class Explainer:
    """Explains features concurrently, from the answer cache when possible."""

    def __init__(self, settings: ExplainerSettings, cache: AnswerCache) -> None:
        import openai

        self.s, self.cache = settings, cache
        self.client = openai.OpenAI(max_retries=settings.max_retries, timeout=settings.timeout)
        self._lock = threading.Lock()
        self._failures = 0
        self.stopped: str | None = None  # why no more requests are sent

    def explain_all(
        self, items: list[tuple[int, list[dict[str, Any]]]], on_done: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """One record per (latent, examples), in order; ``on_done`` is called as each finishes."""
        with ThreadPoolExecutor(max(1, self.s.concurrency)) as pool:
            futures = [pool.submit(self._one, item) for item in items]
            records = []
            for future in futures:
                records.append(future.result())
                if on_done is not None:
                    on_done()
            return records

    def _one(self, item: tuple[int, list[dict[str, Any]]]) -> dict[str, Any]:
        latent, examples = item
        messages = build_messages(examples)
        key = AnswerCache.key(self.s.model, messages)
        cached = self.cache.get(key)
        if cached is not None:
            return _record(latent, cached, cached=True)
        if self.stopped:
            return {"latent": latent, "status": "not sent", "error": self.stopped}
        try:
            answer = self._ask(messages)
        except Exception as err:  # noqa: BLE001 - recorded by type and status only (messages may echo the key)
            return {"latent": latent, "status": "failed", "error": self._failed(err)}
        self.cache.put(key, answer)
        with self._lock:
            self._failures = 0
        return _record(latent, answer, cached=False)

    def _ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        response = self.client.chat.completions.create(
            model=self.s.model,
            messages=messages,  # type: ignore[arg-type]
            temperature=self.s.temperature,
            max_tokens=self.s.max_answer_tokens,
        )
        usage = response.usage
        return {
            "text": response.choices[0].message.content or "",
            "model": self.s.model,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        }

    def _failed(self, err: Exception) -> str:
        import openai

        status = getattr(err, "status_code", None)
        what = f"{type(err).__name__}" + (f" (HTTP {status})" if status else "")
        with self._lock:
            self._failures += 1
            if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
                self.stopped = f"the API refused the key: {what}"
            elif self._failures >= STOP_AFTER_FAILURES:
                self.stopped = f"{self._failures} features in a row failed after all retries, last: {what}"
        return what


def _record(latent: int, answer: dict[str, Any], cached: bool) -> dict[str, Any]:
    parsed = parse_answer(answer["text"])
    record = {
        "latent": latent,
        "status": ("cached" if cached else "ok") if parsed else "malformed",
        "answer": answer["text"],
        "cached": cached,
        "prompt_tokens": 0 if cached else answer.get("prompt_tokens", 0),
        "completion_tokens": 0 if cached else answer.get("completion_tokens", 0),
    }
    return {**record, **(parsed or {})}


def summarize(records: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Counts per category, mean score, interpretable count (score >= 4, not undiscernible), spend."""
    parsed = [r for r in records if r.get("category")]
    prompt = sum(r.get("prompt_tokens", 0) for r in records)
    completion = sum(r.get("completion_tokens", 0) for r in records)
    price = PRICES.get(model)
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
        "cost_usd": round(prompt * price[0] / 1e6 + completion * price[1] / 1e6, 6) if price else None,
    }
