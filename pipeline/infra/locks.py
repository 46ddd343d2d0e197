"""One writer per cache or run folder: a second process waits, saying why, instead of interleaving."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.infra.console import say
from pipeline.infra.files import Folder


@contextmanager
def exclusive(folder: Folder, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``<parent>/.locks/<name>.lock`` while the block runs (local folders; no-op for URLs)."""
    if not enabled or not folder.is_local:
        yield
        return
    locks = folder.local().parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{folder.name}.lock", "a+") as handle:
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
