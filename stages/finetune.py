"""DVC stage `finetune`: params [finetune] + cache/fit.json -> cache/finetune/<run>-ft<loss>-<hash>/ and the
receipt cache/finetune.json. Off by default (``enabled: false``: the stage writes an empty folder and a receipt
saying so); on, every run of the fit receipt that finetune takes (single-layer SAEs and transcoders) is
fine-tuned into its own folder; routed runs are skipped with a note (pipeline/live/runs.py decides)."""

from __future__ import annotations

import dataclasses

from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.stage import run
from pipeline.infra.console import guarded
from pipeline.infra.files import sha256_file
from pipeline.infra.layout import Layout
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import portable, read_receipt, write_receipt
from pipeline.live.runs import taken

PARAMS = "params.yaml"


def main() -> None:
    cfg = build_config(FinetuneConfig, load_params(PARAMS), "finetune", {})
    Layout(cfg.cache_root).finetune().makedirs()  # the stage's output, even when off
    parents = [r["path"] for r in read_receipt("fit", cfg.cache_root)["runs"]] if cfg.enabled else []
    runs = []
    for parent in taken("finetune", parents):
        result = run(dataclasses.replace(cfg, run=parent))
        runs.append(
            {
                "name": result.folder.name,
                "path": portable(result.folder.url),
                "parent": result.parent,
                "sae_sha256": sha256_file(result.folder.local() / "sae.safetensors"),
                "first_loss": round(result.first_loss, 6),
                "last_loss": round(result.last_loss, 6),
            }
        )
    write_receipt("finetune", {"enabled": cfg.enabled, "loss": cfg.loss, "runs": runs}, cfg.cache_root)


if __name__ == "__main__":
    guarded(main)
