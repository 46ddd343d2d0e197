"""Folders on the local disk or behind an fsspec URL, with atomic JSON writes and file hashing.

Every cache and run folder goes through :class:`Folder`, so the same code writes to ``cache/``,
to ``memory://`` in tests, or to ``s3://bucket/cache`` (with ``s3fs`` installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.infra.errors import UserError


def is_url(where: str | Path) -> bool:
    """True for ``proto://...`` locations other than plain local paths."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


def _makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.makedirs(path, exist_ok=True)
    except (NotADirectoryError, FileExistsError):  # a file where a folder goes (a mistyped --out)
        raise UserError(f"cannot make folder {path}: it or a folder above it is a file.") from None


@dataclass(frozen=True)
class Folder:
    """A folder addressed by a local path or an fsspec URL."""

    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def at(cls, where: str | Path) -> Folder:
        text = str(where)
        if not is_url(text):
            return cls(LocalFileSystem(), str(Path(text.removeprefix("file://")).absolute()))
        try:
            fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as err:
            raise UserError(
                f"cannot open {text}: {err}. Install the fsspec backend it needs "
                "(s3fs for s3://, gcsfs for gs://, adlfs for az://)."
            ) from None
        return cls(fs, root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        return self.root if self.is_local else self.fs.unstrip_protocol(self.root)

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Folder:
        return Folder(self.fs, self.root.rstrip("/").rsplit("/", 1)[0])

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def child(self, *parts: str) -> Folder:
        return Folder(self.fs, self.path(*parts))

    def local(self) -> Path:
        if not self.is_local:
            raise UserError(f"{self.url} is not on the local disk; this operation needs a local folder.")
        return Path(self.root)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        _makedirs(self.fs, self.path(*parts))

    def list(self, *parts: str) -> list[str]:
        if not self.exists(*parts):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(*parts), detail=False))

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    def read_json(self, *parts: str) -> Any:
        with self.fs.open(self.path(*parts), "r", encoding="utf-8") as f:
            return json.load(f)

    def write_json(self, obj: Any, *parts: str) -> None:
        """Write JSON so that readers see the old file or the new one, never a torn one."""
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        _makedirs(self.fs, target.rsplit("/", 1)[0])
        if not self.is_local:
            self.fs.pipe_file(target, data)  # one PUT: object stores make it atomic
            return
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` (both relative); atomic on a local disk."""
        if self.is_local:
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)

    @contextmanager
    def replaced(self) -> Iterator[Folder]:
        """Write a whole result folder under a temporary sibling, then swap it in for this one.

        A run killed inside the ``with`` block leaves the previous result (or none), never a mix of old
        and new files that a later stage or ``dvc repro`` would take as complete.
        """
        parent = self.parent
        tmp = parent.child(f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.makedirs()
        try:
            yield tmp
            old = parent.child(f".{self.name}.{uuid.uuid4().hex[:8]}.old")
            if self.exists():
                parent.rename(self.name, old.name)  # two renames: the window without a result is tiny
            parent.rename(tmp.name, self.name)
            old.remove()
        finally:
            tmp.remove()

    def size(self, *parts: str) -> int:
        """Bytes under a file or folder."""
        return int(self.fs.du(self.path(*parts), total=True))


class Memo:
    """A small JSON file of facts that are slow to recompute (file hashes, model shapes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            self._data = {}
            if self.path is not None and self.path.exists():
                try:
                    self._data = dict(json.loads(self.path.read_text()))
                except (OSError, ValueError):
                    self._data = {}  # a damaged memo only costs a recomputation
        return self._data

    def get(self, key: str) -> Any:
        return self._load().get(key)

    def set(self, key: str, value: Any) -> None:
        data = self._load()
        data[key] = value
        if self.path is not None:
            Folder.at(self.path.parent).write_json(data, self.path.name)


def sha256_file(path: str | Path, memo: Memo | None = None) -> str:
    """Content hash of a local file, remembered in ``memo`` by (path, size, mtime) between calls."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"sha256|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo is not None and (known := memo.get(stamp)):
        return str(known)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if memo is not None:
        memo.set(stamp, digest.hexdigest())
    return digest.hexdigest()


def sha256_files(named: Iterable[tuple[str, Path]], memo: Memo | None = None) -> str:
    """Content hash of several files, each under a name (a line ``name=<sha256_file>`` per file, in order)."""
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(f"{name}={sha256_file(path, memo)}\n".encode())
    return digest.hexdigest()
