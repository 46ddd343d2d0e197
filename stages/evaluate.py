"""DVC stage `evaluate`: params [evaluate] + cache/fit.json -> cache/evaluate/ and the metrics cache/evaluate.json."""

from __future__ import annotations

from pipeline.evaluate.compare import write_comparison
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import evaluate
from pipeline.infra.console import guarded
from pipeline.infra.layout import Layout
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt

PARAMS = "params.yaml"


def main() -> None:
    runs = [run["path"] for run in read_receipt("fit")["runs"]]
    cfg = build_config(EvaluateConfig, load_params(PARAMS), "evaluate", {"runs": runs})
    results = evaluate(cfg)
    write_comparison(results, Layout(cfg.cache_root).evaluate())
    keep = ("nmse", "l0", "kl_per_token", "kl_zero_per_token", "ce_recovered")  # the headline numbers
    write_receipt("evaluate", {"runs": {r["run"]: {k: r[k] for k in keep if k in r} for r in results}}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
