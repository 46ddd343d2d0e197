"""fit --wandb: one W&B run per sweep member, in one group, holding cfg.json and the rows of log.csv; read
back from W&B's offline files (no network)."""

from __future__ import annotations

import csv
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.fit import stage as fit
from pipeline.infra.errors import UserError
from tests.support.caches import synthetic_cache
from tests.test_fit import run_cfg

BLOCK = 32768  # W&B's transaction log is a LevelDB-style log: 32 KiB blocks of checksummed chunks
HEADER = 7  # ":W&B", a 2-byte magic and a version byte; a chunk's header is crc (4), length (2), type (1)


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's .wandb file, chunks (full 1, first 2, middle 3, last 4)
    joined; W&B's Python reader of these files is gone (0.31 reads them in its Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = path.read_bytes(), HEADER, b""
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def offline_runs(root: Path) -> dict[str, dict[str, Any]]:
    """Run name -> its project, group, config and history rows (W&B's own _keys dropped)."""
    runs = {}
    for path in root.glob("wandb/offline-run-*/run-*.wandb"):
        run: dict[str, Any] = {"rows": []}
        for record in records(path):
            if record.WhichOneof("record_type") == "run":
                run.update(name=record.run.display_name, project=record.run.project, group=record.run.run_group)
                run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif record.WhichOneof("record_type") == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["rows"].append({k: v for k, v in items.items() if not k.startswith("_")})
        runs[run["name"]] = run
    return runs


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return synthetic_cache(tmp_path, [1500, 1500]).url


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "wandb-dir"
    root.mkdir()
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    import wandb

    wandb.teardown()  # W&B reads these once per process: an earlier test's --wandb (the option walk) set it up online
    return root


def test_each_sweep_member_logs_its_cfg_and_log_rows_to_one_group(cache: str, tmp_path: Path, offline: Path) -> None:
    runs = fit.run(
        run_cfg(cache, tmp_path, max_tokens=2048, log_every=2, sweep={"k": [4, 8]}, wandb="sae-pipe-test")
    ).runs
    import wandb

    wandb.teardown()  # run.finish() may return before wandb-core wrote the offline file (0.31: 7 bytes); this waits
    logged = offline_runs(offline)
    assert sorted(logged) == sorted(run.name for run in runs)
    assert len({run["group"] for run in logged.values()}) == 1 and all(
        r["project"] == "sae-pipe-test" for r in logged.values()
    )
    for run in runs:
        cfg = run.read_json("cfg.json")
        start = {k: v for k, v in cfg.items() if k not in ("result", "format", "format_version")}
        start["status"] = "training"  # cfg.json as written when training started, without its format header
        assert {k: v for k, v in logged[run.name]["config"].items() if k != "_wandb"} == start
        with open(f"{run.url}/log.csv", encoding="utf-8") as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        assert len(rows) == 4 and logged[run.name]["rows"] == rows  # steps 2, 4, 6, 8: every column, every row


def test_wandb_without_its_package_is_one_error_before_training(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"pip install 'sae-pipe\[wandb\]'"):
        fit.run(run_cfg(cache, tmp_path, max_tokens=2048, wandb="p"))
    assert not (tmp_path / "saes").exists()


def test_a_run_wandb_refuses_is_one_error_and_leaves_no_run_folder(
    cache: str, tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    def refuse(**kwargs: object) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(UserError, match="W&B refused the run .No API key"):
        fit.run(run_cfg(cache, tmp_path, max_tokens=2048, wandb="p"))
    assert not list((tmp_path / "saes").glob("*/cfg.json"))
