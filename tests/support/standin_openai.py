"""A stand-in OpenAI-compatible chat server on loopback: canned answers, scripted failures, or a rule-based
model (:func:`rule_model`) that plays explainer and scorer, with log-probabilities when asked."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Rule = Callable[[dict[str, Any]], tuple[str, list[float] | None]]  # body -> (answer, P(1) per verdict or None)


@dataclass
class Script:
    """What the server answers: HTTP statuses to fail with first, then answers in turn."""

    failures: list[int] = field(default_factory=list)  # e.g. [429, 500]: the first two requests fail
    answers: list[str] = field(
        default_factory=lambda: [
            '{"category": "low-level", "score": 4, "explanation": "The token \\"the\\" before nouns."}'
        ]
    )
    always_fail: int | None = None  # fail every request with this status
    rule: Rule | None = None  # answer from the request itself instead of ``answers``
    requests: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request received, in order
    keys_seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests += 1
                script.bodies.append(body)
                script.keys_seen.add(self.headers.get("Authorization", ""))
                status = script.always_fail or (script.failures.pop(0) if script.failures else 200)
                answer = script.answers[(script.requests - 1) % len(script.answers)]
            if status != 200:
                self._send(status, {"error": {"message": "scripted failure", "type": "server_error"}})
                return
            probs = None
            if script.rule is not None:
                answer, probs = script.rule(body)
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": answer},
            }
            if body.get("logprobs") and probs is not None:
                choice["logprobs"] = {"content": _token_logprobs(answer, probs)}
            self._send(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                },
            )

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("retry-after-ms", "5")  # the official client honours this: fast retries
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def standin_server(script: Script) -> Iterator[str]:
    """Serve ``script`` on 127.0.0.1; yields the base URL to put in OPENAI_BASE_URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def standin_env(script: Script, monkeypatch: object, key: str) -> Iterator[None]:
    """Serve ``script`` and point the official client at it (OPENAI_BASE_URL, OPENAI_API_KEY)."""
    with standin_server(script) as url:
        monkeypatch.setenv("OPENAI_API_KEY", key)  # type: ignore[attr-defined]
        monkeypatch.setenv("OPENAI_BASE_URL", url)  # type: ignore[attr-defined]
        yield


def rule_model(body: dict[str, Any]) -> tuple[str, list[float] | None]:
    """A model that answers by rule. Explainer: the explanation lists the tokens most often wrapped in [[ ]]
    (the fewest that cover half of the excerpts, at most five).
    Detection: an excerpt matches when it contains a word of the explanation. Fuzzing: the marking is right
    when a marked span is a word of the explanation. P(1) grows with the number of hits."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if "interpret features" in system:
        tokens = [t.strip().lower() for t in re.findall(r"\[\[([^\[\]]*)\]\]", user) if t.strip()]
        words: list[str] = []
        for word, _ in Counter(tokens).most_common(5):
            if sum(t in words for t in tokens) * 2 >= len(tokens):
                break
            words.append(word)
        return json.dumps({"category": "low-level", "score": 4, "explanation": " ".join(words) or "nothing"}), None
    words = user.split("Explanation: ", 1)[1].split("\n", 1)[0].lower().split()
    excerpts = re.findall(r"^Excerpt \d+: (.*)$", user, re.MULTILINE)
    hits = [rule_hits(text, words, "<<" in user) for text in excerpts]
    return json.dumps([int(h > 0) for h in hits]), [1 - 0.2 / (1 + h) if h else 0.2 for h in hits]


def rule_hits(text: str, words: list[str], marked: bool) -> int:
    """Detection: occurrences of the explanation's words in the excerpt; fuzzing: marked spans that are one."""
    if marked:
        return sum(span.strip().lower() in words for span in re.findall(r"<<(.*?)>>", text))
    return sum(text.lower().count(word) for word in words)


def _token_logprobs(answer: str, probs: list[float]) -> list[dict[str, Any]]:
    """The answer as tokens, each verdict digit with the alternatives "1" and "0"."""
    out, verdicts = [], iter(probs)
    for piece in re.findall(r"[01]|[^01]+", answer):
        if piece in ("0", "1"):
            p = next(verdicts)
            top = [{"token": "1", "logprob": math.log(p)}, {"token": "0", "logprob": math.log(1 - p)}]
            out.append({"token": piece, "logprob": top[piece == "0"]["logprob"], "top_logprobs": top})
        else:
            out.append({"token": piece, "logprob": 0.0, "top_logprobs": []})
    return out
