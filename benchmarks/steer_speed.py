"""Generation speed with one latent edit against plain `generate` (the steering issue's target: >= 0.9x).

    python -m benchmarks.steer_speed --run cache/saes/<run> [--tokens 64] [--repeats 5]

Greedy generation of the same prompt, alternating plain and edited runs; medians of tokens per second.
Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import statistics
import time

import torch

from pipeline.steer.config import SteerConfig
from pipeline.steer.edits import Positions
from pipeline.steer.generation import generate
from pipeline.steer.intervene import steering
from pipeline.steer.session import open_session
from pipeline.steer.stage import make_target

PROMPT = "The history of the printing press begins"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = SteerConfig(run=args.run, features=["7=add:10"], max_new_tokens=args.tokens, device="cpu")
    session = open_session(cfg)
    model, blocks = session.model, session.blocks
    ids = session.tokenizer(PROMPT, return_tensors="pt").input_ids
    target = make_target(session, cfg)
    times: dict[str, list[float]] = {"plain": [], "edited": []}
    generate(model, ids, cfg.max_new_tokens, cfg.sample, cfg.temperature, cfg.seed)  # warm-up
    for _ in range(args.repeats):
        for name in times:
            start = time.perf_counter()
            if name == "plain":
                out = generate(model, ids, cfg.max_new_tokens, cfg.sample, cfg.temperature, cfg.seed)
            else:
                with steering(model, blocks, [target], "delta", Positions(), ids.shape[1]):
                    out = generate(model, ids, cfg.max_new_tokens, cfg.sample, cfg.temperature, cfg.seed)
            times[name].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    plain, edited = (statistics.median(times[n]) for n in ("plain", "edited"))
    print(f"plain generate: {plain:.1f} tok/s; one edit (delta): {edited:.1f} tok/s; ratio {edited / plain:.2f}")


if __name__ == "__main__":
    main()
