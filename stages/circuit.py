"""DVC stage `circuit`: params [circuit] + cache/fit.json -> cache/circuits/<task>-<hash>/ and the metrics
cache/circuit.json. The single-layer runs of the fit receipt are the SAEs, of any architecture (the first run
of each layer); routed runs (RouteSAE) are skipped with a note (pipeline/live/runs.py decides). The metrics
name the output folder relative to the cache root, so `dvc metrics diff` compares results, not the checkouts (or
`dvc exp` temp folders) they ran in."""

from __future__ import annotations

import dataclasses

from pipeline.circuit.config import CircuitConfig
from pipeline.circuit.stage import run
from pipeline.infra.console import guarded
from pipeline.infra.layout import Layout
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.live.runs import taken

PARAMS = "params.yaml"
MEASURES = ("faithfulness", "faithfulness_ci", "completeness", "completeness_ci", "val_faithfulness")


def main() -> None:
    cfg = build_config(CircuitConfig, load_params(PARAMS), "circuit", {})
    runs = taken("circuit", [r["path"] for r in read_receipt("fit", cfg.cache_root)["runs"]])
    result = run(dataclasses.replace(cfg, runs=runs))
    found = result.summary
    chosen = found["circuit"] or {}  # none when the task is not solved
    write_receipt(
        "circuit",
        {
            "out": cfg.out or Layout(cfg.cache_root).relative(result.folder),
            "task": cfg.task,
            "solved": found["solved"],
            "status": found["status"],
            "found": found["found"],
            "method": chosen.get("method"),
            "size": chosen.get("size"),
            **{k: rounded(chosen.get(k)) for k in MEASURES},
            "test_pairs": found["pairs"]["test"],
            "seconds": found["seconds"],
        },
        cfg.cache_root,
    )


def rounded(value: float | list[float] | tuple[float, ...] | None) -> float | list[float] | None:
    """A measure (or interval) at 4 decimals for the metrics file."""
    if isinstance(value, (list, tuple)):
        return [round(v, 4) for v in value]
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    guarded(main)
