"""Training many SAEs from one pass over the stream: each batch feeds every member in turn.

A member is one SAE with its own optimizer, schedule and dead-latent counters. Members never
interact, so a member trained in a sweep ends with the same weights as the same setting trained
alone; they share only the batches.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from pipeline.fit.config import Training
from pipeline.fit.optim import lr_factor, make_optimizer, param_groups
from pipeline.fit.state import TrainingState, load_state, save_state
from pipeline.infra.distributed import Ranks
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.interface import build_sae
from pipeline.sae.kernels import aux_decode, select_topk
from pipeline.sae.quality import Reconstruction
from pipeline.sae.route import RouteSAE, core_sae
from pipeline.sae.topk import SaeConfig, SaeOutput, TopKSAE

REFERENCE_RENORM = 100  # the RouteSAE reference renormalizes decoder columns every 100 batches (its --steps)
LOG_FIELDS = ["step", "tokens", "nmse", "fvu", "l0", "dead_share", "aux_loss", "lr", "tokens_per_s"]


@dataclass
class Member:
    """One SAE being trained, with everything that is its own."""

    folder: Folder
    sae_cfg: SaeConfig
    settings: Training  # resolved and validated once, by fit.plan
    low_precision: bool  # bf16 encoder GEMM
    layer_pos: list[int]  # its layers' positions on the stream's layer axis
    model: TopKSAE | RouteSAE  # the SAE itself
    optimizer: torch.optim.Optimizer
    since_fired: Tensor  # (N,) tokens since each latent last fired
    ranks: Ranks = field(default_factory=Ranks)  # the processes training it together (torchrun)
    net: nn.Module | None = None  # what runs the forward: the model, or its DistributedDataParallel wrapper
    step: int = 0
    log_rows: int = 0
    pending_log: list[dict[str, float]] = field(default_factory=list)


def make_member(
    folder: Folder,
    sae_cfg: SaeConfig,
    settings: Training,
    low_precision: bool,
    layer_pos: list[int],
    device: torch.device,
) -> Member:
    """A freshly initialized member (seeded), or the member restored from its training state."""
    generator = torch.Generator().manual_seed(settings.seed)
    model = cast(TopKSAE | RouteSAE, build_sae(sae_cfg, generator).to(device).train())  # what fit trains
    # sae-pipe keeps decoder rows on the unit sphere every step (tangent gradients + renormalization); the
    # reference recipe lets them drift and renormalizes every REFERENCE_RENORM steps, as its code does
    core_sae(model).tangent_decoder_grad = settings.recipe != "reference"
    groups = param_groups(model, settings.lr, settings.router_lr)
    optimizer = make_optimizer(settings.optimizer, groups, settings.betas, device)
    member = Member(
        folder,
        sae_cfg,
        settings,
        low_precision,
        layer_pos,
        model,
        optimizer,
        torch.zeros(sae_cfg.n_latents, dtype=torch.int64, device=device),
    )
    state = load_state(folder, model, device)
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        member.since_fired, member.step, member.log_rows = state.since_fired.to(device), state.step, state.log_rows
        _truncate_log(folder, state.log_rows)
    return member


def member_input(member: Member, batch: Tensor) -> Tensor:
    """The member's view of a layer-major batch (L, B, D): (B, D) for TopK, (B, L', D) for RouteSAE."""
    if member.sae_cfg.arch == "route":
        pos = member.layer_pos
        if pos == list(range(pos[0], pos[0] + len(pos))):  # consecutive layers: a view, not a 16-layer copy
            return batch[pos[0] : pos[0] + len(pos)].transpose(0, 1)
        return batch[pos].transpose(0, 1)
    return batch[member.layer_pos[0]]


def init_pre_bias(member: Member, x: Tensor) -> None:
    """TopK: set b_dec to the data mean of the first batch (the geometric center of the inputs).

    RouteSAE keeps b_dec at zero, as the reference does: its input is ``w * x``, whose mean the router
    moves. Neither start keeps the router from collapsing on SmolLM2 (benchmarks/RESULTS.md: zero start
    99 % of tokens to one layer, mean start 54 %); `--route-balance` does, at a cost in NMSE.
    """
    if member.sae_cfg.arch == "route":
        return
    sae = core_sae(member.model)
    with torch.no_grad():  # the same on every rank: the mean of the ranks' first batches
        sae.b_dec.copy_(member.ranks.average_((x.mean(dim=1) if x.ndim == 3 else x).mean(dim=0)))


def shared_selection(members: list[Member], batch: Tensor) -> list[Tensor | None]:
    """Top-k indices of the TopK members, chosen by encoder GEMMs shared by the members reading the same
    layer (kernels.select_topk); None for a RouteSAE, whose input is its own router's mix.

    Each member's slice of the shared GEMM is the GEMM it would run alone, and it is selected before any
    member steps, so every member trains exactly as it would alone.
    """
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, member in enumerate(members):
        if member.sae_cfg.arch == "topk":
            groups.setdefault((member.layer_pos[0], member.low_precision), []).append(i)
    chosen: list[Tensor | None] = [None] * len(members)
    for (pos, low_precision), group in groups.items():
        encoders = [core_sae(members[i].model).encoder() for i in group]
        for i, indices in zip(group, select_topk(batch[pos], encoders, low_precision)):
            chosen[i] = indices
    return chosen


def train_step(member: Member, x: Tensor, total_steps: int, chosen: Tensor | None = None) -> dict[str, float]:
    """One optimizer step on batch ``x`` (with the top-k indices ``chosen`` by a shared selection); returns
    its metrics."""
    s = member.settings
    net = member.net or member.model
    out: SaeOutput = net(x, low_precision=member.low_precision, **({} if chosen is None else {"chosen": chosen}))
    quality = Reconstruction()
    nmse = quality.add(out.x, out.x_hat)
    if not math.isfinite(quality.nmse):  # one sync: the metrics below read it anyway
        raise UserError(
            f"training diverged at step {member.step}: the reconstruction error is {quality.nmse}; "
            "lower --lr (0 = the automatic one)."
        )
    dead = member.since_fired >= s.dead_tokens  # (N,)
    aux = _aux_loss(member, out, dead) if bool(dead.any()) and s.aux_alpha > 0 else torch.zeros((), device=x.device)
    loss = nmse + s.aux_alpha * aux
    if s.route_balance > 0 and out.layer_weights is not None:
        loss = loss + s.route_balance * balance_loss(out.layer_weights)
    loss.backward()
    for group in member.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(member.step, total_steps, s.schedule)
    member.optimizer.step()
    member.optimizer.zero_grad(set_to_none=True)
    if s.recipe != "reference" or member.step % REFERENCE_RENORM == 0:
        member.model.normalize_decoder()
    revive(member, out, dead)
    _update_dead(member, out, len(x))
    member.step += 1
    with torch.no_grad():
        l0 = (out.latents.acts > 0).sum(dim=1).float().mean()
    return {
        "nmse": quality.nmse,
        "fvu": quality.fvu,
        "l0": float(l0),
        "aux_loss": float(aux.detach()),
        "dead_share": float(dead.float().mean()),  # never active in the last dead_tokens tokens
        "lr": member.optimizer.param_groups[0]["lr"],
        **({"router_lr": member.optimizer.param_groups[1]["lr"]} if len(member.optimizer.param_groups) > 1 else {}),
        **_routing(member, out),
    }


def _routing(member: Member, out: SaeOutput) -> dict[str, float]:
    """RouteSAE: the batch's share of tokens per routed layer (hard) or mean weight (soft), and the
    entropy of the router's mean distribution in nats (log L = uniform, 0 = one layer takes all)."""
    if out.layer_weights is None:
        return {}
    with torch.no_grad():
        if out.layer_choice is not None:
            shares = torch.bincount(out.layer_choice, minlength=out.layer_weights.shape[1]).double()  # (L,)
            shares /= shares.sum()
        else:
            shares = out.layer_weights.double().mean(0)  # (L,)
        entropy = float(-(shares * shares.clamp_min(1e-12).log()).sum())
    return {
        "route_entropy": entropy,
        **{f"share_L{layer}": float(s) for layer, s in zip(member.sae_cfg.layers, shares)},
    }


