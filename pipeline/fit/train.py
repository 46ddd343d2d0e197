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
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.fit.config import Training
from pipeline.fit.optim import averaged, lr_factor, make_optimizer
from pipeline.fit.state import TrainingState, load_state, save_state
from pipeline.infra.distributed import Ranks
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.interface import SAE, SaeConfig, SaeOutput, Step, build_sae
from pipeline.sae.quality import Reconstruction
from pipeline.sae.selection import Encoder, Selection, select_topk

# log.csv: these, the architecture's loss terms, LOG_TAIL, then the architecture's own step metrics
LOG_HEAD = ["step", "tokens", "nmse", "fvu", "l0", "dead_share"]
LOG_TAIL = ["lr", "tokens_per_s"]


@dataclass
class Member:
    """One SAE being trained, with everything that is its own."""

    folder: Folder
    sae_cfg: SaeConfig
    settings: Training  # resolved and validated once, by fit.plan
    low_precision: bool  # bf16 encoder GEMM
    layer_pos: list[int]  # its layers' positions on the stream's layer axis
    model: SAE  # the SAE itself
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
    model = build_sae(sae_cfg, generator).to(device).train()
    model.prepare_training(settings)
    optimizer = make_optimizer(settings.optimizer, model.param_groups(settings), settings.betas, device, low_precision)
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
        model.load_training_state(state.sae)
        member.since_fired, member.step, member.log_rows = state.since_fired.to(device), state.step, state.log_rows
        _truncate_log(folder, state.log_rows)
    return member


def member_input(member: Member, batch: Tensor) -> Tensor:
    """The member's view of a layer-major batch (L, B, D): (B, L', D) for a multi-layer SAE (RouteSAE),
    else (B, D)."""
    if member.model.multi_layer:
        pos = member.layer_pos
        if pos == list(range(pos[0], pos[0] + len(pos))):  # consecutive layers: a view, not a 16-layer copy
            return batch[pos[0] : pos[0] + len(pos)].transpose(0, 1)
        return batch[pos].transpose(0, 1)
    return batch[member.layer_pos[0]]


def step_of(member: Member, total_steps: int) -> Step:
    """What the architecture's hooks are told about the member's next step."""
    dead = member.since_fired >= member.settings.dead_tokens  # (N,)
    progress = member.step / max(total_steps, 1)
    return Step(member.step, progress, dead, member.low_precision, member.ranks.average_)


def init_pre_bias(member: Member, x: Tensor) -> None:
    """The architecture's data-dependent start from the member's first batch ``x`` (TopK: b_dec = its mean)."""
    member.model.start(x, step_of(member, 1))


def shared_selection(members: list[Member], batch: Tensor) -> list[Selection | None]:
    """Top-k latents (with their pre-activations) of the members whose architecture shares its selection (TopK),
    chosen by encoder GEMMs shared by the members reading the same layer (selection.select_topk); None for the
    others.

    Each member's slice of the shared GEMM is the GEMM it would run alone, and it is selected before any
    member steps, so every member trains exactly as it would alone.
    """
    groups: dict[tuple[int, bool], list[tuple[int, Encoder]]] = {}
    for i, member in enumerate(members):
        encoder = member.model.shared_encoder()
        if encoder is not None:
            groups.setdefault((member.layer_pos[0], member.low_precision), []).append((i, encoder))
    chosen: list[Selection | None] = [None] * len(members)
    for (pos, low_precision), group in groups.items():
        for (i, _), selection in zip(group, select_topk(batch[pos], [e for _, e in group], low_precision)):
            chosen[i] = selection
    return chosen


def train_step(member: Member, x: Tensor, total_steps: int, chosen: Selection | None = None) -> dict[str, float]:
    """One optimizer step on batch ``x`` (with the top-k latents ``chosen`` by a shared selection); returns
    its metrics."""
    s, step = member.settings, step_of(member, total_steps)
    net = member.net or member.model
    out: SaeOutput = net(x, low_precision=member.low_precision, **({} if chosen is None else {"chosen": chosen}))
    quality = Reconstruction()
    nmse = quality.add(out.x, out.x_hat)
    if not math.isfinite(quality.nmse):  # one sync: the metrics below read it anyway
        raise UserError(
            f"training diverged at step {member.step}: the reconstruction error is {quality.nmse}; "
            "lower --lr (0 = the automatic one)."
        )
    terms = member.model.loss_terms(out, step, s)
    loss = sum((term.weight * term.value for term in terms), nmse)
    loss.backward()
    factor = lr_factor(member.step, total_steps, s.schedule)
    for group in member.optimizer.param_groups:  # every group (the SAE's, a router's) on one schedule
        group["lr"] = group["base_lr"] * factor
    member.optimizer.step()
    member.optimizer.zero_grad(set_to_none=True)
    member.model.after_step(out, step, s)
    _update_dead(member, out, len(x))
    member.step += 1
    with torch.no_grad():
        l0 = (out.latents.acts > 0).sum(dim=1).float().mean()
    return {
        "nmse": quality.nmse,
        "fvu": quality.fvu,
        "l0": float(l0),
        **{term.name: float(term.value.detach()) for term in terms},
        "dead_share": float(step.dead.float().mean()),  # never active in the last dead_tokens tokens
        "lr": s.lr * factor,
        "router_lr": s.router_lr * factor,  # a column where the architecture logs it (RouteSAE)
        **member.model.step_metrics(out),
    }


def _update_dead(member: Member, out: SaeOutput, tokens: int) -> None:
    fired = torch.zeros_like(member.since_fired, dtype=torch.bool)
    fired[out.latents.indices[out.latents.acts > 0]] = True
    member.since_fired += tokens * member.ranks.world
    member.since_fired[member.ranks.any_(fired)] = 0  # counters stay identical across ranks


def checkpoint(member: Member) -> None:
    """Flush the log, then save weights (a schedule-free optimizer's average), optimizer, counters and the
    architecture's own training state (a sparsity controller's) as the member's resumable state."""
    flush_log(member)
    optimizer, own = member.optimizer.state_dict(), member.model.training_state()
    state = TrainingState(member.step, optimizer, member.since_fired, member.log_rows, own)
    with averaged(member.optimizer):
        save_state(member.folder, member.model, state)


def log_fields(model: SAE) -> list[str]:
    """log.csv columns: the common ones around the architecture's loss terms, then its own metrics."""
    return [*LOG_HEAD, *model.loss_names, *LOG_TAIL, *model.log_fields()]


def flush_log(member: Member) -> None:
    """Append pending log rows to log.csv (with a header the first time)."""
    if not member.pending_log:
        return
    path = member.folder.local() / "log.csv"
    new = not path.exists() or member.log_rows == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, log_fields(member.model), extrasaction="ignore")
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
