"""Crash anywhere, lose nothing: real processes killed with SIGKILL, corrupted files, concurrent runs,
a full disk, and inputs from a newer format."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache import backends as store
from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract import stage as extract_module
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from tests.support.caches import synthetic_cache, tiny_extract_args, tiny_extract_config, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("zarr", "memmap")


def run(*args: str, kill: tuple[str, int] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`sae-pipe ARGS` in a fresh process, optionally killed with SIGKILL at a kill point."""
    prefix = ["-m", "tests.support.killpoint", kill[0], str(kill[1]), "--"] if kill else ["-m", "pipeline.cli"]
    env = {**os.environ, "SAE_PIPE_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, *prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if check and not kill:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def last_line(proc: subprocess.CompletedProcess) -> Path:
    """The path a command printed last (extract prints its cache folder last)."""
    return Path(proc.stdout.strip().splitlines()[-1])


def tiny_args(tiny_llama: Path, root: Path, backend: str, corpus: Path) -> list[str]:
    """The tiny extraction's arguments, on a local corpus: a fresh process then skips gathering the built-in one."""
    return tiny_extract_args(tiny_llama, root, backend, dataset=corpus)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, jsonl_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted caches to compare against, one per backend (in this process: the same bytes as the CLI's,
    which the kill and concurrency tests below compare with)."""
    root = tmp_path_factory.mktemp("ref")
    corpus = str(jsonl_corpus)
    return {
        b: extract.run(tiny_extract_config(tiny_llama, root / b, backend=b, dataset=corpus)).folder.local()
        for b in BACKENDS
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, count, backend",
    [("forward", 7, "zarr"), ("shard-write", 3, "memmap"), ("shard-write", 2, "zarr"), ("manifest", 2, "zarr")],
)
def test_kill_during_extract_then_rerun_is_byte_identical(
    tiny_llama: Path, jsonl_corpus: Path, tmp_path: Path, reference: dict, point: str, count: int, backend: str
) -> None:
    killed = run(*tiny_args(tiny_llama, tmp_path, backend, jsonl_corpus), kill=(point, count))
    assert killed.returncode == -9, killed.stderr
    partial = next(p for p in (tmp_path / "activations").iterdir() if not p.name.startswith("."))
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache.open(partial)  # no reader ever sees a partial cache
    resumed = last_line(run(*tiny_args(tiny_llama, tmp_path, backend, jsonl_corpus)))
    assert tree_bytes(resumed) == tree_bytes(reference[backend])
    assert not [p for p in (resumed / "shards").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def fit_args(cache: str, out: Path) -> list[str]:
    return [
        "fit",
        "--cache",
        cache,
        "--layer",
        "0",
        "--latents",
        "64",
        "--k",
        "4",
        "--batch-size",
        "128",
        "--max-tokens",
        "6400",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--precision",
        "float32",
    ]


def test_kill_during_fit_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path, [3000, 3000], d=16).url
    (whole,) = run(*fit_args(cache, tmp_path / "a")).stdout.split()[-1:]
    killed = run(*fit_args(cache, tmp_path / "b"), "--params", str(_params(tmp_path, 10)), kill=("train-step", 27))
    assert killed.returncode == -9
    resumed = run(*fit_args(cache, tmp_path / "b"), "--params", str(_params(tmp_path, 10)), "--resume")
    run_dir = Path(resumed.stdout.split()[-1])
    for name, tensor in load_file(Path(whole) / "sae.safetensors").items():
        torch.testing.assert_close(load_file(run_dir / "sae.safetensors")[name], tensor, atol=0, rtol=0)
    steps = [int(line.split(",")[0]) for line in (run_dir / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) == [10, 20, 30, 40, 46]  # 6000 rows / 128: 46 steps; no duplicates or gaps


def _params(root: Path, every: int) -> Path:
    """A params file setting how often fit checkpoints and logs (not a CLI option)."""
    path = root / f"params-{every}.yaml"
    path.write_text(f"fit:\n  checkpoint_every: {every}\n  log_every: {every}\n")
    return path


@pytest.mark.slow
def test_corruption_is_named_by_verify_and_fit_and_repaired(
    tiny_llama: Path, jsonl_corpus: Path, tmp_path: Path
) -> None:
    folder = last_line(run(*tiny_args(tiny_llama, tmp_path, "memmap", jsonl_corpus)))
    flipped = folder / "shards" / "000001" / "train" / "act.npy"
    data = bytearray(flipped.read_bytes())
    data[300] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = folder / "shards" / "000002" / "train" / "token.npy"
    truncated.write_bytes(truncated.read_bytes()[:-8])
    verify = run("cache", "verify", str(folder), check=False)
    assert verify.returncode == 4 and "Traceback" not in verify.stderr
    message = " ".join(verify.stderr.split())
    assert (
        "shard 000001 train/act[0]: checksum mismatch" in message and "shard 000002 train/token: unreadable" in message
    )
    out = ("--out", str(tmp_path / "saes"), "--batch-size", "128")  # fit checks what it reads, as it reads it
    refused = run("fit", "--cache", str(folder), "--layer", "1", *out, check=False)
    assert refused.returncode == 4 and "shard 000001 train/act[0]: checksum mismatch" in " ".join(
        refused.stderr.split()
    )
    assert flipped.exists() and truncated.exists()  # nothing deleted
    assert run("cache", "repair", str(folder)).stdout.startswith("dropped shard(s) 1, 2")
    run(*tiny_args(tiny_llama, tmp_path, "memmap", jsonl_corpus))
    assert run("cache", "verify", str(folder)).stdout.startswith("ok")


def test_two_fits_read_one_cache_at_once(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path, [3000, 3000], d=16).url
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *fit_args(cache, tmp_path / "out"), "--k", k],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "SAE_PIPE_QUIET": "1"},
        )
        for k in ("4", "8")
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for out, _ in outputs:
        assert json.loads((Path(out.split()[-1]) / "cfg.json").read_text())["status"] == "complete"


def test_two_extracts_of_one_key_never_corrupt_it(
    tiny_llama: Path, jsonl_corpus: Path, tmp_path: Path, reference: dict
) -> None:
    args = [sys.executable, "-m", "pipeline.cli", *tiny_args(tiny_llama, tmp_path, "zarr", jsonl_corpus)]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1 and tree_bytes(Path(folders.pop())) == tree_bytes(reference["zarr"])


def test_not_enough_disk_is_refused_up_front(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    monkeypatch.setattr(extract_module, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(UserError, match="not enough disk space"):
        extract.run(tiny_extract_config(tiny_llama, tmp_path, layers="1", max_tokens=100_000))


def test_disk_full_mid_write_leaves_a_resumable_cache(
    tiny_llama: Path, jsonl_corpus: Path, tmp_path: Path, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.MemmapBackend.write
    calls = {"n": 0}

    def full_disk(self: store.MemmapBackend, folder: object, arrays: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, folder, arrays)

    monkeypatch.setattr(store.MemmapBackend, "write", full_disk)
    cfg = tiny_extract_config(tiny_llama, tmp_path, backend="memmap", dataset=str(jsonl_corpus))
    with pytest.raises(UserError, match="is full .* re-run the same command to resume"):
        extract.run(cfg)
    monkeypatch.setattr(store.MemmapBackend, "write", real)
    assert tree_bytes(extract.run(cfg).folder.local()) == tree_bytes(reference["memmap"])


def test_newer_format_versions_are_refused(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [300], d=8)
    manifest = folder.read_json("manifest.json")
    folder.write_json({**manifest, "format_version": 99}, "manifest.json")
    with pytest.raises(UserError, match="format version 99, this sae-pipe reads up to 2"):
        ActivationCache.open(folder)
    folder.write_json({**manifest, "format": "something/else"}, "manifest.json")
    with pytest.raises(UserError, match="not a sae-pipe/activations file"):
        ActivationCache.open(folder)
    folder.write_json(manifest, "manifest.json")
    (run_dir,) = fit.run(
        FitConfig(cache=folder.url, layer=0, latents=32, k=4, batch_size=64, out=str(tmp_path / "s"), device="cpu")
    ).runs
    cfg = run_dir.read_json("cfg.json")
    run_dir.write_json({**cfg, "format_version": 2}, "cfg.json")
    from pipeline.sae.folder import load_sae

    with pytest.raises(UserError, match="format version 2"):
        load_sae(run_dir)


def test_nothing_unsafe_is_loaded() -> None:
    """State is safetensors + JSON; numpy files are read without pickles; no remote code by default."""
    sources = {p.name: p.read_text() for p in (ROOT / "pipeline").glob("*.py")}
    for name, text in sources.items():
        assert "import pickle" not in text and "torch.load(" not in text, name
        for line in text.splitlines():
            assert "np.load(" not in line or "allow_pickle=False" in line, (name, line)
    assert ExtractConfig().trust_remote_code is False


def test_a_replaced_folder_keeps_the_old_result_until_the_new_one_is_whole(tmp_path: Path) -> None:
    from pipeline.infra.files import Folder

    out = Folder.at(tmp_path / "result")
    out.write_json({"v": 1}, "a.json")
    with pytest.raises(RuntimeError), out.replaced() as tmp:
        tmp.write_json({"v": 2}, "a.json")
        raise RuntimeError("killed half way")
    assert out.read_json("a.json") == {"v": 1}  # the failed run changed nothing
    with out.replaced() as tmp:
        tmp.write_json({"v": 3}, "b.json")
    assert out.list() == ["b.json"]  # no stale file of the old result survives the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no temporary left behind