def balance_loss(weights: Tensor) -> Tensor:
    """L * sum_l p_l^2 over the batch's mean routing probabilities p (B, L) -> (L,): 1 when the router
    spreads tokens evenly, L when it sends all of them to one layer. Not in the RouteSAE paper: an
    opt-in guard against router collapse (`--route-balance`, weight 0 by default)."""
    mean = weights.mean(0)  # (L,)
    return len(mean) * mean.square().sum()


def _aux_loss(member: Member, out: SaeOutput, dead: Tensor) -> Tensor:
    """AuxK: the top dead latents reconstruct what the live ones missed (a normalized MSE)."""
    sae = core_sae(member.model)
    dead_ids = dead.nonzero().squeeze(1)  # (n_dead,)
    k_aux = min(member.settings.k_aux, len(dead_ids) - 1)
    if k_aux < 1:
        return torch.zeros((), device=out.x.device)
    residual = (out.x - out.x_hat).detach()  # (B, D)
    guess = aux_decode(
        out.x.detach(),
        sae.W_enc[dead_ids],
        sae.b_enc[dead_ids],
        sae.b_dec.detach(),
        sae.W_dec[dead_ids],
        k_aux,
        member.low_precision,
    )
    return (guess - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)


def revive(member: Member, out: SaeOutput, dead: Tensor) -> None:
    """Raise the encoder bias of every dead latent by ``revive`` x the batch's mean k-th activation.

    A latent dies when its pre-activation is negative on every token: no gradient reaches it, and AuxK,
    which reads ReLU'd pre-activations, sees zeros. The rise, repeated each step it stays dead, brings its
    best tokens above zero, where AuxK trains it, and then into the top k. Measured on the demo cache
    (benchmarks/RESULTS.md): 4096 latents at lr 8e-3, 0.2 with an 8,192-token threshold turns 13 % dead
    latents into 0.8-0.95 % at the same FVU; at 16384 latents it did not help.
    """
    if member.settings.revive <= 0 or not bool(dead.any()):
        return
    with torch.no_grad():
        kth = out.latents.acts.min(dim=1).values.clamp_min(0).mean()  # the top-k threshold's scale
        kth = member.ranks.average_(kth.reshape(1))  # every rank adds the same: replicas stay equal
        core_sae(member.model).b_enc[dead] += member.settings.revive * kth


