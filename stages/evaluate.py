"""DVC stage `evaluate`: params [evaluate] + cache/fit.json -> cache/evaluate/ and the metrics cache/evaluate.json."""

from __future__ import annotations

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import run
from pipeline.infra.console import guarded
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.live.runs import taken

PARAMS = "params.yaml"


def main() -> None:
    runs = taken("evaluate", [run["path"] for run in read_receipt("fit")["runs"]])
    cfg = build_config(EvaluateConfig, load_params(PARAMS), "evaluate", {"runs": runs})
    result = run(cfg, compare=True)
    keep = ("nmse", "l0", "kl_per_token", "kl_zero_per_token", "ce_recovered")  # the headline numbers
    metrics = {r["run"]: {k: r[k] for k in keep if k in r} for r in result.metrics}
    write_receipt("evaluate", {"runs": metrics}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
