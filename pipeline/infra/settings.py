"""Settings several stages take, declared once: a config's field calls the helper named after it, so the
field's default and doc (hence its option and --help) are written here and nowhere else.

``batch_size`` is not among them: it counts sequences per forward in extract, evaluate, steer and finetune,
tokens per step in fit and rows per SAE forward in interpret, so each stage documents its own.
"""

from __future__ import annotations

from typing import Any

from pipeline.infra.params import setting


def device() -> Any:
    """Where a stage computes (pipeline/infra/device.py resolves auto)."""
    return setting("auto", "auto | cpu | cuda | cuda:N")


def cache_root() -> Any:
    """The folder every stage reads its inputs from and writes its results under."""
    return setting("cache", "root of activations/, saes/ and every stage's results (cache/README.md)")


def compute_dtype() -> Any:
    """The LLM's precision where a stage replays a cache through it (evaluate, finetune); extract, which makes
    the cache, has no cache to follow and declares its own."""
    return setting("cache", "model precision: cache (the one the cache was extracted in) | auto | float32 | bfloat16")