def _update_dead(member: Member, out: SaeOutput, tokens: int) -> None:
    fired = torch.zeros_like(member.since_fired, dtype=torch.bool)
    fired[out.latents.indices[out.latents.acts > 0]] = True
    member.since_fired += tokens * member.ranks.world
    member.since_fired[member.ranks.any_(fired)] = 0  # counters stay identical across ranks


def checkpoint(member: Member) -> None:
    """Flush the log, then save weights, optimizer and counters as the member's resumable state."""
    flush_log(member)
    save_state(
        member.folder,
        member.model,
        TrainingState(member.step, member.optimizer.state_dict(), member.since_fired, member.log_rows),
    )


def log_fields(sae_cfg: SaeConfig) -> list[str]:
    """log.csv columns: LOG_FIELDS, plus the router's entropy and per-layer shares for a RouteSAE."""
    if sae_cfg.arch != "route":
        return LOG_FIELDS
    return [*LOG_FIELDS, "router_lr", "route_entropy", *(f"share_L{layer}" for layer in sae_cfg.layers)]


def flush_log(member: Member) -> None:
    """Append pending log rows to log.csv (with a header the first time)."""
    if not member.pending_log:
        return
    path = member.folder.local() / "log.csv"
    new = not path.exists() or member.log_rows == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, log_fields(member.sae_cfg), extrasaction="ignore")
    if new:
        writer.writeheader()
    writer.writerows(member.pending_log)
    with open(path, "w" if new else "a", encoding="utf-8") as f:
        f.write(buffer.getvalue())
    member.log_rows += len(member.pending_log)
    member.pending_log.clear()


def _truncate_log(folder: Folder, rows: int) -> None:
    """Keep the header and the first ``rows`` rows: steps after the last checkpoint are logged again."""
    path = folder.local() / "log.csv"
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[: rows + 1]), encoding="utf-8")


def summary(member: Member) -> dict[str, Any]:
    """Final numbers of a member for its cfg.json."""
    return {
        "steps": member.step,
        "dead_share": float((member.since_fired >= member.settings.dead_tokens).float().mean()),
    }
