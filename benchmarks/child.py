"""One benchmark contender per process, and that process's own wall time and peak memory.

A contender prints one line ``RESULT {json}`` on stdout; anything else it prints (progress bars,
logs) goes to stderr, which passes through to ours so long runs show where they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def run_child(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd`` to the end; its RESULT plus ``process_wall_s`` and ``peak_rss_mb`` of that process alone.

    The peak comes from ``wait4`` on this child's pid. ``getrusage(RUSAGE_CHILDREN)`` would not do:
    its ``ru_maxrss`` is the largest peak among all children waited for so far, so a light contender
    run after a heavy one would be reported at the heavy one's peak.
    """
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, cwd=cwd, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        stdout = out.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"benchmark contender failed (rc {proc.returncode}): {' '.join(cmd)}\n{stdout[-2000:]}")
    # Linux reports ru_maxrss in KiB.
    return {**json.loads(line[len("RESULT ") :]), "process_wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
