"""fit: one TopK training step of sae-pipe vs sparsify and SAELens on the same real activations.

Speed only: a few dozen steps say nothing about how good each SAE ends up; quality at equal tokens
(each trainer with its own defaults for the demo's whole budget) is benchmarks/peer_quality.py.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.child import run_child

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"


class Shape(NamedTuple):
    """The SAE and batch every contender trains (the issue's real shape by default)."""

    latents: int = 16384
    k: int = 32
    batch_size: int = 4096


def commands(data: Path, steps: int, device: str = "cpu", shape: Shape = Shape()) -> dict[str, list[str]]:
    """The command of each contender; the peers run in the separate .bench-venv (SAELens on the CPU only)."""
    common = ["--data", str(data), "--steps", str(steps), "--warmup", str(min(5, steps - 1)), "--device", device]
    common += ["--num-latents", str(shape.latents), "--k", str(shape.k), "--batch-size", str(shape.batch_size)]
    ours = [sys.executable, "-m", "benchmarks.fit_steps", *common]
    peers = [str(BENCH_PYTHON), "benchmarks/peers/peer_steps.py", *common]
    out = {"sae-pipe bf16": [*ours, "--precision", "bfloat16"], "sae-pipe fp32": [*ours, "--precision", "float32"]}
    if BENCH_PYTHON.exists():
        out["sparsify 1.3.3"] = [*peers, "--child", "sparsify"]
        if device == "cpu":
            out["SAELens 6.54.12"] = [*peers, "--child", "saelens"]
    return out


def bench_fit(
    data: Path, steps: int, repeats: int, device: str = "cpu", shape: Shape = Shape()
) -> dict[str, dict[str, Any]]:
    """Median tokens/s over repeats (alternating contenders, a fresh process each) and each process's peak memory."""
    cmds = commands(data, steps, device, shape)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            runs[name].append(run_child(cmd, ROOT))
            print(f"  fit {name}: {runs[name][-1]['tokens_per_s_median']:,.0f} tok/s", file=sys.stderr)
    table = {}
    for name, results in runs.items():
        speeds = [r["tokens_per_s_median"] for r in results]
        table[name] = {
            "tokens_per_s": statistics.median(speeds),
            "min": min(speeds),
            "max": max(speeds),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_gpu_mb": max(r.get("peak_gpu_mb", 0.0) for r in results),
            "cpu_util": statistics.median(r["cpu_util_median"] for r in results),
        }
    return table


def gemm_limits(d: int = 576, n: int = 16384, batch: int = 4096, repeats: int = 9) -> dict[str, float]:
    """Tokens/s if a step cost nothing but the dense encoder GEMM (bias folded in), per precision."""
    import time

    import torch

    torch.set_num_threads(2)
    limits = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x, w = torch.randn(batch, d + 1, dtype=dtype), torch.randn(n, d + 1, dtype=dtype)
        out = torch.empty(batch, n, dtype=dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, w.t(), out=out)
            times.append(time.perf_counter() - start)
        limits[name] = batch / statistics.median(times[2:])
    return limits
