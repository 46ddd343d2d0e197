"""The settings of `sae-pipe interpret` (params.yaml: interpret), one doc per field."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.params import setting


@dataclass
class InterpretConfig:
    """Everything `sae-pipe interpret` needs; every field also lives in params.yaml's interpret section."""

    run: str = setting("", "a run folder printed by `sae-pipe fit`")
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
    explainer_model: str = setting("gpt-4o", "explainer model")
    base_url: str = setting("", "OpenAI-compatible server (default: OPENAI_BASE_URL, else api.openai.com)")
    score: list[str] = setting(doc="scorers of the explanations on held-out examples: detection, fuzzing", factory=list)
    scorer_model: str = setting("gpt-4o-mini", "scorer model")
    scorer_base_url: str = setting("", "the scorer's server (default: base_url)")
    max_cost: float = setting(0.0, "USD cap: stop before the first request when the estimate exceeds it (0 = none)")
    test_share: float = setting(0.5, "share of held-out sequences kept from the explainer for scoring")
    score_quantiles: int = setting(10, "scoring: activation-quantile bins of a feature's test examples")
    score_per_quantile: int = setting(2, "scoring: activating test examples per bin (plus as many silent ones)")
    score_hard: float = setting(0.0, "scoring: share of silent examples that are hard (the feature's top tokens)")
    score_batch: int = setting(5, "scoring: excerpts per scorer prompt")
    fuzz_threshold: float = setting(0.3, "fuzzing: mark tokens from this fraction of the feature's max activation")
    control: bool = setting(False, "also score each feature with another feature's explanation (chance level)")
    logprobs: bool = setting(True, "ask the scorer for log-probabilities (AUC where the server returns them)")
    bootstrap: int = setting(1000, "bootstrap resamples of features for the 95 % intervals")
    concurrency: int = setting(4, "requests in flight")
    max_retries: int = setting(4, "per request (429, 5xx, timeouts), with backoff")
    timeout: float = setting(60.0, "seconds a request may take before it is retried (a slow local server needs more)")
    seed: int = setting(0, "feature sampling, the train/test split, excerpt order")
    logit_effects: bool = setting(
        True, "add each feature's promoted / suppressed tokens and output score (loads the LLM)"
    )
    protocol: bool = setting(False, "apply the RouteSAE paper's context filter before explaining")
    threshold: float = setting(10.0, "protocol: minimum activation")
    infer_k: int | None = setting(None, "encode with this k")
    theta: float | None = setting(None, "encode with a threshold")
    device: str = settings.device()
    out: str = setting("", "output folder (default <cache_root>/interpret/<run>)")
    cache_root: str = settings.cache_root()
