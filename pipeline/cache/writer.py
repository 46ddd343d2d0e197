"""Background shard writer: disk writes overlap the forward pass of the next shard.

Each shard is written under a temporary name, renamed into place, then its record
(``shards/NNNNNN.json``: rows, checksums, bytes) is written; only a recorded shard counts, so a
kill at any moment leaves either a finished shard or one that the next run rewrites.
"""

from __future__ import annotations

import errno
import queue
import threading
from typing import Any

import numpy as np

from pipeline.cache.backends import Backend, array_checksums
from pipeline.cache.manifest import shard_name, shard_records
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder

_DONE = None


def committed_shards(folder: Folder) -> dict[int, dict[str, Any]]:
    """Records of the shards already written; stray uncommitted shard folders and half-written
    JSON files (a kill between writing and renaming them) are removed."""
    for name in folder.list():
        if name.endswith(".tmp"):
            folder.remove(name)
    shards = folder.child("shards")
    records = shard_records(folder)
    for name in shards.list():
        stem = name.removesuffix(".json")
        if not name.endswith(".json") and (not stem.isdigit() or int(stem) not in records):
            shards.remove(name)  # a shard (or temporary folder) whose record was never written
    return records


def commit_shard(
    folder: Folder, backend: Backend, index: int, arrays: dict[str, np.ndarray], record: dict[str, Any]
) -> dict[str, Any]:
    """Write one shard so that it appears whole or not at all; return its record."""
    name = shard_name(index)
    shards = folder.child("shards")
    checksums = array_checksums(arrays)
    if shards.is_local:
        tmp = f".{name}.tmp"
        shards.remove(tmp)
        backend.write(shards.child(tmp), arrays)
        shards.remove(name)
        shards.rename(tmp, name)
    else:  # object stores have no rename; the record below is the commit point
        shards.remove(name)
        backend.write(shards.child(name), arrays)
    record = {**record, "index": index, "checksums": checksums, "bytes": shards.size(name)}
    shards.write_json(record, f"{name}.json")
    return record


class ShardWriter:
    """Commits shards from a bounded queue in one background thread; errors surface in the caller."""

    def __init__(self, folder: Folder, backend: Backend) -> None:
        self.folder, self.backend = folder, backend
        self.records: list[dict[str, Any]] = []
        # one shard waits while one is written: at most two shards' arrays in memory besides the forward's
        self._queue: queue.Queue[tuple[int, dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue(1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def submit(self, index: int, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Queue a shard (blocks while the queue is full)."""
        self._raise()
        self._queue.put((index, arrays, record))

    def close(self, raise_errors: bool = True) -> list[dict[str, Any]]:
        """Wait for every queued shard and end the thread; return the records written by this writer.

        On the caller's error path (``raise_errors=False``) the shards already handed over are still
        committed, and a writer error does not mask the caller's own exception.
        """
        self._queue.put(_DONE)
        self._thread.join()
        if raise_errors:
            self._raise()
        return self.records

    def _run(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is not None:
                continue  # drain after a failure; the caller is told on its next call
            index, arrays, record = item
            try:
                self.records.append(commit_shard(self.folder, self.backend, index, arrays, record))
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self._error = err
                self.folder.child("shards").remove(f".{shard_name(index)}.tmp")

    def _raise(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(
                f"the disk holding {self.folder.url} is full ({err.strerror}). Every shard written "
                "so far is kept: free some space and re-run the same command to resume."
            ) from None
        raise err
