"""The one chat client of sae-pipe: `interpret`'s explainer and scorers and `steer`'s judge talk through it.

Official `openai` package; key from OPENAI_API_KEY, server from ``base_url`` or OPENAI_BASE_URL, so any
OpenAI-compatible server (vLLM, llama.cpp's server) works. The client retries 429, 5xx and timeouts with
backoff; every answer is cached on disk under a hash of the full request body (model, messages,
temperature, token limit, log-probability options), so a re-run pays nothing twice. A caller can give
``accept`` (is this answer usable, e.g. parseable?): an answer it refuses is returned but not cached, and a
cached one it refuses is asked again, so a re-run re-asks exactly what could not be used. Before the first
request the caller gets an estimate of what the uncached requests cost; a shared :class:`Budget` stops
sending once the spend reaches ``--max-cost``. The key is never printed, logged or written; API errors
are recorded by type and status only (their messages may echo it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder

# USD per million (input, output) tokens: OpenAI's list prices (platform.openai.com/docs/pricing).
PRICES = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English: the estimate needs no tokenizer
TOKENS_PER_MESSAGE = 4  # chat-format overhead per message
STOP_AFTER_FAILURES = 3  # consecutive requests that failed after all retries: stop asking
TOP_LOGPROBS = 5  # alternatives per answer token when log-probabilities are asked for

Messages = list[dict[str, str]]
Accept = Callable[[int, str], bool]  # (index of the request, answer text) -> usable


@dataclass
class ClientSettings:
    """How one model is called (its name comes from the caller's config: interpret's explainer and scorer,
    steer's judge)."""

    model: str  # chat model name
    base_url: str = ""  # OpenAI-compatible server ("" = OPENAI_BASE_URL or api.openai.com)
    concurrency: int = 4  # requests in flight
    max_retries: int = 4  # per request, with exponential backoff (429, 5xx, timeouts)
    timeout: float = 60.0  # seconds per request
    temperature: float = 0.1  # the RouteSAE protocol's explainer temperature
    max_answer_tokens: int = 200  # completion budget per request
    logprobs: bool = False  # ask for the answer tokens' log-probabilities

    def __post_init__(self) -> None:
        if self.base_url and not re.match(r"https?://[^/\s]", self.base_url):  # else: retries, then a vague failure
            raise UserError(
                f"base URL {self.base_url!r} is not an http(s):// address; give the server's, e.g. "
                "http://127.0.0.1:8080/v1."
            )


def api_key_present() -> bool:
    return bool(os.environ.get("OPENAI_API_KEY"))


def usd(model: str, prompt_tokens: float, completion_tokens: float) -> float | None:
    """What the tokens cost at ``model``'s list price; None for a model without one (a local server)."""
    price = PRICES.get(model)
    return None if price is None else (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


class AnswerCache:
    """One JSON file per request hash; written atomically, safe across threads and runs."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    @staticmethod
    def key(body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.folder.read_json(f"{key}.json") if self.folder.exists(f"{key}.json") else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.folder.write_json(value, f"{key}.json")


@dataclass
class Budget:
    """Spend shared by every client of a run; no request is sent once it reaches ``cap`` (0 = no cap)."""

    cap: float = 0.0
    spent: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, amount: float | None) -> None:
        with self.lock:
            self.spent += amount or 0.0

    @property
    def exhausted(self) -> bool:
        return self.cap > 0 and self.spent >= self.cap


@dataclass
class Estimate:
    """What a list of requests would cost: answers counted at their token limit, so an upper bound."""

    model: str
    requests: int
    cached: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def usd(self) -> float | None:
        return usd(self.model, self.prompt_tokens, self.completion_tokens)

    def line(self, what: str) -> str:
        price = PRICES.get(self.model)
        cost = (
            f"${self.usd:.4f} at ${price[0]:.2f} / ${price[1]:.2f} per million tokens"
            if price and self.usd is not None
            else "cost unknown (no list price for this model)"
        )
        return (
            f"{what}: {self.requests - self.cached:,} request(s) to {self.model} ({self.cached:,} cached), "
            f"~{self.prompt_tokens:,} input + <= {self.completion_tokens:,} output tokens, {cost}"
        )


class ChatClient:
    """Sends chat requests concurrently, from the answer cache when possible."""

    def __init__(self, settings: ClientSettings, cache: AnswerCache, budget: Budget | None = None) -> None:
        self.s, self.cache, self.budget = settings, cache, budget or Budget()
        self._client: Any = None
        self._lock = threading.Lock()
        self._failures = 0
        self.stopped: str | None = None  # why no more requests are sent

    def body(self, messages: Messages) -> dict[str, Any]:
        """The full request body: what is sent, and what the cache is keyed by."""
        body: dict[str, Any] = {
            "model": self.s.model,
            "messages": messages,
            "temperature": self.s.temperature,
            "max_tokens": self.s.max_answer_tokens,
        }
        if self.s.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def estimate(self, requests: list[Messages], accept: Accept | None = None) -> Estimate:
        """Tokens and cost of the requests without a usable cached answer; sends nothing."""
        fresh = [m for i, m in enumerate(requests) if self._cached(AnswerCache.key(self.body(m)), i, accept) is None]
        prompt = sum(
            TOKENS_PER_MESSAGE * len(m) + math.ceil(sum(len(x["content"]) for x in m) / CHARS_PER_TOKEN) for m in fresh
        )
        completion = len(fresh) * self.s.max_answer_tokens
        return Estimate(self.s.model, len(requests), len(requests) - len(fresh), prompt, completion)

    def ask_all(
        self, requests: list[Messages], on_done: Callable[[], None] | None = None, accept: Accept | None = None
    ) -> list[dict[str, Any]]:
        """One reply per request, in order: text, logprobs, cached, prompt_tokens, completion_tokens, status
        (ok | cached | failed | not sent) and error; ``on_done`` is called as each finishes. Answers that
        ``accept`` refuses are neither cached nor taken from the cache."""
        with ThreadPoolExecutor(max(1, self.s.concurrency)) as pool:
            futures = [pool.submit(self._one, messages, i, accept) for i, messages in enumerate(requests)]
            replies = []
            for future in futures:
                replies.append(future.result())
                if on_done is not None:
                    on_done()
            return replies

    def _cached(self, key: str, index: int, accept: Accept | None) -> dict[str, Any] | None:
        """The cached answer of a request when there is one and ``accept`` takes it."""
        cached = self.cache.get(key)
        if cached is None or (accept is not None and not accept(index, cached.get("text", ""))):
            return None
        return cached

    def _one(self, messages: Messages, index: int, accept: Accept | None) -> dict[str, Any]:
        body = self.body(messages)
        key = AnswerCache.key(body)
        cached = self._cached(key, index, accept)
        if cached is not None:
            return {**cached, "status": "cached", "cached": True, "prompt_tokens": 0, "completion_tokens": 0}
        if self.budget.exhausted and not self.stopped:
            self.stopped = f"the spend reached --max-cost (${self.budget.cap:g})"
        if self.stopped:
            return {"status": "not sent", "error": self.stopped, "cached": False}
        try:
            answer = self._send(body)
        except Exception as err:  # noqa: BLE001 - recorded by type and status only (messages may echo the key)
            return {"status": "failed", "error": self._failed(err), "cached": False}
        if accept is None or accept(index, answer["text"]):
            self.cache.put(key, answer)
        self.budget.add(usd(self.s.model, answer["prompt_tokens"], answer["completion_tokens"]))
        with self._lock:
            self._failures = 0
        return {**answer, "status": "ok", "cached": False}

    def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import openai

                    self._client = openai.OpenAI(
                        base_url=self.s.base_url or None, max_retries=self.s.max_retries, timeout=self.s.timeout
                    )
        response = self._client.chat.completions.create(**body)
        choice, usage = response.choices[0], response.usage
        return {
            "text": choice.message.content or "",
            "model": self.s.model,
            "logprobs": _logprobs(choice),
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
                self.stopped = f"{self._failures} requests in a row failed after all retries, last: {what}"
        return what


def _logprobs(choice: Any) -> list[dict[str, Any]] | None:
    """Per answer token: its text and its top alternatives {token: logprob}; None when not returned."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [{"token": t.token, "top": {a.token: a.logprob for a in (t.top_logprobs or [])}} for t in content]
