"""Small JSON receipts that DVC stages hand to each other (``cache/<stage>.json``).

A receipt names what a stage produced (the cache, the run folders) with content digests, so a
downstream stage depends on exactly those results and not on everything else under ``cache/``.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.infra.errors import UserError
from pipeline.infra.layout import Layout


def portable(path: str) -> str:
    """A path relative to the working directory when it lies below it (receipts stay relocatable)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def write_receipt(stage: str, data: dict[str, Any], cache_root: str = "cache") -> None:
    layout = Layout(cache_root)
    layout.folder.write_json({"stage": stage, **data}, layout.receipt(stage))


def read_receipt(stage: str, cache_root: str = "cache") -> dict[str, Any]:
    layout = Layout(cache_root)
    if not layout.folder.exists(layout.receipt(stage)):
        raise UserError(
            f"{cache_root}/{layout.receipt(stage)} is missing: run the `{stage}` stage first (dvc repro {stage})."
        )
    return layout.folder.read_json(layout.receipt(stage))
