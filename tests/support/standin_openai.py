"""A stand-in OpenAI-compatible chat server on loopback: canned answers, scripted failures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    requests: int = 0
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
                script.keys_seen.add(self.headers.get("Authorization", ""))
                status = script.always_fail or (script.failures.pop(0) if script.failures else 200)
                answer = script.answers[(script.requests - 1) % len(script.answers)]
            if status != 200:
                self._send(status, {"error": {"message": "scripted failure", "type": "server_error"}})
                return
            self._send(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                    ],
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
