"""Is a run's held-out dead share a property of the SAE, or of how few held-out tokens there are?

A latent that fires once in 20,000 tokens is silent on a 21k-token held-out split about a third of the
time, so a large dictionary with many rare (but live) features shows a held-out "dead share" that no
training recipe removes. This benchmark puts the held-out number beside the same count on samples of
the run's own training rows of the held-out split's size (whole blocks of ctx_len rows, as held-out
sequences are whole), and beside the share silent on every training row:

    python -m benchmarks.dead_floor RUN [RUN...] [--samples 20] [--write]

If the held-out share is close to the training-sample share, the held-out rows are too few to tell rare
from dead; only the last column counts latents the data never reaches. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
from typing import NamedTuple

import numpy as np
import torch

from benchmarks.report import publish
from pipeline.infra.files import Folder
from pipeline.live.subject import Subject, load_subject


class Floor(NamedTuple):
    """One run's dead shares, each a share of all latents."""

    heldout: float  # silent on every held-out row
    sample_mean: float  # silent on a training sample as large as the held-out split, mean over samples
    sample_min: float
    sample_max: float
    train: float  # silent on every training row


@torch.no_grad()
def block_counts(s: Subject, split: str, block: int) -> torch.Tensor:
    """How often each latent fires in each run of ``block`` consecutive rows of ``split``: (blocks, N)."""
    n_latents = s.cfg["sae"]["n_latents"]
    device = next(s.sae.parameters()).device
    counts = []
    for _, rows in s.cache.split_rows(split, s.layers):
        for start in range(0, len(rows), block):
            x = torch.from_numpy(rows[start : start + block]).to(device=device, dtype=torch.float32)  # (b, L, D)
            latents = s.sae(x if s.is_route else x[:, 0]).latents
            counts.append(torch.bincount(latents.indices[latents.acts > 0], minlength=n_latents).cpu())
    return torch.stack(counts)  # (blocks, N)


def sampled_dead_shares(counts: torch.Tensor, blocks: int, samples: int, seed: int) -> list[float]:
    """Share of latents silent on ``blocks`` blocks drawn without replacement from ``counts`` (blocks, N),
    once per sample."""
    generator = torch.Generator().manual_seed(seed)
    picks = (torch.randperm(len(counts), generator=generator)[:blocks] for _ in range(samples))
    return [float((counts[pick].sum(dim=0) == 0).double().mean()) for pick in picks]


def measure(run: str, samples: int, seed: int) -> Floor:
    s = load_subject(run, torch.device("cpu"))
    block = int(s.cache.manifest["spec"]["ctx_len"])
    train = block_counts(s, "train", block)
    heldout_rows = s.cache.rows("heldout")
    shares = sampled_dead_shares(train, round(heldout_rows / block), samples, seed)
    heldout = block_counts(s, "heldout", block)
    return Floor(
        heldout=float((heldout.sum(dim=0) == 0).double().mean()),
        sample_mean=float(np.mean(shares)),
        sample_min=min(shares),
        sample_max=max(shares),
        train=float((train.sum(dim=0) == 0).double().mean()),
    )


def table(floors: list[tuple[str, Floor]]) -> list[str]:
    lines = [
        "| run | held-out dead share | dead share on training samples of the held-out size (min-max) "
        "| silent on all training rows |",
        "|---|---|---|---|",
    ]
    for name, f in floors:
        lines.append(
            f"| {name} | {f.heldout:.2%} | {f.sample_mean:.2%} ({f.sample_min:.2%}-{f.sample_max:.2%}) "
            f"| {f.train:.2%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (fit outputs)")
    parser.add_argument("--samples", type=int, default=20, help="training samples per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    floors = [(Folder.at(run).name, measure(run, args.samples, args.seed)) for run in args.runs]
    publish(table(floors), "held-out dead share against its sampling floor", "benchmarks.dead_floor", args.write)


if __name__ == "__main__":
    main()
