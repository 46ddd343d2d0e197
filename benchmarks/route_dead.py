"""Why a RouteSAE's latents are silent on the held-out rows: dead or rare, and dead since when.

    python -m benchmarks.route_dead RUN

Per latent: does it fire on the routed held-out rows, on the routed training rows, and on any layer's held-out
rows had the router picked that layer (x_l times the router's weight for l)? Then the training log's dead share
(idle dead_tokens tokens) over training, which tells latents that died at the start from ones starved later.
Never run inside the tests. Printed only (benchmarks/RESULTS.md 2026-12-04 05:15 quotes it).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import csv
from pathlib import Path

import torch

from pipeline.live.subject import Subject, load_subject

STRIDE = 12  # log rows between printed training points


@torch.no_grad()
def fire_counts(s: Subject) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Firings per latent on routed rows of each split (N,), on each layer's held-out rows as if routed
    there (L, N), and held-out rows per chosen layer (L,)."""
    n, n_layers = s.cfg["sae"]["n_latents"], len(s.layers)
    routed = {split: torch.zeros(n) for split in ("train", "heldout")}
    per_layer, chosen = torch.zeros(n_layers, n), torch.zeros(n_layers)
    for split, counts in routed.items():
        for _, rows in s.cache.split_rows(split, s.layers):
            for start in range(0, len(rows), 4096):
                xs = torch.from_numpy(rows[start : start + 4096]).float()  # (b, L, D)
                out = s.sae(xs)
                counts += torch.bincount(out.latents.indices[out.latents.acts > 0], minlength=n)
                if split == "heldout":
                    assert out.layer_choice is not None and out.layer_weights is not None  # hard routing
                    chosen += torch.bincount(out.layer_choice, minlength=n_layers)
                    for layer in range(n_layers):  # the SAE's input had the router picked this layer
                        code = s.sae.encode(xs[:, layer] * out.layer_weights[:, layer : layer + 1])  # (b, D)
                        per_layer[layer] += torch.bincount(code.indices[code.acts > 0], minlength=n)
    return routed, per_layer, chosen


def report(run: str) -> None:
    s = load_subject(run, torch.device("cpu"))
    if not s.is_route or s.soft_routed:
        raise SystemExit(f"{run} is not a hard-routed RouteSAE")
    routed, per_layer, chosen = fire_counts(s)
    silent = routed["heldout"] == 0
    shares = ", ".join(f"L{layer} {share:.0%}" for layer, share in zip(s.layers, (chosen / chosen.sum()).tolist()))
    print(f"held-out rows per chosen layer: {shares}")
    print(f"silent on the routed held-out rows: {int(silent.sum())} ({float(silent.double().mean()):.2%})")
    print(f"silent on every routed training row: {int((routed['train'] == 0).sum())}")
    print(f"  held-out-silent that fire on training rows (rare): {int((silent & (routed['train'] > 0)).sum())}")
    elsewhere = int((silent & (per_layer.sum(0) > 0)).sum())
    print(f"  held-out-silent that fire on some layer's rows had it been routed: {elsewhere}")
    with open(Path(run) / "log.csv", encoding="utf-8") as f:
        log = list(csv.DictReader(f))
    for row in [*log[:: max(1, len(log) // STRIDE)], log[-1]]:
        print(f"step {row['step']:>6}: dead share {float(row['dead_share']):.3f}, fvu {float(row['fvu']):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a RouteSAE run folder")
    report(parser.parse_args().run)


if __name__ == "__main__":
    main()
