"""Run the `sae-pipe` CLI in this process with a SIGKILL injected at an exact point (reliability tests).

    python -m tests.support.killpoint forward 3 -- extract --model ...     kill inside the 3rd LLM forward
    python -m tests.support.killpoint shard-write 2 -- extract ...          kill with shard 2 half written
    python -m tests.support.killpoint manifest 2 -- extract ...             kill just before manifest.json is replaced
    python -m tests.support.killpoint train-step 25 -- fit ...              kill inside the 25th training step
    python -m tests.support.killpoint steer-write 1 -- steer RUN --evaluate  kill with its folder half written
    python -m tests.support.killpoint interpret-report 1 -- interpret ...   kill before the report is written

A real signal, so nothing (no finally, no atexit) runs after it: exactly what `kill -9` does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(owner: Any, name: str, count: int, before: Callable[..., None] | None = None) -> None:
    """Replace ``owner.name`` so that its ``count``-th call dies (after ``before`` ran, if given)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == count:
            if before is not None:
                before(original, *args, **kwargs)
            _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def arm(point: str, count: int) -> None:
    from pipeline.cache import backends as store
    from pipeline.extract import capture
    from pipeline.fit import stage as fit

    if point == "forward":
        _on_call(capture, "run_to_sites", count)
    elif point == "shard-write":

        def half(original: Callable[..., None], self: Any, folder: Any, arrays: dict) -> None:
            original(self, folder, dict(list(arrays.items())[: len(arrays) // 2]))

        for backend in (store.ZarrBackend, store.MemmapBackend):
            _on_call(backend, "write", count, half)
    elif point == "manifest":
        from pipeline.infra import files

        real_replace = files.os.replace
        seen = {"n": 0}

        def replace(src: str, dst: str) -> None:
            if str(dst).endswith("manifest.json"):
                seen["n"] += 1
                if seen["n"] == count:
                    _die()
            real_replace(src, dst)

        files.os.replace = replace  # type: ignore[assignment]
    elif point == "train-step":
        _on_call(fit, "train_step", count)
    elif point == "steer-write":
        from pipeline.steer import report

        _on_call(report, "dose_response_png", count)  # steering.csv and generations.jsonl are written by then
    elif point == "interpret-report":  # tables and summary.json written, the report not yet
        from pipeline.interpret import stage as interpret_stage

        _on_call(interpret_stage, "render_report", count)
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    point, count, separator, *rest = sys.argv[1:]
    assert separator == "--"
    arm(point, int(count))
    sys.argv = ["sae-pipe", *rest]
    from pipeline.cli import main

    main()
