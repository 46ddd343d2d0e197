"""The settings of `sae-pipe interpret` (params.yaml: interpret), one doc per field."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.infra.params import setting


@dataclass
class InterpretConfig:
    """Everything `sae-pipe interpret` needs; every field also lives in params.yaml's interpret section."""

    run: str = setting("", "run folder")
    cache: str = setting("", "cache to read (default: the one in the run's cfg.json; must be that one)")
    max_tokens: int = setting(100_000, "held-out tokens to scan (0 = all)")
    batch_size: int = setting(4096, "rows per SAE forward")
    top: int = setting(10, "top-activating examples per latent")
    quantile_bins: int = setting(5, "activation-quantile bins to sample examples from")
    per_bin: int = setting(2, "examples sampled per bin")
    random_examples: int = setting(5, "random non-activating examples per latent")
    window: int = setting(24, "context tokens before the activating token")
    after: int = setting(4, "context tokens after it")
    features: int = setting(50, "latents sent to the explainer (sampled with `seed`)")
    min_count: int = setting(5, "a latent needs this many activations to be explained")
    report_features: int = setting(100, "latents with a section in the report")
    explainer: str = setting("openai", "openai | none")
    model: str = setting("gpt-4o", "explainer model")
    concurrency: int = setting(4, "explainer requests in flight")
    max_retries: int = setting(4, "per request (429, 5xx, timeouts), with backoff")
    seed: int = setting(0, "feature sampling")
    protocol: bool = setting(False, "apply the RouteSAE paper's context filter before explaining")
    threshold: float = setting(10.0, "protocol: minimum activation")
    infer_k: int | None = setting(None, "encode with this k")
    theta: float | None = setting(None, "encode with a threshold")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    out: str = setting("", "output folder (default <cache_root>/interpret/<run>)")
    cache_root: str = setting("cache", "root of interpret/")
