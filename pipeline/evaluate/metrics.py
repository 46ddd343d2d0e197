"""Metric definitions, one each, as written into metrics.json and the README (nmse and fvu are
computed by :mod:`pipeline.sae.quality`, shared with the training log).

Reconstruction (normalized space, over held-out tokens):
  nmse         mean over tokens of ||x - x_hat||^2 / ||x||^2            (the RouteSAE NormMSE)
  fvu          sum ||x - x_hat||^2 / sum ||x - mean(x)||^2              (fraction of variance unexplained)
  l0           mean number of active (non-zero) latents per token
  dead_share   share of latents never active on the evaluated tokens
  train_dead_share  share never active on any of the cache's training rows (opt-in: dead, not rare)
  train_fvu / train_nmse / train_l0  fvu / nmse / l0 over the cache's training rows (opt-in: what to
                  choose settings by)
  dense_latents  number of latents active on more than 10 % of the evaluated tokens
  live_latents   number of latents active on more than 0.01 % of them (features found)
Spliced into the LLM (logits over held-out sequences):
  kl_per_token    mean over real (non-special) positions of KL(p_clean || p_spliced), in nats
  kl_paper_scale  sum of that KL over real positions / number of sequences (the RouteSAE paper's
                  `batchmean` scale; grows with sequence length)
  kl_zero_per_token  the same KL with the layer's residual stream zeroed instead (the scale of "worst")
  ce_clean / ce_spliced / ce_zero  mean next-token cross-entropy (nats) over positions whose input
                  and target are real tokens; zero = the layer's residual stream set to 0 there
  ce_recovered    (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 = no loss, 0 = as bad as zeroing
"""

from __future__ import annotations

DEFINITIONS = {
    "nmse": "mean over tokens of ||x - x_hat||^2 / ||x||^2 (normalized space)",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (normalized space)",
    "l0": "mean number of active latents per token",
    "dead_share": "share of latents never active on the evaluated tokens",
    "dense_latents": "number of latents active on more than 10 % of the evaluated tokens",
    "train_dead_share": "share of latents active on none of the cache's training rows (--metrics train_dead)",
    "train_fvu": "fvu over the cache's training rows (--metrics train_fvu)",
    "train_nmse": "nmse over the cache's training rows (--metrics train_fvu)",
    "train_l0": "mean number of active latents per token over the cache's training rows (--metrics train_fvu)",
    "live_latents": "number of latents active on more than 0.01 % of the evaluated tokens",
    "top_route_share": "RouteSAE: the largest share of tokens routed to one layer (1 = collapsed onto one layer)",
    "kl_per_token": "mean over real positions of KL(p_clean || p_spliced), nats",
    "kl_paper_scale": "sum over real positions of KL(p_clean || p_spliced) / number of sequences (RouteSAE paper)",
    "kl_zero_per_token": "mean over real positions of KL(p_clean || p_zeroed), nats",
    "ce_clean": "mean next-token cross-entropy, clean model, nats",
    "ce_spliced": "mean next-token cross-entropy with the SAE reconstruction spliced in, nats",
    "ce_zero": "mean next-token cross-entropy with the layer's residual stream zeroed, nats",
    "ce_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean)",
}


def ce_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(ce_zero - ce_spliced) / (ce_zero - ce_clean); NaN when zeroing costs nothing."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if abs(gap) > 1e-9 else float("nan")
