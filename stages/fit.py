"""DVC stage `fit`: params [fit] + cache/extract.json -> cache/saes/<run>/, cache/plots/fit/, cache/fit.json.

Runs owned by the pipeline are retrained whenever DVC re-runs this stage (overwrite), and their
training curves are copied to cache/plots/fit/ for `dvc plots show`.
"""

from __future__ import annotations

import shutil

from pipeline.fit.config import FitConfig
from pipeline.fit.stage import run
from pipeline.infra.console import guarded
from pipeline.infra.files import sha256_file
from pipeline.infra.layout import Layout
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import portable, read_receipt, write_receipt

PARAMS = "params.yaml"


def main() -> None:
    receipt = read_receipt("extract")
    cfg = build_config(FitConfig, load_params(PARAMS), "fit", {"cache": receipt["cache"], "overwrite": True})
    runs = run(cfg).runs
    plots = Layout(cfg.cache_root).plots("fit").local()
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir(parents=True)
    for folder in runs:
        shutil.copyfile(folder.local() / "log.csv", plots / f"{folder.name}.csv")
    write_receipt(
        "fit",
        {
            "cache_key": receipt["key"],
            "runs": [
                {"name": r.name, "path": portable(r.url), "sae_sha256": sha256_file(r.local() / "sae.safetensors")}
                for r in runs
            ],
        },
        cfg.cache_root,
    )


if __name__ == "__main__":
    guarded(main)
