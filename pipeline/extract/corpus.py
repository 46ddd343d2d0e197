"""Documents in: a Hugging Face dataset id, local files, or the built-in offline corpus.

The built-in corpus is real English prose that ships with Python itself: the reference-manual
topics of ``pydoc_data.topics`` and the docstrings of the standard library (read with ``ast``,
nothing is imported), about 1.7 M characters, ~400 k SmolLM2 tokens.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.infra.errors import UserError
from pipeline.infra.files import Memo, sha256_files
from pipeline.llm.hub import hub_commit

BUILTIN = "builtin"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
_MIN_DOC_CHARS = 200  # shorter docstrings are mostly one-liners ("Return x."), not prose


@dataclass(frozen=True)
class CorpusSpec:
    """Which documents to read."""

    dataset: str = BUILTIN  # "builtin", a hub dataset id, or a local file/folder
    split: str = "train"  # dataset split (hub and local datasets)
    text_column: str = "text"  # column holding the document text
    config: str | None = None  # hub dataset configuration name, if it has several
    revision: str | None = None  # hub dataset branch, tag or commit


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Documents in a fixed order: the same spec always yields the same texts."""
    if spec.dataset == BUILTIN:
        yield from builtin_documents()
        return
    dataset = _open_dataset(spec)
    first = True
    for example in dataset:
        if first:
            _check_column(spec, list(example))
            first = False
        text = example[spec.text_column]
        if isinstance(text, str) and text:
            yield text


def check_corpus(spec: CorpusSpec) -> None:
    """Open the corpus and look at its first document, so that a wrong path or column fails early."""
    next(iter_documents(spec), None)


def fingerprint_corpus(spec: CorpusSpec, memo: Memo | None = None) -> dict[str, str]:
    """What identifies the texts: a content hash for local and built-in data, the commit on the hub."""
    if spec.dataset == BUILTIN:
        stamp = f"builtin|{sys.version}|{sysconfig.get_paths()['stdlib']}"
        if memo is None or not memo.get(stamp):
            known = _builtin_sha256()
            if memo is None:
                return {"sha256": known}
            memo.set(stamp, known)
        return {"sha256": str(memo.get(stamp))}
    files = _local_files(spec.dataset)
    if files is not None:
        return {"sha256": sha256_files(((file.name, file) for file in files), memo)}
    return {"commit": hub_commit(spec.dataset, spec.revision, repo_type="dataset")}


@lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """The reference-manual topics, then every standard-library docstring of 200+ characters."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            docs.extend(_docstrings(Path(root) / name))
    return tuple(docs)


def _builtin_sha256() -> str:
    digest = hashlib.sha256()
    for doc in builtin_documents():
        digest.update(doc.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a few stdlib files are deliberately invalid (test data, templates)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in found if doc and len(doc) >= _MIN_DOC_CHARS]


def _local_files(where: str) -> list[Path] | None:
    """Supported files at a local path (sorted), or None when ``where`` is not local."""
    path = Path(where).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise UserError(f"cannot read {where}: supported files are {', '.join(LOCAL_FORMATS)}.")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS and p.is_file())
        if not files:
            raise UserError(f"folder {where} holds no {', '.join(LOCAL_FORMATS)} files.")
        return files
    if where.startswith((".", "/", "~")) or where.count("/") > 1 or path.suffix in LOCAL_FORMATS:
        raise UserError(
            f"dataset {where!r} does not exist: give a local file or folder, a hub id "
            f"like Skylion007/openwebtext, or {BUILTIN!r}."
        )
    return None


def _open_dataset(spec: CorpusSpec):  # noqa: ANN202 - a datasets.IterableDataset
    """A streaming dataset: local files, a hub dataset already in the local HF cache, or the hub."""
    import datasets

    datasets.logging.set_verbosity_error()
    files = _local_files(spec.dataset)
    if files is None:
        files = _cached_hub_files(spec)
    try:
        if files is None:
            return datasets.load_dataset(
                spec.dataset, name=spec.config, split=spec.split, revision=spec.revision, streaming=True
            )
        return _load_files(spec, files)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(
            f"cannot open dataset {spec.dataset!r} (split {spec.split!r}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


def _load_files(spec: CorpusSpec, files: list[Path]):  # noqa: ANN202 - a datasets.IterableDataset
    import datasets

    kinds = {LOCAL_FORMATS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"{spec.dataset} mixes file types ({', '.join(sorted(kinds))}); point at a folder of one type.")
    kind = kinds.pop()
    extra = {"sample_by": "document"} if kind == "text" else {}  # one .txt file = one document
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True, **extra)


def _cached_hub_files(spec: CorpusSpec) -> list[Path] | None:
    """The split's data files of a hub dataset already in the local HF cache, when the hub is off
    (HF_HUB_OFFLINE=1); None otherwise, and then the hub is asked (streaming)."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE or spec.config:
        return None
    try:
        folder = Path(
            snapshot_download(spec.dataset, repo_type="dataset", revision=spec.revision, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not in the cache: load_dataset below says so in its own words
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix in LOCAL_FORMATS and p.is_file())
    chosen = [p for p in files if spec.split in p.relative_to(folder).as_posix()]
    if not chosen:
        raise UserError(
            f"the cached hub dataset {spec.dataset!r} has no files for split {spec.split!r}; it has: "
            + ", ".join(p.relative_to(folder).as_posix() for p in files[:10])
        )
    return chosen


def _check_column(spec: CorpusSpec, columns: list[str]) -> None:
    if spec.text_column not in columns:
        raise UserError(
            f"dataset {spec.dataset!r} has no column {spec.text_column!r}; its columns are "
            f"{', '.join(columns)}. Pass --text-column with one of them."
        )
