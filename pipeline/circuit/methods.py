"""Four ways to pick the latents a task needs, all in one parametrization: each latent's kept share ``keep``
in [0, 1] between its ablated value (the same mean ablation every circuit is measured with) and its live value.

mask    continuous sparsification: one real-valued logit m per latent per site, soft mask
        sigmoid(m * T) with T = t_max ** progress rising over training, loss
            mean_pairs relu(ld_all - ld_masked) / gap  +  lambda * sum(soft mask)
        (the task term only asks to *keep* each pair's clean logit difference ld_all, measured in units of
        gap = ld_all - ld_empty on the train pairs, so lambda is the faithfulness one latent must buy), Adam;
        the circuit is m > 0. All lambdas train together: one mask per lambda, each on its own copy of the
        batch (stacked along the batch dimension), so one forward and backward serves every lambda; Adam is
        elementwise and the losses add, so each mask gets exactly the update it would get alone.
ig      integrated gradients of the logit difference along keep = alpha at every latent of every site
        together, alpha 0 -> 1 (ablated -> clean; downstream codes computed live): score = mean over the
        path of d ld / d keep, which is (z - a) x the gradient on z', summed over positions.
ig_layer  the same path one site at a time, every other site's latents left live (clean upstream, responding
        downstream), as Marks et al. (2024) attribute each submodule: one path per site, so a site's scores do
        not carry the other sites' move (costs ig x the number of sites).
attrib  the same at the clean end only (one gradient, alpha = 1): attribution patching against the mean.
ig, ig_layer and attrib rank latents by absolute score (a latent that pushes the wrong answer matters as much as
one that pushes the right one); the top N for each N in ``sizes`` are their circuits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.circuit.spliced import Batch, Masking, logit_diff, tiled
from pipeline.infra.console import progress_bar
from pipeline.live.edit import Site

MASK_INIT = 1.0  # initial logit: soft mask sigmoid(1) = 0.73 at T = 1, every latent starts mostly kept
INIT_NOISE = 0.1  # spread of the initial logits (about one Adam step): two seeds start from different masks


class MaskHyper(NamedTuple):
    """The mask's optimization settings."""

    steps: int
    lr: float
    t_max: float


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
        return [torch.ones(s.sae.cfg.n_latents, device=s.sae.device) for s in self.sites]


def train_masks(
    lens: Lens, train: list[Batch], targets: list[Tensor], gap: float, lams: list[float], hyper: MaskHyper, seed: int
) -> list[list[Tensor]]:
    """Per lambda, per site the trained mask logits (N,), all started at MASK_INIT plus the same noise drawn
    from ``seed``; the circuit is where they are positive. ``targets``: each train batch's clean logit
    differences (B,); ``gap``: the train pairs' clean-minus-empty gap (> 0)."""
    generator = torch.Generator().manual_seed(seed)
    starts = [MASK_INIT + INIT_NOISE * torch.randn(k.shape, generator=generator) for k in lens.ones()]  # (N,)
    logits = [m.repeat(len(lams), 1).to(k.device).requires_grad_() for m, k in zip(starts, lens.ones())]  # (L, N)
    weights = torch.tensor(lams, device=logits[0].device)  # (L,)
    stacked = [tiled(b, len(lams)) for b in train]  # (L * B, T): row block l runs under mask l
    optimizer = torch.optim.Adam(logits, lr=hyper.lr)
    n_pairs = sum(len(b.clean) for b in train)
    with progress_bar(f"mask lambda={','.join(f'{x:g}' for x in lams)}", hyper.steps, unit="step") as bar:
        for step in range(hyper.steps):
            temperature = hyper.t_max ** (step / max(hyper.steps - 1, 1))
            optimizer.zero_grad()
            for batch, target in zip(stacked, targets):
                keep = [torch.sigmoid(m * temperature) for m in logits]  # (L, N) each
                ld = lens.ld(batch, keep).view(len(lams), -1)  # (L, B)
                shortfall = (target - ld).relu().sum() / (gap * n_pairs)  # summed over lambdas
                shortfall.backward()
            size = torch.stack([torch.sigmoid(m * temperature).sum(1) for m in logits]).sum(0)  # (L,)
            (weights * size).sum().backward()
            optimizer.step()
            bar.advance(0, 1)
    return [[m[i].detach() for m in logits] for i in range(len(lams))]


def attributions(lens: Lens, train: list[Batch], steps: int, per_site: bool = False) -> list[Tensor]:
    """Per site (N,) integrated-gradient scores of the kept share over ``steps`` midpoints of the ablated -> clean
    path, summed over positions and averaged over pairs; ``steps`` = 1 gives attribution patching (the clean
    end only). ``per_site``: one path per site, the others left live (ig_layer), instead of all moving together."""
    alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    scores = [torch.zeros_like(k) for k in lens.ones()]
    n_pairs = sum(len(b.clean) for b in train)
    moves = [[i] for i in range(len(scores))] if per_site else [list(range(len(scores)))]
    name = "attrib" if steps == 1 else "ig_layer" if per_site else "ig"
    with progress_bar(name, len(train) * len(moves) * len(alphas), unit="pass") as bar:
        for batch in train:
            for moved, alpha in ((m, a) for m in moves for a in alphas):
                keep = [
                    torch.full_like(k, alpha, requires_grad=True) if i in moved else k
                    for i, k in enumerate(lens.ones())
                ]
                ld = logit_diff(lens.model, lens.blocks, lens.sites, "clean", batch, Masking(keep, lens.ablate))
                grads = torch.autograd.grad(ld.sum(), [keep[i] for i in moved])
                for i, grad in zip(moved, grads):
                    scores[i] += grad / (len(alphas) * n_pairs)
                bar.advance(0, 1)
    return scores


def top_circuits(scores: list[Tensor], sizes: list[int]) -> list[tuple[int, list[Tensor]]]:
    """(size, per-site bool mask) of the ``size`` latents of largest absolute score over all sites, per size."""
    flat = torch.cat(scores).abs()  # (sum N,)
    order = flat.argsort(descending=True)
    out = []
    for size in sorted({min(s, len(flat)) for s in sizes}):
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order[:size]] = True
        out.append((size, list(chosen.split([len(s) for s in scores]))))
    return out
