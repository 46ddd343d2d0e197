"""One writer per cache or run folder: a second process waits, saying why, instead of interleaving.

Lock files live in the system's temporary folder, named by a hash of the folder's absolute path, so
they never sit inside a stage's outputs (DVC would see a changed output after every run).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.infra.console import say
from pipeline.infra.files import Folder


@contextmanager
def exclusive(folder: Folder, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock file while the block runs (local folders; no-op for URLs)."""
    if not enabled or not folder.is_local:
        yield
        return
    with open(lock_path(folder), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            say(f"another process (pid {holder}) is running {what} on {folder.url}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(folder: Folder) -> Path:
    """``<tmp>/sae-pipe-locks/<name>-<hash of the absolute path>.lock`` (flock is machine-local anyway)."""
    locks = Path(tempfile.gettempdir()) / "sae-pipe-locks"
    locks.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(folder.local().resolve()).encode()).hexdigest()[:16]
    return locks / f"{folder.name}-{digest}.lock"
