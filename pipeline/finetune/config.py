"""The settings of `sae-pipe finetune` (params.yaml: finetune), one doc per field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.device import DTYPES
from pipeline.infra.errors import UserError
from pipeline.infra.params import setting

LOSSES = ("kl", "ce")
TRAINS = ("all", "decoder")


@dataclass
class FinetuneConfig:
    """Everything `sae-pipe finetune` needs; every field but ``run`` also lives in params.yaml's finetune section."""

    run: str = setting("", "run folder to fine-tune (printed by `sae-pipe fit`); it is read, never written")
    loss: str = setting("kl", "kl (to the clean model's next-token distribution) | ce (next-token cross-entropy)")
    mse_weight: float = setting(0.0, "weight of the reconstruction's normalized MSE added to the loss (0 = none)")
    max_tokens: int = setting(65536, "training tokens (real positions of the cache's training sequences)")
    batch_size: int = setting(4, "sequences per step")
    lr: float = setting(1e-4, "Adam learning rate: warmed up linearly, then decayed linearly to 0 by the last step")
    warmup: float = setting(0.1, "share of the steps over which the lr rises linearly to --lr (0: starts there)")
    train: str = setting("all", "parameters that train: all | decoder (W_dec, b_dec, a skip transcoder's W_skip)")
    seed: int = setting(0, "order of the training sequences")
    device: str = settings.device()
    compute_dtype: str = settings.compute_dtype()
    out: str = setting("", "the new run folder (default <cache_root>/finetune/<run>-ft<loss>-<hash>)")
    cache_root: str = settings.cache_root()
    enabled: bool = setting(False, "DVC stage: fine-tune the fit stage's runs (off: the stage writes nothing)")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss!r}: use kl or ce.")
        if self.train not in TRAINS:
            raise UserError(f"--train {self.train!r}: use all or decoder.")
        if not 0 <= self.mse_weight < math.inf:
            raise UserError(f"--mse-weight {self.mse_weight} must be a finite number >= 0.")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr {self.lr} must be a finite number above 0.")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup {self.warmup} must be a share of the steps: at least 0, below 1.")
        if self.max_tokens < 1 or self.batch_size < 1 or self.seed < 0:
            raise UserError(
                f"--max-tokens ({self.max_tokens}) and --batch-size ({self.batch_size}) must be at least 1, "
                f"--seed ({self.seed}) not negative."
            )
        if self.compute_dtype not in ("cache", "auto", *DTYPES):
            raise UserError(f"--compute-dtype {self.compute_dtype!r}: use cache, auto or {', '.join(DTYPES)}.")
