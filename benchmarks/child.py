"""One benchmark contender per process, and that process's own wall time and peak memory.

A contender prints one line ``RESULT {json}`` on stdout, with ``peak_rss_mb`` from :func:`own_peak_rss_mb`
taken at its end; anything else it prints (progress bars, logs) goes to stderr, which passes through to
ours so long runs show where they are.

Why not ``ru_maxrss``: on Linux it counts the memory of the process image that was replaced at exec, and a
subprocess is forked (or vforked) from its parent, so every child's ``ru_maxrss`` (RUSAGE_SELF in the
child, ``wait4`` or RUSAGE_CHILDREN in the parent) is at least what the parent held when it started the
child, and a contender lighter than its parent reports the parent's size.
``VmHWM`` belongs to the memory map exec made, so it is the contender's alone.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any


def _status_mb(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the kernel writes kB


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process since its exec, in MiB (Linux VmHWM)."""
    return _status_mb("VmHWM")


def own_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux VmRSS)."""
    return _status_mb("VmRSS")


def run_child(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd`` to the end; its RESULT (which must hold its own ``peak_rss_mb``) plus ``process_wall_s``."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, cwd=cwd, text=True)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"benchmark contender failed (rc {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}")
    result = json.loads(line[len("RESULT ") :])
    if "peak_rss_mb" not in result:
        raise SystemExit(f"benchmark contender reported no peak_rss_mb (own_peak_rss_mb at its end): {' '.join(cmd)}")
    return {**result, "process_wall_s": wall}
