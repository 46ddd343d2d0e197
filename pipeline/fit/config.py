"""The settings of `sae-pipe fit` (params.yaml: fit), one doc per field, and the training block each
run is built from: resolved (auto lr, k_aux) and validated once, carried unchanged to the training
loop and written to cfg.json from the same object."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipeline.infra import settings
from pipeline.infra.errors import UserError
from pipeline.infra.params import setting

OPTIMIZERS = ("adam", "signum", "muon", "signum-sf")
SCHEDULES = ("warmup-decay", "constant", "reference")
RECIPES = ("sae-pipe", "reference")
# What `--recipe reference` fixes: the RouteSAE reference implementation's training (swei2001/RouteSAEs,
# src/utils.py: Adam 5e-4 with betas 0.9/0.999 on every parameter, router included, its warm-up/decay
# schedule, no auxiliary loss); 8192 tokens per step as its run scripts use. Its decoder renormalization
# every 100 steps (instead of every step, with tangent gradients) is Training.recipe's job in fit.train,
# its unshuffled data (the cache's rows in stored order) fit.stage's.
REFERENCE_RECIPE: dict[str, Any] = {
    "lr": 5e-4,
    "router_lr": 5e-4,
    "optimizer": "adam",
    "betas": (0.9, 0.999),
    "schedule": "reference",
    "batch_size": 8192,
    "aux_alpha": 0.0,
    "revive": 0.0,
    "route_balance": 0.0,
}
# Numbers of fit that are counts, seeds, rates or weights: NaN, infinite or negative ones are refused.
NON_NEGATIVE = (
    *("lr", "router_lr", "aux_alpha", "revive", "route_balance", "max_tokens", "epochs", "seed"),
    *("data_seed", "latents", "expansion", "dead_tokens", "k_aux", "sparsity_coeff", "sparsity_warmup", "bandwidth"),
)
MAX_LATENTS = 2**24  # the largest SAEs published have 16M latents; more is a typo (10**18 overflows torch)
SWEEPABLE = (
    "arch",
    "k",
    "latents",
    "expansion",
    "lr",
    "router_lr",
    "optimizer",
    "seed",
    "layer",
    "routing",
    "aggregate",
    "k_aux",
    "aux_alpha",
    "route_balance",
    "dead_tokens",
    "revive",
    "schedule",
    "sparsity_coeff",
    "sparsity_warmup",
    "bandwidth",
    "prefixes",
    "multi_topk",
    "skip",
    "router_centre",
)


@dataclass
class FitConfig:
    """Everything `sae-pipe fit` needs; every field also lives in params.yaml's fit section."""

    cache: str = setting("", "cache folder or URL (the DVC stage passes the one extract made)")
    arch: str = setting("topk", "topk | batchtopk | matryoshka | jumprelu | standard | gated | route | transcoder")
    layer: int | None = setting(None, "topk: model layer to train on (default: the cache's only layer)")
    route_layers: str = setting("", "route: layers to route over (default: n/4..3n/4 within the cache)")
    latents: int = setting(0, "dictionary size (0 = expansion x hidden size)")
    expansion: int = setting(8, "latents per input dimension, when latents = 0")
    k: int = setting(32, "active latents per token")
    prefixes: str = setting(
        "", "matryoshka: nested dictionary sizes, comma-separated, the last = latents (default: n/16, n/8, n/4, n/2, n)"
    )
    skip: bool = setting(False, "transcoder: add a linear skip path from the MLP's input (a skip transcoder)")
    multi_topk: bool = setting(False, "topk, batchtopk: also train the code at 4k, so one SAE serves several k")
    sparsity_coeff: float = setting(
        0.0, "standard, gated: L1 weight; jumprelu: L0 weight (0 = auto: adjusted while training so mean L0 meets k)"
    )
    sparsity_warmup: float = setting(0.05, "standard, gated, jumprelu: share of the run over which the penalty rises")
    bandwidth: float = setting(0.0, "jumprelu: width of the straight-through estimator's kernel (0 = auto)")
    routing: str = setting("hard", "route: hard | soft")
    aggregate: str = setting("sum", "route: sum | mean of the routed layers as router input")
    router_centre: bool = setting(
        False, "route: the router reads the summed layers minus their running mean (not in the paper; off)"
    )
    lr: float = setting(0.0, "peak learning rate (0 = auto: Adam, by latents, run length and batch; see fit/optim.py)")
    router_lr: float = setting(
        0.0, "route: the router's peak learning rate (0 = auto: 5e-4, the reference's; see sae/archs/route.py)"
    )
    recipe: str = setting(
        "sae-pipe",
        "sae-pipe | reference (route: the RouteSAE paper's training: lr 5e-4 for all, batch 8192, its schedule, "
        "decoder renormalized every 100 steps, no AuxK, the cache read in order)",
    )
    optimizer: str = setting(
        "adam", "adam | signum | muon | signum-sf (SignSGD in a schedule-free average at momentum 0.95, sparsify's)"
    )
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas (signum: betas[0] is the momentum)")
    schedule: str = setting(
        "warmup-decay", "warmup-decay (5 % warmup, decay over the last 20 %) | constant | reference (RouteSAE's)"
    )
    batch_size: int = setting(4096, "tokens per step")
    max_tokens: int = setting(0, "training tokens (0 = the whole training split, `epochs` times)")
    epochs: int = setting(0, "passes over the training split (0 = one; a larger budget needs --epochs)")
    seed: int = setting(0, "weight initialization")
    data_seed: int = setting(0, "shard order and shuffling (shared by all members of a sweep)")
    dead_tokens: int = setting(
        0, "a latent idle this many tokens is dead: AuxK and revive work on it (0 = auto: 64 x latents / k)"
    )
    k_aux: int = setting(0, "AuxK latents (0 = hidden size / 2)")
    aux_alpha: float = setting(1 / 32, "AuxK loss weight")
    revive: float = setting(0.0, "per step, a dead latent's encoder bias rises by this x the mean k-th activation")
    route_balance: float = setting(
        0.0, "route: weight of a load-balancing loss on the router (not in the paper; 0 = off)"
    )
    precision: str = setting(
        "auto",
        "encoder GEMM (TopK keeps its values), decodes, weight gradients' sparse products and Muon's "
        "orthogonalization: auto (bf16 where the hardware has it) | float32 | bfloat16",
    )
    device: str = settings.device()
    log_every: int = setting(10, "steps between log.csv rows (0 = the last step only)")
    checkpoint_every: int = setting(100, "steps between resumable states (0 = none)")
    pool_mb: float = setting(1024.0, "shuffle pool size")
    verify: bool = setting(True, "check the data read against the cache's checksums as it is read, before it trains")
    sweep: dict[str, list[Any]] = setting(
        doc="key=v1,v2 (repeatable; in params.yaml a mapping): train every combination from one read", factory=dict
    )
    out: str = setting("", "folder for run folders (default <cache_root>/saes)")
    cache_root: str = settings.cache_root()
    wandb: str = setting(
        "", "Weights & Biases project to log training to (needs `pip install sae-pipe[wandb]`; empty = off)"
    )
    resume: bool = setting(False, "continue incomplete runs with identical settings")
    overwrite: bool = setting(False, "retrain runs that already finished")

    def __post_init__(self) -> None:
        for name in NON_NEGATIVE:  # refused before anything is read, with the option and its value
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise UserError(f"--{name.replace('_', '-')} {value} must be a finite number >= 0.")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        if self.latents > MAX_LATENTS:
            raise UserError(f"--latents {self.latents} is more than {MAX_LATENTS:,} (2^24) latents.")


