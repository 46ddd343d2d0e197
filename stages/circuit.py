"""DVC stage `circuit`: params [circuit] + cache/fit.json -> cache/circuits/<task>-<hash>/ and the metrics
cache/circuit.json. The single-layer runs of the fit receipt are the SAEs, of any architecture (the first run
of each layer); routed (multi-layer) runs are skipped with a note. The metrics name the output folder
relative to the cache root, so `dvc metrics diff` compares results, not the checkouts (or `dvc exp` temp
folders) they ran in."""

from __future__ import annotations

import dataclasses

from pipeline.circuit.config import CircuitConfig
from pipeline.circuit.stage import circuit
from pipeline.infra.console import guarded, say
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import read_receipt, write_receipt
from pipeline.sae.folder import read_cfg
from pipeline.sae.interface import REGISTRY

PARAMS = "params.yaml"


def relative_out(out: Folder, cfg: CircuitConfig) -> str:
    """The output folder as params.yaml places it: ``out`` when set, else its path below the cache root."""
    return cfg.out or Layout(cfg.cache_root).relative(out)


def main() -> None:
    cfg = build_config(CircuitConfig, load_params(PARAMS), "circuit", {})
    runs: dict[int, str] = {}
    for run in read_receipt("fit", cfg.cache_root)["runs"]:
        sae = read_cfg(Folder.at(run["path"]))["sae"]
        if REGISTRY[sae["arch"]].multi_layer:
            say(f"circuit: skipping {sae['arch']} run {run['path']} (circuits are found over single-layer runs)")
        elif sae["layers"][0] in runs:
            say(f"circuit: skipping {run['path']}: layer {sae['layers'][0]} already has {runs[sae['layers'][0]]}")
        else:
            runs[sae["layers"][0]] = run["path"]
    out = circuit(dataclasses.replace(cfg, runs=list(runs.values())))
    found = out.read_json("circuit.json")
    chosen = found["circuit"] or {}  # none when the task is not solved
    measures = ("faithfulness", "faithfulness_ci", "completeness", "completeness_ci", "val_faithfulness")
    write_receipt(
        "circuit",
        {
            "out": relative_out(out, cfg),
            "task": cfg.task,
            "solved": found["solved"],
            "status": found["status"],
            "found": found["found"],
            "method": chosen.get("method"),
            "size": chosen.get("size"),
            **{k: rounded(chosen.get(k)) for k in measures},
            "test_pairs": found["pairs"]["test"],
            "seconds": found["seconds"],
        },
        cfg.cache_root,
    )


def rounded(value: float | list[float] | None) -> float | list[float] | None:
    """A measure (or interval) at 4 decimals for the metrics file."""
    if isinstance(value, list):
        return [round(v, 4) for v in value]
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    guarded(main)
