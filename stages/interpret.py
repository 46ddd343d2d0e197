"""DVC stage `interpret`: params [interpret] + cache/fit.json -> cache/interpret/<run>/, cache/interpret.json."""

from __future__ import annotations

import dataclasses

from pipeline.infra.console import guarded
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.stage import interpret

PARAMS = "params.yaml"


def main() -> None:
    cfg = build_config(InterpretConfig, load_params(PARAMS), "interpret", {})
    summaries = {}
    for run in read_receipt("fit")["runs"]:
        summary = interpret(dataclasses.replace(cfg, run=run["path"]))
        keep = ("active_latents", "explained", "mean_score", "interpretable", "cost_usd")  # numbers for dvc metrics
        summaries[summary["run"]] = {k: summary[k] for k in keep if k in summary}
    write_receipt("interpret", {"runs": summaries}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