@dataclass(frozen=True)
class Training:
    """How one run is trained: the FitConfig fields that shape its weights, with the automatic values
    resolved. cfg.json's ``training`` block and the run's folder hash are this object."""

    lr: float  # peak learning rate
    router_lr: float  # RouteSAE: the router's peak learning rate
    recipe: str  # sae-pipe | reference
    optimizer: str  # adam | signum | muon | signum-sf
    betas: tuple[float, float]  # Adam betas (signum: betas[0] is the momentum)
    schedule: str  # warmup-decay | constant | reference (signum-sf: constant)
    batch_size: int  # tokens per step
    max_tokens: int  # training tokens (0 = the whole split, `epochs` times)
    epochs: int  # passes over the training split
    seed: int  # weight initialization
    data_seed: int  # shard order and shuffling
    dead_tokens: int  # a latent idle this many tokens is dead
    k_aux: int  # AuxK latents
    aux_alpha: float  # AuxK loss weight
    revive: float  # per-step rise of a dead latent's encoder bias, in mean k-th activations
    route_balance: float  # weight of the router's load-balancing loss
    precision: str  # encoder GEMM, decode, weight-gradient products and Muon precision
    multi_topk: bool  # also train the code at 4k
    sparsity_coeff: float  # L1 (standard, gated) or L0 (jumprelu) weight; 0 = adjusted to meet k
    sparsity_warmup: float  # share of the run over which the sparsity penalty rises
    bandwidth: float  # jumprelu: straight-through kernel width (0 = auto)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown lr schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; use one of {', '.join(RECIPES)}.")
        if self.optimizer == "signum-sf" and self.schedule != "constant":
            raise UserError(
                f"--optimizer signum-sf averages the weights in place of an lr decay; --schedule {self.schedule} "
                "decays: use constant or warmup-decay (both train it at a constant lr after the warmup)."
            )
        numbers = (self.max_tokens, self.epochs, self.lr, self.router_lr, self.route_balance, self.revive)
        if min(numbers) < 0 or self.batch_size < 1:
            raise UserError(
                "--batch-size must be positive; --lr (0 = auto), --router-lr (0 = auto), --max-tokens, --epochs, "
                "--route-balance and --revive must be >= 0."
            )

    @classmethod
    def of(cls, cfg: FitConfig, **resolved: Any) -> Training:
        """The training block of ``cfg``, with ``resolved`` values (lr, k_aux) in place of the automatic ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: resolved.get(name, getattr(cfg, name)) for name in names}
        if values["optimizer"] == "signum-sf" and values["schedule"] == "warmup-decay":
            values["schedule"] = "constant"  # the average replaces the decay; the warmup stays, as in the paper
        return cls(**values)


def with_recipe(cfg: FitConfig) -> FitConfig:
    """``cfg`` with its recipe's fixed settings in place; a setting the user moved away from both its
    default and the recipe's value is refused rather than silently overridden."""
    if cfg.recipe not in RECIPES:
        raise UserError(f"unknown recipe {cfg.recipe!r}; use one of {', '.join(RECIPES)}.")
    if cfg.recipe == "sae-pipe":
        return cfg
    defaults = FitConfig()
    clash = [
        f"--{key.replace('_', '-')} {getattr(cfg, key)}"
        for key, value in REFERENCE_RECIPE.items()
        if getattr(cfg, key) not in (value, getattr(defaults, key)) or key in cfg.sweep
    ]
    if clash:
        raise UserError(
            f"--recipe {cfg.recipe} fixes {', '.join(REFERENCE_RECIPE)}; drop {', '.join(clash)} "
            "or train with the default recipe."
        )
    return dataclasses.replace(cfg, **REFERENCE_RECIPE)
