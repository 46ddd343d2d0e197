"""The GPU benchmark entry point (issue 19): on a machine with a CUDA GPU, the 4-member sweep against
separate fits (benchmarks/bench_sweep.py on cuda), appended to benchmarks/RESULTS.md; without one it
says so and exits 0.

    python -m benchmarks.gpu --cache CACHE [--write]

Not done yet (issue 19, part 3): fit steps, extract and evaluate at real shapes in bf16 and fp32,
sparsify side by side, pinned host buffers and copies overlapped with the step in the stream. No GPU
has been available to this project so far, so none of its numbers exist.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a one-layer activation cache (needed only where a GPU is present)")
    parser.add_argument("--write", action="store_true", help="prepend the GPU section to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device here, so there is nothing to measure (exit 0).")
        return 0
    from benchmarks.bench_sweep import main as sweep_main  # the same harness, on the GPU

    if not args.cache:
        parser.error("--cache is required on a GPU machine")
    sys.argv = ["bench_sweep", "--cache", args.cache, "--device", "cuda", "--grid", "0", *(["--write"] * args.write)]
    sweep_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
