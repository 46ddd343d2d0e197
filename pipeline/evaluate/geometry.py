"""The geometry suite: how an SAE's latent directions sit against each other, from its weights alone.

max decoder cosine   each latent's largest cosine similarity with another latent's decoder direction
                     (SAEBench's per-feature ``max_decoder_cosine_sim``; its mean is their
                     ``average_max_decoder_cosine_sim``)
encoder-decoder cos  the cosine of a latent's encoder row with its own decoder direction
                     (SAEBench's ``encoder_decoder_cosine_sim``: 1 = the latent reads what it writes)
near duplicates      the share of latents whose decoder direction has cosine above DUPLICATE with
                     another latent's: a pair that close writes the same direction twice
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.interop.saebench import EvalResult
from pipeline.sae.interface import SAE

DUPLICATE = 0.9  # cosine above which two decoder directions count as one direction written twice
CHUNK = 1024  # rows of the (N, N) cosine matrix held at once
QUANTILES = (0.1, 0.5, 0.9, 0.99)
EVAL_TYPE = "sae_pipe_geometry"


class Geometry(NamedTuple):
    """Per-latent weight statistics, each (N,)."""

    max_decoder_cos: Tensor  # largest cosine with another latent's decoder direction
    nearest: Tensor  # that other latent (int64)
    max_encoder_cos: Tensor  # largest cosine with another latent's encoder row
    encoder_decoder_cos: Tensor  # cosine of a latent's encoder row with its own decoder direction
    encoder_norm: Tensor
    encoder_bias: Tensor


def max_cosine(rows: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``rows`` (N, D): its largest cosine with any other row, and which row that is."""
    unit = torch.nn.functional.normalize(rows.float(), dim=1)  # (N, D) float32: cosines to ~1e-7, 3x faster
    best = torch.empty(len(unit), dtype=torch.float32, device=unit.device)  # (N,)
    which = torch.empty(len(unit), dtype=torch.int64, device=unit.device)  # (N,)
    for start in range(0, len(unit), CHUNK):
        sims = unit[start : start + CHUNK] @ unit.T  # (c, N)
        own = torch.arange(start, start + len(sims), device=unit.device)  # (c,)
        sims[torch.arange(len(sims), device=unit.device), own] = -torch.inf  # a latent is not its own neighbour
        best[start : start + len(sims)], which[start : start + len(sims)] = sims.max(dim=1)
    return best.double(), which


@torch.no_grad()
def latent_geometry(sae: SAE) -> Geometry:
    """Every per-latent statistic of the SAE's weights."""
    decoder = sae.directions().detach()  # (N, D)
    encoder, bias = sae.encoder_rows()  # (N, D), (N,)
    max_dec, nearest = max_cosine(decoder)
    max_enc, _ = max_cosine(encoder)
    aligned = torch.nn.functional.cosine_similarity(encoder.double(), decoder.double(), dim=1)  # (N,)
    return Geometry(max_dec, nearest, max_enc, aligned, encoder.double().norm(dim=1), bias.double())


def _spread(name: str, values: Tensor) -> dict[str, float]:
    """Mean and quantiles of ``values`` (N,), named ``<name>_mean``, ``<name>_p10``, ..."""
    qs = torch.quantile(values.double().cpu(), torch.tensor(QUANTILES, dtype=torch.float64))  # (Q,)
    named = {f"{name}_p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)}
    return {f"{name}_mean": float(values.mean()), **named}


def geometry_result(g: Geometry) -> EvalResult:
    """The geometry suite of one SAE from its :func:`latent_geometry`, in SAEBench's output shape."""
    duplicates = g.max_decoder_cos > DUPLICATE  # (N,) in a near-duplicate pair
    metrics = {
        "decoder": _spread("max_decoder_cosine_sim", g.max_decoder_cos),
        "encoder": _spread("max_encoder_cosine_sim", g.max_encoder_cos),
        "encoder_decoder": _spread("encoder_decoder_cosine_sim", g.encoder_decoder_cos),
        "duplicates": {"frac_near_duplicate": float(duplicates.double().mean()), "cutoff": DUPLICATE},
    }
    details = [
        {"index": i, "max_decoder_cosine_sim": d, "nearest_latent": n, "encoder_decoder_cosine_sim": a}
        for i, (d, n, a) in enumerate(
            zip(g.max_decoder_cos.tolist(), g.nearest.tolist(), g.encoder_decoder_cos.tolist())
        )
    ]
    return EvalResult(EVAL_TYPE, {"duplicate_cutoff": DUPLICATE, "quantiles": list(QUANTILES)}, metrics, details, {})
