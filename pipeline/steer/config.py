"""The settings of `sae-pipe steer`, one doc per field."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.params import setting


@dataclass
class SteerConfig:
    """Everything `sae-pipe steer` needs."""

    run: str = setting("", "a run folder printed by `sae-pipe fit` (or `sae-pipe import`)")
    features: list[str] = setting(
        doc="LATENT=KIND:VALUE edits (scale | add | set | direction), repeatable", factory=list
    )
    prompts: list[str] = setting(doc="prompts to generate from (repeatable)", factory=list)
    prompts_file: str = setting("", "a text file with one prompt per line")
    positions: str = setting("all", "where edits apply: all | prompt | generated | last | comma-separated indices")
    mode: str = setting("delta", "delta (add only the edited change) | replace (the edited reconstruction)")
    max_new_tokens: int = setting(40, "tokens to generate per prompt")
    sample: bool = setting(False, "sample (seeded) instead of greedy decoding")
    temperature: float = setting(1.0, "sampling temperature (with --sample)")
    seed: int = setting(0, "seed of the sampling, the same for the unedited and the edited generation")
    cache: str = setting("", "activation cache (default: the run's own; an imported run names one of its model)")
    feature_table: str = setting("", "features.parquet for direction strengths (default: the run's interpret table)")
    device: str = settings.device()
    cache_root: str = settings.cache_root()
    evaluate: bool = setting(False, "measure effect against cost over features x strengths (writes steering.csv)")
    out: str = setting("", "folder for the evaluation's outputs (default: <cache-root>/steer/<run>)")
    eval_features: list[int] = setting(doc="latents to evaluate (default: the best by output score)", factory=list)
    n_features: int = setting(5, "features to evaluate when none are given")
    strengths: list[float] = setting(
        doc="direction strengths to evaluate, in units of each feature's largest activation",
        factory=lambda: [0.0, 0.5, 1.0, 2.0],
    )
    heldout_tokens: int = setting(1024, "held-out cache tokens the cost (KL, log-prob gain) is measured on")
    batch_size: int = setting(4, "held-out sequences per forward")
    judge_model: str = setting("gpt-4o-mini", "LLM judge of concept and fluency, 0-2 each (when OPENAI_API_KEY is set)")
    base_url: str = setting("", "the judge's OpenAI-compatible server (default: OPENAI_BASE_URL, else api.openai.com)")
    max_cost: float = setting(0.0, "USD cap for the judge: stop before the first request above it (0 = none)")
