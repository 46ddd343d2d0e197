"""The settings of `sae-pipe circuit`, one doc per field."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.params import setting

METHODS = ("mask", "ig", "ig_layer", "attrib")
DEFAULT_METHODS = ["mask", "ig", "attrib"]  # ig_layer costs ig once per site: asked for by name
ABLATIONS = ("mean", "zero")


@dataclass
class CircuitConfig:
    """Everything `sae-pipe circuit` needs."""

    runs: list[str] = setting(doc="single-layer run folders printed by `sae-pipe fit`, one per layer", factory=list)
    layers: list[int] = setting(doc="SAE layers to use among the runs (empty = every run's layer)", factory=list)
    task: str = setting("sva", "sva | ioi | code | a JSONL file of contrastive pairs")
    pairs: int = setting(128, "pairs a built-in task generates (train, validation and test together)")
    val_share: float = setting(0.25, "share of the pairs that choose the circuit (its lambda or size)")
    test_share: float = setting(0.5, "share of the pairs held out to measure the circuits on (never chooses)")
    min_gap: float = setting(
        0.5, "smallest clean-minus-all-ablated logit difference (train pairs) for the task to count as solved"
    )
    seed: int = setting(0, "seed of the pair generation, the train/val/test split and the mask's initial noise")
    seeds: list[int] = setting(
        doc="mask: more seeds to re-run it with (own split and initial noise), for the overlap across seeds",
        factory=list,
    )
    method: list[str] = setting(doc="methods to run: mask, ig, ig_layer, attrib", factory=lambda: list(DEFAULT_METHODS))
    lambdas: list[float] = setting(
        doc="mask: sparsity weights, one circuit each (larger = fewer latents)",
        factory=lambda: [0.001, 0.003, 0.01, 0.03],
    )
    sizes: list[int] = setting(
        doc="ig / ig_layer / attrib: circuit sizes (latents) at which the scores are cut",
        factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200],
    )
    ablation: str = setting("mean", "value of a latent outside the circuit: mean (over the patch prompts) | zero")
    steps: int = setting(150, "mask: Adam steps per lambda")
    lr: float = setting(0.1, "mask: Adam learning rate of the mask logits")
    t_max: float = setting(100.0, "mask: final temperature of the soft mask sigmoid(m * T), T = t_max ** progress")
    ig_steps: int = setting(10, "ig, ig_layer: interpolation steps from ablated to clean latents")
    batch_size: int = setting(32, "pairs per forward")
    device: str = settings.device()
    cache_root: str = settings.cache_root()
    out: str = setting("", "output folder (default: <cache-root>/circuits/<task>-<hash>)")
