"""The settings of `sae-pipe evaluate` (params.yaml: evaluate), one doc per field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.errors import UserError
from pipeline.infra.params import setting

METRICS = ("nmse", "kl", "ce")  # the default set
OPT_IN = ("train_dead", "train_fvu")  # slow: one pass over the cache's training split (shared by both)
SPLICES = ("scaled", "paper")


@dataclass
class EvaluateConfig:
    """Everything `sae-pipe evaluate` needs; every field also lives in params.yaml's evaluate section."""

    runs: list[str] = setting(doc="run folder(s) printed by `sae-pipe fit`", factory=list)
    max_tokens: int = setting(0, "held-out tokens to use (0 = all the held-out split has)")
    batch_size: int = setting(4, "sequences per LLM forward")
    metrics: list[str] = setting(
        doc="comma list of nmse (cache only), kl, ce (need the LLM), train_dead, train_fvu (opt-in: read the "
        "training split)",
        factory=lambda: list(METRICS),
    )
    suite: list[str] = setting(
        doc="comma list of SAEBench-format metric families written per run: core, absorption, probing, geometry "
        "(empty = none)",
        factory=lambda: ["core"],
    )
    probe_words: int = setting(200, "absorption suite: words per first letter run through the LLM (once per layer)")
    probe_tokens: int = setting(65536, "probing suite: cache rows (held-out first) pooled into documents (0 = all)")
    probe_label: str = setting(
        "", "probing suite: a JSONL corpus's column to classify documents by (the built-in corpus has its own tasks)"
    )
    infer_k: int | None = setting(None, "encode with this k instead of the trained one")
    theta: float | None = setting(None, "encode with a threshold instead of top-k")
    splice: str = setting(
        "scaled", "RouteSAE: scaled (splice x_hat / w, the activation's own scale) | paper (x_hat as the reference)"
    )
    cache: str = setting(
        "", "imported runs: a cache of their model (held-out tokens for kl/ce; nmse needs their layer, raw)"
    )
    device: str = settings.device()
    compute_dtype: str = settings.compute_dtype()
    out: str = setting("", "where metrics go (default <cache_root>/evaluate/<run>/metrics.json)")
    cache_root: str = settings.cache_root()

    def __post_init__(self) -> None:
        if self.theta is not None and not math.isfinite(self.theta):  # NaN fires nothing, inf nothing, -inf all
            raise UserError(f"--theta {self.theta} must be a finite number (a latent is active above it).")
        if self.probe_words < 1:
            raise UserError(f"--probe-words {self.probe_words} must be at least 1 (words per first letter).")
        if self.probe_tokens < 0:
            raise UserError(f"--probe-tokens {self.probe_tokens} must be 0 (all rows) or a positive row count.")
