"""DVC stage `steer`: params [steer] + cache/fit.json (+ the feature tables) -> cache/steer/<run>/ and the
metrics cache/steer.json. Soft-routed RouteSAE runs are skipped with a note (no single layer to edit)."""

from __future__ import annotations

import csv
import dataclasses

from pipeline.infra.console import guarded, say
from pipeline.infra.files import Folder
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.sae.folder import read_cfg
from pipeline.steer.config import SteerConfig
from pipeline.steer.evaluation import evaluate_steering

PARAMS = "params.yaml"


def main() -> None:
    cfg = build_config(SteerConfig, load_params(PARAMS), "steer", {"evaluate": True})
    summaries = {}
    for run in read_receipt("fit")["runs"]:
        if read_cfg(Folder.at(run["path"]))["sae"].get("routing") == "soft":
            say(f"steer: skipping soft-routed run {run['path']} (its code has no single layer to edit)")
            continue
        out = evaluate_steering(dataclasses.replace(cfg, run=run["path"]))
        rows = list(csv.DictReader((out.local() / "steering.csv").open()))
        strongest = max(float(r["strength"]) for r in rows)
        top = [r for r in rows if float(r["strength"]) == strongest]  # the headline: the largest strength
        summaries[out.name] = {
            "strength": strongest,
            "mean_effect": sum(float(r["effect"]) for r in top) / len(top),
            "mean_logprob_gain": sum(float(r["logprob_gain"]) for r in top) / len(top),
            "mean_kl": sum(float(r["kl"]) for r in top) / len(top),
        }
    write_receipt("steer", {"runs": summaries}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
