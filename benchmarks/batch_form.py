"""Held-out FVU and L0 of a BatchTopK-family SAE in its training form: the batch top-k (k x B over batches of B
rows) of ReLU(pre-activations), instead of the threshold it was saved with (issue 30's benchmark notes).

    python -m benchmarks.batch_form RUN [RUN ...] --held /tmp/archs/held.npy --k 32

SAELens saves its BatchTopK and Matryoshka trainers as JumpReLU SAEs with one estimated threshold; on a short run
that threshold lags (benchmarks/RESULTS.md), so their saved form and their training form differ. Reads the run's
W_enc, b_enc, W_dec, b_dec as every single-layer SAE of the TopK family names them.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline.sae.archs.batchtopk import batch_topk
from pipeline.sae.folder import load_sae
from pipeline.sae.quality import Reconstruction


def batch_form(run: str, x: np.ndarray, k: int, batch: int) -> tuple[float, float]:
    """(FVU, L0) of ``run`` over the rows ``x`` (R, D), batch top-k per ``batch`` rows."""
    sae, _ = load_sae(run)
    w = sae.state_dict()  # the TopK family's names: W_enc (N, D), b_enc (N,), W_dec (N, D), b_dec (D,)
    rec, active = Reconstruction(), 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch])  # (b, D)
            pre = ((xb - w["b_dec"]) @ w["W_enc"].t() + w["b_enc"]).relu()  # (b, N)
            found = batch_topk(pre, k * len(xb), k)  # (M,) flat positions
            z = torch.zeros_like(pre).view(-1).index_copy_(0, found, pre.view(-1)[found]).view(pre.shape)  # (b, N)
            rec.add(xb.double(), (z @ w["W_dec"] + w["b_dec"]).double())
            active += int((z > 0).sum())
    return rec.fvu, active / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--held", required=True, help="held-out rows, float32 .npy (rows, d)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    x = np.load(args.held)
    for run in args.runs:
        fvu, l0 = batch_form(run, x, args.k, args.batch)
        print(f"{run}: training-form FVU {fvu:.4f}, L0 {l0:.1f}")


if __name__ == "__main__":
    main()
