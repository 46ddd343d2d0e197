"""Four ways to pick the latents a task needs.

mask    continuous sparsification: one real-valued logit m per latent per site, soft mask
        sigmoid(m * T) with T = t_max ** progress rising over training, loss
            mean_pairs relu(ld_all - ld_masked) / gap  +  lambda * sum(soft mask)
        (the task term only asks to *keep* each pair's clean logit difference ld_all, measured in units of
        gap = ld_all - ld_empty, so lambda is the faithfulness one latent must buy), Adam; the circuit is m > 0.
ig      integrated gradients of the logit difference along the path that moves every site's latents from
        the patch run's code to the clean run's together (the kept share goes 0 -> 1 at all sites; downstream
        codes are computed live); score = (z_clean - z_patch) x mean gradient, summed over positions.
ig_layer  the same path one site at a time, every other site's latents left live (clean upstream, responding
        downstream), as Marks et al. (2024) attribute each submodule: one path per site, so a site's scores do
        not carry the other sites' move (costs ig x the number of sites).
attrib  the same at the clean end only (one gradient): attribution patching.
ig, ig_layer and attrib rank latents by score (largest first: the latents that raise the clean answer); the top N
for each N in ``sizes`` are their circuits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.circuit.spliced import Batch, Masking, Site, logit_diff, patch_codes
from pipeline.infra.console import progress_bar

MASK_INIT = 1.0  # initial logit: soft mask sigmoid(1) = 0.73 at T = 1, every latent starts mostly kept
INIT_NOISE = 0.1  # spread of the initial logits (about one Adam step): two seeds start from different masks


class Lens(NamedTuple):
    """The model with SAEs and the task's batches, shared by every method."""

    model: nn.Module
    blocks: nn.ModuleList
    sites: list[Site]
    ablate: list[Tensor]  # per site (N,): the value of a latent outside the circuit

    def ld(self, batch: Batch, keep: list[Tensor] | None) -> Tensor:
        """(B,) logit differences on the clean prompts with each site's latents kept by ``keep``."""
        masking = Masking(keep, self.ablate) if keep is not None else None
        return logit_diff(self.model, self.blocks, self.sites, "clean", batch, masking)

    def ones(self) -> list[Tensor]:
        return [torch.ones(s.sae.cfg.n_latents, device=s.sae.W_dec.device) for s in self.sites]


def train_mask(
    lens: Lens, train: list[Batch], lam: float, steps: int, lr: float, t_max: float, seed: int
) -> list[Tensor]:
    """Per site the trained mask logits (N,), started at MASK_INIT plus noise drawn from ``seed``; the circuit
    is where they are positive."""
    with torch.no_grad():
        full = [lens.ld(b, None) for b in train]  # (B,) each: every latent kept = the clean model
        empty = [lens.ld(b, [0 * k for k in lens.ones()]) for b in train]
    gap = max(float(torch.cat(full).mean() - torch.cat(empty).mean()), 1e-3)
    generator = torch.Generator().manual_seed(seed)
    logits = [
        (MASK_INIT + INIT_NOISE * torch.randn(k.shape, generator=generator)).to(k.device).requires_grad_()
        for k in lens.ones()
    ]
    optimizer = torch.optim.Adam(logits, lr=lr)
    n_pairs = sum(len(b.clean) for b in train)
    with progress_bar(f"mask lambda={lam:g}", steps, unit="step") as bar:
        for step in range(steps):
            temperature = t_max ** (step / max(steps - 1, 1))
            optimizer.zero_grad()
            for batch, target in zip(train, full):
                keep = [torch.sigmoid(m * temperature) for m in logits]
                shortfall = (target - lens.ld(batch, keep)).relu().sum() / (gap * n_pairs)
                shortfall.backward()
            size = torch.stack([torch.sigmoid(m * temperature).sum() for m in logits]).sum()
            (lam * size).backward()
            optimizer.step()
            bar.advance(0, 1)
    return [m.detach() for m in logits]


def attributions(lens: Lens, train: list[Batch], steps: int, per_site: bool = False) -> list[Tensor]:
    """Per site (N,) integrated-gradient scores over ``steps`` points of the patch -> clean path, summed over
    positions and averaged over pairs; ``steps`` = 1 gives attribution patching (the clean end only).
    ``per_site``: one path per site, the others left live (ig_layer), instead of all sites moving together."""
    alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    scores = [torch.zeros_like(k) for k in lens.ones()]
    n_pairs = sum(len(b.clean) for b in train)
    moves = [[i] for i in range(len(scores))] if per_site else [list(range(len(scores)))]
    name = "attrib" if steps == 1 else "ig_layer" if per_site else "ig"
    with progress_bar(name, len(train) * len(moves) * len(alphas), unit="pass") as bar:
        for batch in train:
            start = patch_codes(lens.model, lens.blocks, lens.sites, batch)  # (B, T, N) per site
            for moved, alpha in ((m, a) for m in moves for a in alphas):
                keep = [
                    torch.full_like(k, alpha, requires_grad=True) if i in moved else k
                    for i, k in enumerate(lens.ones())
                ]
                ld = logit_diff(lens.model, lens.blocks, lens.sites, "clean", batch, Masking(keep, start))
                grads = torch.autograd.grad(ld.sum(), [keep[i] for i in moved])
                for i, grad in zip(moved, grads):
                    scores[i] += grad / (len(alphas) * n_pairs)
                bar.advance(0, 1)
    return scores


def top_circuits(scores: list[Tensor], sizes: list[int]) -> list[tuple[int, list[Tensor]]]:
    """(size, per-site bool mask) of the ``size`` best-scoring latents over all sites, for each size."""
    flat = torch.cat(scores)  # (sum N,)
    order = flat.argsort(descending=True)
    out = []
    for size in sorted({min(s, len(flat)) for s in sizes}):
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order[:size]] = True
        out.append((size, list(chosen.split([len(s) for s in scores]))))
    return out
