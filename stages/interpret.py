"""DVC stage `interpret`: params [interpret] + cache/fit.json -> cache/interpret/<run>/, cache/interpret.json.

cache/interpret.json is the stage's metrics file: per run, the explainer's numbers and, per scorer, the
mean balanced accuracy over features with its 95 % interval (`dvc metrics show`, `dvc metrics diff`).
"""

from __future__ import annotations

from typing import Any

from pipeline.infra.console import guarded
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.stage import run
from pipeline.live.runs import taken

PARAMS = "params.yaml"
KEEP = ("active_latents", "explained", "mean_score", "interpretable", "cost_usd", "scorer_cost_usd")
SCORE_KEYS = ["features"] + [f"{m}{end}" for m in ("balanced_accuracy", "auc") for end in ("", "_low", "_high")]


def main() -> None:
    cfg = build_config(InterpretConfig, load_params(PARAMS), "interpret", {})
    result = run(cfg, taken("interpret", [r["path"] for r in read_receipt("fit")["runs"]]))
    metrics = {s["run"]: _metrics(s) for s in result.summaries}
    write_receipt("interpret", {"runs": metrics}, cfg.cache_root)


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists for a run: explainer counts, spend, and per scorer the mean
    balanced accuracy and AUC with their 95 % intervals."""
    numbers = {k: summary[k] for k in KEEP if k in summary}
    if isinstance(summary.get("scores"), dict):
        numbers["scores"] = {
            name: {k: entry[k] for k in SCORE_KEYS if k in entry} for name, entry in summary["scores"].items()
        }
    return numbers


if __name__ == "__main__":
    guarded(main)
