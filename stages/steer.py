"""DVC stage `steer`: params [steer] + cache/fit.json (+ the feature tables) -> cache/steer/<run>/ and the
metrics cache/steer.json. Runs steer cannot edit (soft-routed RouteSAE runs) are skipped with a note
(pipeline/live/runs.py decides)."""

from __future__ import annotations

import dataclasses

from pipeline.infra.console import guarded
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.live.runs import taken
from pipeline.steer.config import SteerConfig
from pipeline.steer.stage import run

PARAMS = "params.yaml"


def main() -> None:
    cfg = build_config(SteerConfig, load_params(PARAMS), "steer", {"evaluate": True})
    summaries = {}
    for path in taken("steer", [r["path"] for r in read_receipt("fit")["runs"]]):
        result = run(dataclasses.replace(cfg, run=path))
        assert result.folder is not None  # evaluate is on
        summaries[result.folder.name] = result.headline
    write_receipt("steer", {"runs": summaries}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
