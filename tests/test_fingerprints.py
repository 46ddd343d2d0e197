"""The content hashes that name caches: a local corpus and a model folder hash as the lines
``<name>=<sha256 of the file's bytes>`` (written out here with hashlib), so a refactor of the one file
hasher cannot silently change every cache key."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.extract.corpus import CorpusSpec, fingerprint_corpus
from pipeline.llm.model import ModelSource, fingerprint_model


def reference(lines: list[tuple[str, bytes]]) -> str:
    return hashlib.sha256(
        "".join(f"{name}={hashlib.sha256(data).hexdigest()}\n" for name, data in lines).encode()
    ).hexdigest()


def test_a_model_folder_hashes_its_files_by_relative_path(tmp_path: Path) -> None:
    files = {"config.json": b"{}", "sub/model.safetensors": b"\x00\x01weights", ".hidden": b"skipped"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    found = fingerprint_model(ModelSource("m", "folder", str(tmp_path)))
    assert found == {"sha256": reference([("config.json", b"{}"), ("sub/model.safetensors", b"\x00\x01weights")])}


def test_a_local_corpus_hashes_its_files_by_name(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "one"}\n')
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "two"}\n')
    found = fingerprint_corpus(CorpusSpec(str(tmp_path)))
    assert found == {"sha256": reference([("a.jsonl", b'{"text": "one"}\n'), ("b.jsonl", b'{"text": "two"}\n')])}
