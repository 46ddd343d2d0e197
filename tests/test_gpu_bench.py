"""benchmarks/gpu.py: without a GPU it says so and exits 0; with --device cpu --smoke every step runs at toy sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so the answer does not depend on the host
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no GPU")


@pytest.mark.slow
def test_every_step_of_the_gpu_benchmark_runs_on_the_cpu(tiny_llama: Path, capsys: pytest.CaptureFixture) -> None:
    """The same code a GPU machine runs, on a tiny model: extract, fit steps, fit, evaluate, sweep, architectures."""
    from benchmarks import gpu

    argv = ["--device", "cpu", "--smoke", "--model", str(tiny_llama), "--layer", "1", "--max-tokens", "6000"]
    assert gpu.main(argv) == 0
    out = capsys.readouterr().out
    for piece in (
        "- extract: ",
        "| sae-pipe bf16 | ",
        "| sae-pipe fp32 | ",
        "| padded | ",  # the selection GEMM in CUDA's form and the CPU's
        "| unpadded | ",
        "- `sae-pipe fit` end to end: ",
        "| 4 | ",  # evaluate of 4 runs against a bare forward
        "| 4 members: seeds 0-3 | ",
        *(f"| {arch} | " for arch in gpu.ARCHS),  # each architecture's fit, scored on the held-out rows
    ):
        assert piece in out, piece
