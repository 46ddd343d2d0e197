"""What `interpret` refuses before it reads anything: a setting outside the range it takes, an unknown
name, or scoring asked for with nothing held out to score on. One line each: the option, the value, the
range, and what the option is (its doc from the config)."""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.infra.errors import UserError
from pipeline.infra.params import doc
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.score import SCORERS

EXPLAINERS = ("openai", "none")
MAX_BOOTSTRAP = 100_000  # more resamples move a 95 % interval by less than its rounding, at seconds per scorer

Rule = tuple[Callable[[float], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
NOT_NEGATIVE: Rule = (lambda v: v >= 0, "0 or more")
SHARE: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
PART_OF_MAX: Rule = (lambda v: 0 < v <= 1, "in (0, 1]")
ANY: Rule = (lambda v: True, "a finite number")
# fewer resamples cannot place the 2.5 % and 97.5 % tails of the interval between two of them
RESAMPLES: Rule = (lambda v: 100 <= v <= MAX_BOOTSTRAP, f"between 100 and {MAX_BOOTSTRAP:,}")
MAX_BINS = 1000  # activation-quantile bins: more than a feature's examples leaves all but a few empty
BINS: Rule = (lambda v: 1 <= v <= MAX_BINS, f"between 1 and {MAX_BINS:,}")

RULES: dict[str, Rule] = {
    "max_tokens": NOT_NEGATIVE,
    "batch_size": AT_LEAST_1,
    "top": NOT_NEGATIVE,
    "quantile_bins": BINS,
    "per_bin": NOT_NEGATIVE,
    "random_examples": NOT_NEGATIVE,
    "window": NOT_NEGATIVE,
    "after": NOT_NEGATIVE,
    "features": AT_LEAST_1,
    "min_count": AT_LEAST_1,
    "report_features": NOT_NEGATIVE,
    "max_cost": NOT_NEGATIVE,
    "test_share": SHARE,
    "score_quantiles": BINS,
    "score_per_quantile": AT_LEAST_1,
    "score_hard": FRACTION,
    "score_batch": AT_LEAST_1,
    "fuzz_threshold": PART_OF_MAX,
    "bootstrap": RESAMPLES,
    "concurrency": AT_LEAST_1,
    "max_retries": NOT_NEGATIVE,
    "timeout": AT_LEAST_1,
    "seed": NOT_NEGATIVE,
    "threshold": ANY,
    "theta": ANY,
}


def check_config(cfg: InterpretConfig) -> None:
    """Raise one UserError for the first setting out of range (NaN and infinities are never in range)."""
    if cfg.explainer not in EXPLAINERS:
        raise UserError(f"unknown explainer {cfg.explainer!r}; use one of {', '.join(EXPLAINERS)}.")
    unknown = sorted(set(cfg.score) - set(SCORERS))
    if unknown:
        raise UserError(f"unknown scorer(s) {', '.join(unknown)}; --score takes a comma list of {', '.join(SCORERS)}.")
    if not cfg.run:
        raise UserError("no run given: pass a run folder printed by `sae-pipe fit`.")
    for flag, model in (("--explainer-model", cfg.explainer_model), ("--scorer-model", cfg.scorer_model)):
        if cfg.explainer == "openai" and not model.strip():
            raise UserError(f"{flag} is empty; name a chat model of the API (e.g. gpt-4o), or pass --explainer none.")
    for name, (ok, wanted) in RULES.items():
        value = getattr(cfg, name)
        if value is None:  # optional settings (theta) left unset
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r} must be {wanted} ({doc(InterpretConfig, name)}).")
    if cfg.score and cfg.test_share == 0:
        raise UserError(
            f"--score {','.join(cfg.score)} needs held-out examples the explainer never saw, but --test-share 0 "
            "keeps none; give a share in (0, 1) such as 0.5, or leave out --score."
        )
