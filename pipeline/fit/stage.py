"""Stage two: train TopK SAEs and RouteSAEs from a cache, a whole sweep from one read.

Each run ends as a folder holding cfg.json, sae.safetensors and log.csv (plus a resumable state
while it trains); :mod:`pipeline.fit.plan` decides the runs and their folders.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit.config import FitConfig, with_recipe
from pipeline.fit.feed import Waited, device_batches
from pipeline.fit.optim import averaged
from pipeline.fit.plan import (
    RunPlan,
    check_no_duplicates,
    expand_sweep,
    fixed_lr_note,
    out_root,
    plan_run,
    prepare_run_folder,
    run_tokens,
    spread,
)
from pipeline.fit.state import drop_state
from pipeline.fit.tracking import Tracker, tracker
from pipeline.fit.train import (
    Member,
    checkpoint,
    flush_log,
    init_pre_bias,
    make_member,
    member_input,
    shared_selection,
    summary,
    train_step,
)
from pipeline.infra.console import Stopwatch, progress_bar, say
from pipeline.infra.device import keep_freed_memory
from pipeline.infra.distributed import Ranks, wrap_ddp
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.locks import exclusive
from pipeline.llm.sites import SITES
from pipeline.sae.folder import save_weights, write_cfg
from pipeline.sae.interface import REGISTRY
from pipeline.sae.selection import use_low_precision


@dataclass
class FitResult:
    """What one fit wrote."""

    root: Folder  # --out, or <cache_root>/saes
    runs: list[Folder]  # one run folder per sweep member: cfg.json, sae.safetensors, log.csv


class LoopTime(NamedTuple):
    """Where a fit's training loop spent its wall-clock time, in this process (shared by a sweep's members)."""

    train_s: float  # the loop, first batch to last step (since the resume point, when resumed)
    data_wait_s: float  # of which blocked waiting for the next batch: a share near 1 means the feed limits training


def run(cfg: FitConfig, ranks: Ranks | None = None) -> FitResult:
    """Train every run of ``cfg`` (one, or a sweep) from one pass over the cache; return the run folders.

    Under torchrun, a sweep with at least as many members as ranks is spread: each rank trains whole
    members, alone, on the same shuffled stream a single process would read, so each member ends
    with the weights of a one-process sweep. A single SAE is trained by all ranks together (DDP).
    """
    ranks = ranks or Ranks.from_env()
    cfg = with_recipe(cfg)
    cache = open_cache(cfg)
    plans = [plan_run(member, cache) for member in expand_sweep(cfg)]
    check_no_duplicates(plans)
    if (note := fixed_lr_note(cfg.sweep, plans, cache.rows("train"))) and ranks.is_main:
        say(note)
    with ExitStack() as locks:  # a second process for the same run waits, then finds it trained
        for plan in sorted(plans, key=lambda p: p.folder.name):
            locks.enter_context(exclusive(plan.folder, "fit", enabled=ranks.world == 1))
        track = locks.enter_context(tracker(cfg.wandb, plans))  # W&B runs, with --wandb
        todo = _todo(plans, ranks)
        if ranks.world > 1 and len(todo) >= ranks.world:  # a sweep under torchrun: whole members per rank
            mine = spread(todo, ranks.world)[ranks.rank]
            say(f"rank {ranks.rank} trains {len(mine)} of the sweep's {len(todo)} members")
            _train(mine, cache, cfg, ranks.alone(), track)
        elif todo:  # one SAE (or fewer members than ranks): DDP, every rank a share of each batch
            _train(todo, cache, cfg, ranks, track)
    ranks.barrier()  # under torchrun no rank returns before every run is written
    return FitResult(Folder.at(out_root(cfg)), [p.folder for p in plans])


def _todo(plans: list[RunPlan], ranks: Ranks) -> list[RunPlan]:
    """The runs that need training, decided (and cleared for --overwrite) by rank 0 alone."""
    names: list[str] = []
    error: str | None = None
    if ranks.is_main:
        try:
            names = [p.folder.name for p in plans if prepare_run_folder(p)]
        except UserError as err:
            error = str(err)
    names, error = ranks.share((names, error))
    if error is not None:
        raise UserError(error)
    return [p for p in plans if p.folder.name in names]


def open_cache(cfg: FitConfig) -> ActivationCache:
    if not cfg.cache:
        raise UserError("no cache given: pass --cache PATH (from `sae-pipe extract` or `sae-pipe cache list`).")
    return ActivationCache.open(cfg.cache)


def _total_steps(cfg: FitConfig, stream: ActivationStream, ranks: Ranks) -> tuple[int, int]:
    """(epochs, steps) for the token budget; a budget beyond the data trains the epochs asked for (one by
    default) and says so, so that data is never repeated unasked.

    Under torchrun each rank streams its own shards and the budget is shared: a step trains on
    ``batch_size x world`` tokens.
    """
    epochs = cfg.epochs or 1
    budget = run_tokens(cfg, stream.rows, ranks.world)
    if budget < cfg.max_tokens // ranks.world:  # the epochs ran out before the token budget did
        passes = f"{epochs} epoch{'s' if epochs > 1 else ''}"
        say(
            f"{passes} over the training split's {stream.rows * ranks.world:,} rows are fewer than --max-tokens "
            f"{cfg.max_tokens:,}: training {passes} (pass a larger --epochs to repeat the data more)"
        )
    steps = ranks.smallest(budget // cfg.batch_size)  # under torchrun every rank runs the same number of steps
    if steps < 1:
        raise UserError(
            f"the training split has {stream.rows:,} rows, less than one batch of {cfg.batch_size}; "
            "lower --batch-size or extract more tokens."
        )
    return epochs, steps


def _train(plans: list[RunPlan], cache: ActivationCache, cfg: FitConfig, ranks: Ranks, track: Tracker) -> None:
    """Build the stream and the members, then run the shared loop."""
    layers = sorted({layer for p in plans for layer in p.sae.layers})
    wanted = {site for p in plans for site in REGISTRY[p.sae.arch].sites}
    sites = tuple(site for site in SITES if site in wanted)  # transcoders read mlp_in and mlp_out
    spec = StreamSpec(layers, cfg.batch_size, cfg.data_seed, cfg.pool_mb, rank=ranks.rank, world=ranks.world)
    shuffle = cfg.recipe != "reference"  # the reference reads its data in order
    stream = ActivationStream(cache, dataclasses.replace(spec, sites=sites, shuffle=shuffle, verify=cfg.verify))
    epochs, steps = _total_steps(cfg, stream, ranks)
    device = ranks.device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    starts = [{"status": "training", **plan.record, "steps": steps} for plan in plans]
    for plan, start in zip(plans, starts):
        if ranks.is_main:  # before any folder is made: W&B may refuse
            track.start(plan, start)
    members = []
    for plan, start in zip(plans, starts):
        plan.folder.makedirs()
        if ranks.is_main and not plan.folder.exists("cfg.json"):
            write_cfg(plan.folder, start)
        members.append(_member(plan, _blocks(plan, layers, sites), device, ranks))
    spent = _loop(members, stream, epochs, steps, cfg, ranks, track)
    if ranks.is_main:
        for plan, member in zip(plans, members):
            _finish(plan, member, steps, spent)
            track.finish(plan.folder)


def _blocks(plan: RunPlan, layers: list[int], sites: tuple[str, ...]) -> list[int]:
    """Where the run's (site, layer) blocks lie on the stream's site-major axis 0."""
    arch_sites = REGISTRY[plan.sae.arch].sites
    return [sites.index(site) * len(layers) + layers.index(x) for site in arch_sites for x in plan.sae.layers]


def _member(plan: RunPlan, blocks: list[int], device: torch.device, ranks: Ranks) -> Member:
    low_precision = use_low_precision(device, plan.training.precision)
    member = make_member(plan.folder, plan.sae, plan.training, low_precision, blocks, device)
    member.ranks = ranks
    if ranks.world > 1:
        member.net = wrap_ddp(member.model, device)
    if member.step:
        say(f"resuming {plan.folder.name} at step {member.step:,}")
    return member


def _loop(
    members: list[Member],
    stream: ActivationStream,
    epochs: int,
    steps: int,
    cfg: FitConfig,
    ranks: Ranks,
    track: Tracker,
) -> LoopTime:
    """Feed every batch to every member that has not seen it yet; log and checkpoint as configured."""
    start = min(m.step for m in members)
    device = next(members[0].model.parameters()).device
    clock, window = Stopwatch(), (start, 0.0)
    feed = Waited(device_batches(stream.batches(epochs, skip=start), device))
    with progress_bar("fit", steps * cfg.batch_size) as bar:
        bar.advance(0, start * cfg.batch_size)
        for step, x in enumerate(feed, start=start):
            if step >= steps:
                break
            # x: (L, B, D) float32 on the device; on CUDA the next batch is already on its way
            due = [m for m in members if m.step <= step]  # a member resumed ahead of the others waits
            for member in due:
                if member.step == 0:
                    init_pre_bias(member, member_input(member, x))
            for member, chosen in zip(due, shared_selection(due, x)):
                metrics = train_step(member, member_input(member, x), steps, chosen)
                logged = (cfg.log_every and member.step % cfg.log_every == 0) or member.step == steps
                if ranks.is_main and logged:
                    rate = (member.step - window[0]) * cfg.batch_size / max(clock.seconds - window[1], 1e-9)
                    member.pending_log.append(
                        {
                            "step": member.step,
                            "tokens": member.step * cfg.batch_size * ranks.world,
                            **{k: round(v, 6) for k, v in metrics.items()},
                            "tokens_per_s": round(rate, 1),
                        }
                    )
                    track.log(member)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                window = (step + 1, clock.seconds)
            bar.update(0, advance=cfg.batch_size, status=f"nmse {metrics['nmse']:.3f} L0 {metrics['l0']:.0f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps and ranks.is_main:
                for member in members:
                    checkpoint(member)
    return LoopTime(clock.seconds, feed.seconds)


def _finish(plan: RunPlan, member: Member, steps: int, spent: LoopTime) -> None:
    """Write final weights (a schedule-free optimizer's average) and a complete cfg.json (its result: the last
    training batch's numbers and the loop's time); drop the resumable state."""
    flush_log(member)
    if plan.training.recipe == "reference":  # the reference renormalizes once more before saving
        member.model.normalize_decoder()
    with averaged(member.optimizer):
        save_weights(plan.folder, member.model)
    last = _last_log(plan.folder)
    timing = {name: round(seconds, 3) for name, seconds in spent._asdict().items()}
    result = {**summary(member), **last, **timing}
    write_cfg(plan.folder, {"status": "complete", **plan.record, "steps": steps, "result": result})
    drop_state(plan.folder)
    # log.csv's last row: the final training batch's numbers, which a held-out figure (evaluate) is not
    shown = ", ".join(f"{k} {v}" for k, v in last.items() if k in ("nmse", "fvu", "l0"))
    waited = f"{spent.train_s:.1f} s, {spent.data_wait_s:.1f} s of it waiting for data"
    say(f"trained {plan.folder.name} in {waited}; last training batch: {shown} (held-out: sae-pipe evaluate)")


def _last_log(folder: Folder) -> dict[str, float]:
    path = folder.local() / "log.csv"
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    return {k: float(v) for k, v in zip(header, last)} if len(lines) > 1 else {}
