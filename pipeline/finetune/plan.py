"""Which training sequences each step reads, and where the new run goes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from pipeline.finetune.config import FinetuneConfig
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.live.subject import Subject

MAX_PASSES = 100  # more passes over the training split than this is a typo in --max-tokens

# what makes one fine-tuning another
SETTINGS = ("loss", "mse_weight", "max_tokens", "batch_size", "lr", "warmup", "train", "seed")


def settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The settings recorded in the new run's cfg.json (and hashed into its name)."""
    return {name: getattr(cfg, name) for name in SETTINGS}


def batches(real: np.ndarray, cfg: FinetuneConfig) -> list[np.ndarray]:
    """Sequence ids per step: ``batch_size`` sequences at a time in a seeded order (a fresh one per pass),
    until the steps hold ``max_tokens`` real positions; ``real`` (S,) counts each sequence's."""
    total = int(real.sum())
    passes = -(-cfg.max_tokens // max(total, 1))
    if total == 0 or passes > MAX_PASSES:
        raise UserError(
            f"--max-tokens {cfg.max_tokens:,} is {passes} passes over the {total:,} training tokens of the run's "
            f"cache; at most {MAX_PASSES} are allowed."
        )
    if cfg.batch_size > len(real):
        raise UserError(
            f"--batch-size {cfg.batch_size:,} is more than the {len(real):,} training sequences of the run's cache; "
            "lower it."
        )
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(real)) for _ in range(passes + 1)])
    steps = order[: len(order) // cfg.batch_size * cfg.batch_size].reshape(-1, cfg.batch_size)  # (n, B)
    covered = np.cumsum(real[steps].sum(1))  # (n,) tokens seen after each step
    return list(steps[: int(np.searchsorted(covered, cfg.max_tokens)) + 1])


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``, as a share of ``--lr``: a linear rise over the
    first ``warmup`` share of the steps, then a linear decay that reaches 0 after the last step.

    Why the rise: Adam's first updates are close to sign(gradient) x lr in every parameter at once; on the demo
    SAE (MSE-trained at 6e-3) a first step at 3e-4 raised the next batch's KL by 5-12 % where 1e-4 lowered it.
    """
    rise = max(round(warmup * steps), 1)
    return min((step + 1) / rise, 1.0) * (1 - step / steps)


def target(cfg: FinetuneConfig, subject: Subject) -> Folder:
    """The new run's folder: ``--out``, or one named after the parent and the settings under <cache_root>/finetune."""
    parent = subject.folder
    if cfg.out:
        out = Folder.at(cfg.out)
    else:
        digest = hashlib.sha256(json.dumps([parent.name, settings(cfg)], sort_keys=True).encode()).hexdigest()[:8]
        out = Layout(cfg.cache_root).finetune(f"{parent.name}-ft{cfg.loss}-{digest}")
    if out.url.rstrip("/") == parent.url.rstrip("/") or out.url.startswith(parent.url.rstrip("/") + "/"):
        raise UserError(f"--out {out.url} is the run being fine-tuned (or inside it); the parent is never written.")
    if out.exists() and out.list() and not out.exists("cfg.json"):
        raise UserError(f"--out {out.url} holds something that is not a run; it would be replaced. Choose another.")
    return out
