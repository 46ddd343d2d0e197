"""Weights & Biases logging of `fit` (``--wandb PROJECT``), besides log.csv and DVC, never instead.

One W&B run per sweep member, named after its run folder and grouped by sweep (the group is a hash of
the sweep's run folder names, so a resumed sweep lands in the same group); its config is the run's
cfg.json as training starts (without its format header), its history the rows of log.csv as training
produces them, at their step, and its summary the ``result`` block cfg.json ends with. A resumed member
opens a new W&B run in the same group: the rows after the last checkpoint are logged again there, as
they are in log.csv. wandb is an optional extra (``pip install sae-pipe[wandb]``), imported only when a
project is given; its own settings (WANDB_MODE=offline, WANDB_DIR, an API key) come from the environment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.fit.plan import RunPlan
from pipeline.fit.train import Member, log_fields
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder


class Tracker:
    """The W&B runs of one `fit` call, by run folder name; does nothing without a project."""

    def __init__(self, project: str, group: str) -> None:
        self.project, self.group = project, group
        self.open: dict[str, Any] = {}  # run folder name -> its wandb Run

    def start(self, plan: RunPlan, config: dict[str, Any]) -> None:
        """Open the member's W&B run with ``config`` (its cfg.json) as config; refuse with one error line,
        before its run folder is made, what W&B refuses (no API key online, a bad project name)."""
        if not self.project:
            return
        import wandb  # the optional extra, checked by tracker()

        try:
            self.open[plan.folder.name] = wandb.init(
                project=self.project,
                group=self.group,
                name=plan.folder.name,
                job_type="fit",
                config=config,
                reinit="create_new",  # one process holds every member's run at once
                settings=wandb.Settings(console="off"),  # the progress bar stays ours
            )
        except wandb.errors.Error as err:
            raise UserError(
                f"--wandb {self.project}: W&B refused the run ({err}); log in with `wandb login`, "
                "set WANDB_MODE=offline to log to local files, or drop --wandb."
            ) from None

    def log(self, member: Member) -> None:
        """The member's newest log row, with log.csv's columns, at its step."""
        run = self.open.get(member.folder.name)
        if run is not None:
            row = member.pending_log[-1]
            run.log({k: row[k] for k in log_fields(member.model) if k in row}, step=int(row["step"]))

    def finish(self, folder: Folder, exit_code: int = 0) -> None:
        """Close the member's run, with cfg.json's final result as its summary."""
        run = self.open.pop(folder.name, None)
        if run is None:
            return
        if exit_code == 0:
            run.summary.update(folder.read_json("cfg.json").get("result", {}))
        run.finish(exit_code=exit_code)


def sweep_group(plans: Sequence[RunPlan]) -> str:
    """The W&B group of a sweep: its size and a hash of its members' run folder names."""
    names = "\n".join(sorted(p.folder.name for p in plans))
    return f"fit-{len(plans)}-{hashlib.sha256(names.encode()).hexdigest()[:10]}"


@contextmanager
def tracker(project: str, plans: Sequence[RunPlan]) -> Iterator[Tracker]:
    """A Tracker for ``plans`` (idle when ``project`` is empty); runs still open at the end, by an error or
    an interrupt, are closed as failed."""
    if project:
        try:
            import wandb  # noqa: F401 - only to refuse early, before any training
        except ImportError:
            raise UserError(
                f"--wandb {project} needs the wandb package: pip install 'sae-pipe[wandb]', or drop --wandb."
            ) from None
    found = Tracker(project, sweep_group(plans))
    try:
        yield found
    finally:
        for name in list(found.open):
            found.open.pop(name).finish(exit_code=1)
