"""Where a fit's time goes: wall-clock timers around the functions a training step calls, inside one real fit.

    taskset -c 0 env OMP_NUM_THREADS=1 python -m benchmarks.step_parts --cache C --arch topk+multi --k 32

The fit is the one benchmarks.archs times (params.yaml's fit section, the architecture's auto lr, the demo's
tokens); ``--arch A+multi`` trains multi-TopK. Each timed function is wrapped for the run and restored after it.
Prints, per function, its calls a step, the median call and its share of the fit, then ``RESULT {json}``.

Why not torch.profiler: at these sizes its self-CPU column misplaces time among elementwise ops (it gave AuxK's
``mse_loss`` 14 ms a step, where a wall-clock timer around the call inside the same fit says 1.6 ms). Timers nest:
a kernel's time is inside its caller's too. On CUDA a timer sees launches, not kernels, unless
``CUDA_LAUNCH_BLOCKING=1``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import pipeline.fit.stage
import pipeline.sae.archs.topk
import pipeline.sae.auxk_kernels
import pipeline.sae.kernels
import pipeline.sae.selection
from benchmarks import archs

# (module or autograd Function, attribute): what a TopK-family step calls, outermost first
PLACES: list[tuple[Any, str]] = [
    (pipeline.fit.stage, "shared_selection"),  # the encoder GEMM and top-k of every member
    (pipeline.fit.stage, "train_step"),  # the rest of the step: forward, losses, backward, optimizer
    (torch.Tensor, "backward"),
    (pipeline.sae.selection, "encoder_preacts"),
    (pipeline.sae.selection, "pick"),
    (pipeline.sae.archs.topk, "auxk_loss"),
    (pipeline.sae.kernels.TopKEncode, "forward"),
    (pipeline.sae.kernels.TopKEncode, "backward"),
    (pipeline.sae.kernels.SparseDecode, "forward"),
    (pipeline.sae.kernels.SparseDecode, "backward"),
    (pipeline.sae.auxk_kernels.AuxDecode, "backward"),
    (pipeline.sae.kernels, "bag_dot"),
    (pipeline.sae.kernels, "sparse_t_matmul"),
]


def _timed(label: str, fn: Callable[..., Any], times: dict[str, list[float]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - start)

    return wrapper


@contextmanager
def timed_calls(places: list[tuple[Any, str]]) -> Iterator[dict[str, list[float]]]:
    """Seconds of every call to each place while the context is open, by ``Owner.attribute``; the places are
    restored on the way out, whatever happened inside."""
    times: dict[str, list[float]] = defaultdict(list)
    saved = [(owner, name, owner.__dict__[name]) for owner, name in places]  # staticmethod objects as they are
    try:
        for owner, name, _ in saved:
            label = f"{getattr(owner, '__name__', '?').rsplit('.', 1)[-1]}.{name}"
            wrapped = _timed(label, getattr(owner, name), times)
            is_static = isinstance(owner.__dict__[name], staticmethod)
            setattr(owner, name, staticmethod(wrapped) if is_static else wrapped)
        yield times
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def table(times: dict[str, list[float]], steps: int, whole_s: float) -> list[dict[str, float | str]]:
    """One row per timed place: calls a step, median call (ms), total (s) and its share of the whole fit."""
    rows: list[dict[str, float | str]] = []
    for label, spans in times.items():
        rows.append(
            {
                "place": label,
                "calls_per_step": len(spans) / max(steps, 1),
                "median_ms": 1000 * statistics.median(spans),
                "total_s": sum(spans),
                "share": sum(spans) / whole_s,
            }
        )
    return sorted(rows, key=lambda row: -float(row["total_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="activation cache (the demo's, say)")
    parser.add_argument("--arch", default="topk+multi", help="an architecture; A+multi for multi-TopK")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=0, help="training tokens (0 = the demo's: the split twice)")
    parser.add_argument("--runs", default="/tmp/step_parts", help="where the fit's run folder goes")
    args = parser.parse_args()
    with timed_calls(PLACES) as times:
        result = archs.ours_child(args)
    rows = table(times, int(result["steps"]), float(result["train_s"]))
    print(f"whole fit {result['train_s']:.1f} s, {result['steps']} steps, {torch.get_num_threads()} thread(s)")
    print(f"{'place':34s} {'calls/step':>10s} {'median ms':>10s} {'total s':>8s} {'share':>6s}")
    for row in rows:
        print(
            f"{row['place']:34s} {row['calls_per_step']:10.2f} {row['median_ms']:10.2f} "
            f"{row['total_s']:8.2f} {row['share']:6.1%}"
        )
    print("RESULT " + json.dumps({**result, "parts": rows}), flush=True)


if __name__ == "__main__":
    main()
