"""DVC stage `extract`: params [model, data, extract] -> cache/activations/<key>/ and cache/extract.json."""

from __future__ import annotations

from pipeline.extract.config import ExtractConfig
from pipeline.extract.stage import run
from pipeline.infra.console import guarded
from pipeline.infra.files import sha256_file
from pipeline.infra.params import build_config, load_params
from pipeline.infra.receipts import portable, write_receipt

PARAMS = "params.yaml"


def main() -> None:
    cfg = build_config(ExtractConfig, load_params(PARAMS), "extract", {}, shared=("model", "data"))
    result = run(cfg)
    write_receipt(
        "extract",
        {
            "cache": portable(result.folder.url),
            "key": result.manifest["key"],
            "rows": result.manifest["rows"],
            "manifest_sha256": sha256_file(result.folder.local() / "manifest.json"),
        },
        cfg.cache_root,
    )


if __name__ == "__main__":
    guarded(main)
