"""Sweeps with a shared encoder GEMM (issue 19): the wall time of N members trained from one read
against N separate fits, and against the same sweep with each member selecting its own top k.

    python -m benchmarks.bench_sweep --cache CACHE --tokens 400000 --repeats 3 --write

Two grids on a one-layer cache: 4 members (1024 latents, k 16, seeds 0-3; --latents and --k change
them) and 8 members (k 8, 16, 32, 64 x latents 1024, 2048). Repeats are interleaved (separate, fused,
unfused, then again) so that load from other jobs on the machine falls on all three alike; the table
gives medians with min-max. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("SAE_PIPE_QUIET", "1")

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import publish
from pipeline.fit import stage as fit
from pipeline.fit import stage as fit_stage
from pipeline.fit.config import FitConfig
from pipeline.fit.train import Member

GRIDS = {
    "4 members: seeds 0-3": {"seed": [0, 1, 2, 3]},
    "8 members: k 8/16/32/64 x latents 1024/2048": {"k": [8, 16, 32, 64], "latents": [1024, 2048]},
}


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """The sweep before issue 19: every member runs its own encoder GEMM and top k."""
    real = fit_stage.shared_selection

    def alone(members: list[Member], _batch: torch.Tensor) -> list[None]:
        return [None] * len(members)

    fit_stage.shared_selection = alone  # type: ignore[assignment]
    try:
        yield
    finally:
        fit_stage.shared_selection = real


def timed(cfgs: list[FitConfig]) -> float:
    start = time.perf_counter()
    for cfg in cfgs:
        fit.run(cfg)
    return time.perf_counter() - start


def bench_grid(base: dict[str, Any], grid: dict[str, list[Any]], repeats: int, out: Path) -> dict[str, list[float]]:
    """Seconds per repeat of: each member fitted alone, one fused sweep, one unfused sweep."""
    members = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    times: dict[str, list[float]] = {"separate fits": [], "fused sweep": [], "unfused sweep": []}
    for r in range(repeats):
        times["separate fits"].append(timed([FitConfig(**{**base, **m}, out=str(out / f"solo{r}")) for m in members]))
        times["fused sweep"].append(timed([FitConfig(**base, sweep=grid, out=str(out / f"fused{r}"))]))
        with unfused():
            times["unfused sweep"].append(timed([FitConfig(**base, sweep=grid, out=str(out / f"unfused{r}"))]))
        print(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), file=sys.stderr)
    return times


def table(results: dict[str, dict[str, list[float]]], tokens: int, base: dict[str, Any]) -> list[str]:
    lines = [
        f"Each member trains on {tokens:,} tokens ({base['latents']} latents, k {base['k']} unless the grid sets "
        f"them; batch 4096, Adam, auto lr, bf16 selection GEMM where the {base['device']} device has it).",
        "",
        "| grid | separate fits s | fused sweep s | unfused sweep s | fused / separate | unfused / separate |",
        "|---|---|---|---|---|---|",
    ]
    for name, times in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[k]:.1f} ({min(v):.1f}-{max(v):.1f})" for k, v in times.items()]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {med['fused sweep'] / med['separate fits']:.2f}x | "
            f"{med['unfused sweep'] / med['separate fits']:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a one-layer activation cache")
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (benchmarks/gpu.py passes cuda)")
    parser.add_argument("--grid", type=int, nargs="*", default=[0, 1], help="which grids: 0 = 4 members, 1 = 8")
    parser.add_argument("--latents", type=int, default=1024, help="each member's latents (grid 1 sets its own)")
    parser.add_argument("--k", type=int, default=16, help="each member's k (grid 1 sets its own)")
    parser.add_argument("--write", action="store_true", help="prepend the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    lines = sweep_lines(args.cache, args.tokens, args.repeats, args.device, args.grid, args.latents, args.k)
    publish(lines, "sweeps sharing the encoder GEMM (issue 19)", "benchmarks.bench_sweep", args.write)


def sweep_lines(
    cache: str, tokens: int, repeats: int, device: str, grids: list[int], latents: int = 1024, k: int = 16
) -> list[str]:
    """The table of the chosen grids: separate fits, fused and unfused sweeps, medians over ``repeats``."""
    base: dict[str, Any] = {"cache": cache, "latents": latents, "k": k, "batch_size": 4096, "max_tokens": tokens}
    base |= {"device": device, "verify": False, "log_every": 1000, "checkpoint_every": 0}
    with tempfile.TemporaryDirectory() as tmp:
        fit.run(FitConfig(**{**base, "max_tokens": 8192}, out=f"{tmp}/warm"))  # imports, first allocations
        chosen = [list(GRIDS)[i] for i in grids]
        results = {name: bench_grid(base, GRIDS[name], repeats, Path(tmp) / name[:1]) for name in chosen}
    return table(results, tokens, base)


if __name__ == "__main__":
    main()
