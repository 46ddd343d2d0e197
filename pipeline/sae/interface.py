"""The one interface every SAE architecture implements, and the registry from cfg.json's ``arch`` to it.

Stages never touch an SAE's parameters: they encode, decode, ask for a dense code (circuit masks), for
latents' write directions (steering, logit effects) or for the decoder's linear part applied to a change
of code (delta splices). A new architecture is one module in this package that subclasses :class:`SAE`,
decorates itself with :func:`register`, and is imported by ``pipeline/sae/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

from pipeline.infra.errors import UserError

if TYPE_CHECKING:
    from pipeline.sae.selection import Encoder


# SaeConfig fields added after runs were first named: left out of cfg.json where unset (empty / False).
LATER_FIELDS = ("prefixes", "skip", "router_centre")


@dataclass
class SaeConfig:
    """Architecture of one SAE (the ``sae`` block of cfg.json)."""

    arch: str = "topk"  # a key of REGISTRY: topk | route | ... (see pipeline/sae/archs/)
    d_in: int = 576  # input width: the model's hidden size
    n_latents: int = 4096  # dictionary size
    k: int = 32  # top-k architectures: active latents per token; the others: the L0 trained for (0 = imported)
    layers: list[int] = field(default_factory=list)  # model layer(s) read: [L] for topk, the routed range for route
    routing: str = "hard"  # route: hard (top layer times its weight) | soft (weighted sum of layers)
    aggregate: str = "sum"  # route: router input is the sum | mean of the routed layers
    prefixes: list[int] = field(default_factory=list)  # matryoshka: nested dictionary sizes, the last = n_latents
    skip: bool = False  # transcoder: a linear skip path from the MLP's input adds to the output
    router_centre: bool = False  # route: the router reads the summed layers minus their running mean

    def __post_init__(self) -> None:
        if self.arch not in REGISTRY:
            raise UserError(f"unknown architecture {self.arch!r}; use one of {', '.join(REGISTRY)}.")
        low = 1 if REGISTRY[self.arch].top_k else 0  # a threshold code needs no k: imported ones have none
        if not low <= self.k < self.n_latents:
            raise UserError(f"k={self.k} must be between {low} and the number of latents - 1 ({self.n_latents - 1}).")
        if self.routing not in ("hard", "soft") or self.aggregate not in ("sum", "mean"):
            raise UserError(f"routing must be hard|soft and aggregate sum|mean (got {self.routing}, {self.aggregate}).")

    def to_dict(self) -> dict[str, object]:
        """cfg.json's sae block; prefixes, skip and router_centre only where set, so runs named before they
        existed keep their names."""
        record = asdict(self)
        return {key: value for key, value in record.items() if value or key not in LATER_FIELDS}


class Latents(NamedTuple):
    """Sparse code of a batch: k (activation, latent id) pairs per token."""

    acts: Tensor  # (B, k) non-negative activations (zeros pad rows with fewer active latents)
    indices: Tensor  # (B, k) latent ids


def pack(code: Tensor, k: int | None = None, theta: float | None = None) -> Latents:
    """A dense non-negative code (B, N) as padded Latents: its entries above ``theta`` (if given), at most
    ``k`` per token (if given), as many columns as the busiest token needs (zeros pad the others)."""
    if theta is not None:
        code = code * (code > theta)  # (B, N)
    width = max(int((code > 0).sum(dim=1).max()), 1) if code.shape[0] else 1
    acts, indices = code.topk(min(width, k) if k else width, dim=-1)  # (B, width)
    return Latents(acts, indices)


class SaeOutput(NamedTuple):
    """Everything one forward computes."""

    x: Tensor  # (B, D) what was reconstructed (for RouteSAE, the routed input)
    x_hat: Tensor  # (B, D) reconstruction
    latents: Latents  # the sparse code
    layer_weights: Tensor | None  # (B, L) RouteSAE router softmax, else None
    layer_choice: Tensor | None  # (B,) RouteSAE hard routing: index into cfg.layers, else None
    source: Tensor | None = None  # (B, D) what was encoded, where it is not x (a transcoder's MLP input)

    @property
    def encoded(self) -> Tensor:
        """The encoder's input: x itself for an SAE."""
        return self.x if self.source is None else self.source


class LossTerm(NamedTuple):
    """One term of an architecture's training loss besides the reconstruction's normalized MSE."""

    name: str  # its log.csv column
    weight: float  # what the term counts for in the loss
    value: Tensor  # () the unweighted term, logged as is


class Step(NamedTuple):
    """What a training hook knows about the step besides the batch."""

    number: int  # 0-based step number
    progress: float  # share of the run's steps done before this one, in [0, 1)
    dead: Tensor  # (N,) bool: latents idle for the run's dead_tokens
    low_precision: bool  # bf16 encoder GEMM
    average: Callable[[Tensor], Tensor]  # mean over the processes training this SAE (identity on one)


class Knobs(Protocol):
    """The training settings an architecture's hooks read (fit.config.Training has them all)."""

    @property
    def lr(self) -> float: ...  # peak learning rate of the SAE's own parameters

    @property
    def router_lr(self) -> float: ...  # peak learning rate of a router (0 where there is none)

    @property
    def recipe(self) -> str: ...  # sae-pipe | reference

    @property
    def k_aux(self) -> int: ...  # AuxK latents

    @property
    def aux_alpha(self) -> float: ...  # AuxK loss weight

    @property
    def revive(self) -> float: ...  # per-step rise of a dead latent's encoder bias, in mean k-th activations

    @property
    def route_balance(self) -> float: ...  # weight of the router's load-balancing loss

    @property
    def multi_topk(self) -> bool: ...  # also train the code at 4k

    @property
    def sparsity_coeff(self) -> float: ...  # L1 (standard, gated) or L0 (jumprelu) weight; 0 = adjusted to meet k

    @property
    def sparsity_warmup(self) -> float: ...  # share of the run over which the sparsity penalty rises

    @property
    def bandwidth(self) -> float: ...  # jumprelu: straight-through kernel width (0 = auto)


class SAE(nn.Module, ABC):
    """An SAE as every stage sees it; ``cfg`` is the ``sae`` block of its cfg.json."""

    cfg: SaeConfig

    @abstractmethod
    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Sparse code of ``x`` (B, D); ``k`` / ``theta`` override the inference rule."""

    @abstractmethod
    def decode(self, latents: Latents) -> Tensor:
        """Reconstruction (B, D) from a sparse code."""

    @abstractmethod
    def dense_code(self, x: Tensor) -> Tensor:
        """The inference code of ``x`` (M, D) as a dense (M, N) tensor, differentiable in ``x``."""

    @abstractmethod
    def encoder_rows(self) -> tuple[Tensor, Tensor]:
        """The encoder's rows (N, D) and the bias (N,) added to them, detached: what each latent reads."""

    @abstractmethod
    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        """Write directions (F, D) of ``latents`` (all N when None): what one unit of each adds to x_hat."""

    def output(self, x: Tensor, latents: Latents) -> Tensor:
        """What the SAE puts in place of its target, from its input ``x`` (B, D) and that input's code: the
        reconstruction (a transcoder adds its skip path of ``x``)."""
        return self.decode(latents)

    def write(self, code: Tensor) -> Tensor:
        """The decoder's linear part on a dense code (M, N) -> (M, D), no bias: the reconstruction's change
        when the code changes by ``code``."""
        return code @ self.directions()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def normalize_decoder(self) -> None:
        """Keep decoder rows at unit norm (architectures without that constraint leave this as it is)."""

    # --- training: `fit` calls these hooks and nothing else, so a trainable architecture overrides them ---

    multi_layer: ClassVar[bool] = False  # reads all of cfg.layers at once, (B, L, D), instead of one (B, D)
    top_k: ClassVar[bool] = True  # its code keeps the k largest latents (else a threshold decides; k may be 0)
    sites: ClassVar[tuple[str, ...]] = ("resid",)  # cache sites it reads per layer (pipeline.llm.sites)
    loss_names: ClassVar[tuple[str, ...]] = ()  # the loss terms logged in log.csv, after dead_share
    default_router_lr: ClassVar[float] = 0.0  # a router's peak lr when --router-lr is 0 (0: no router)

    @classmethod
    def plan_prefixes(cls, text: str, n_latents: int) -> list[int]:
        """cfg.prefixes from --prefixes ``text`` (nested dictionaries; none for most architectures)."""
        return []

    def param_groups(self, knobs: Knobs) -> list[dict[str, Any]]:
        """The parameters as torch optimizer groups, each ``{"params": [...], "lr": peak lr}``, together every
        parameter once. The first holds the dictionary (Muon steps its matrices); the schedule scales all
        groups' rates by the same factor."""
        return [{"params": list(self.parameters()), "lr": knobs.lr}]

    def prepare_training(self, knobs: Knobs) -> None:
        """Settle how the parameters are trained, once, before the first step."""

    def start(self, x: Tensor, step: Step) -> None:
        """Data-dependent initialization from the first batch ``x``."""

    def shared_encoder(self) -> Encoder | None:
        """The encoder a sweep may run in one GEMM with the other members reading the same layer (TopK),
        or None when this architecture selects its latents itself."""
        return None

    def loss_terms(self, out: SaeOutput, step: Step, knobs: Knobs) -> list[LossTerm]:
        """The terms added to the normalized MSE of ``out`` (auxiliary losses, sparsity penalties)."""
        return []

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        """Per-step updates after the optimizer step (decoder norms, thresholds, dead-latent care)."""
        self.normalize_decoder()

    def step_metrics(self, out: SaeOutput) -> dict[str, float]:
        """Architecture-specific numbers of one step for log.csv (see log_fields)."""
        return {}

    def log_fields(self) -> list[str]:
        """The log.csv columns step_metrics adds, after the common ones."""
        return []

    def training_state(self) -> dict[str, float]:
        """Training state that is neither parameter nor buffer (a sparsity controller's), saved with a
        resumable run so a resumed run goes on exactly as an uninterrupted one."""
        return {}

    def load_training_state(self, state: dict[str, float]) -> None:
        """Take up what ``training_state`` saved (empty from a state written without any)."""


REGISTRY: dict[str, type[SAE]] = {}  # arch -> class, filled by @register as each module is imported
TRAINED: set[str] = set()  # the archs `fit` trains
S = TypeVar("S", bound=type[SAE])


def register(arch: str, trainable: bool = False) -> Callable[[S], S]:
    """Class decorator: ``arch`` in cfg.json builds this class; ``trainable`` lets `fit` train it."""

    def add(cls: S) -> S:
        REGISTRY[arch] = cls
        if trainable:
            TRAINED.add(arch)
        return cls

    return add


def trainable_archs() -> list[str]:
    return [a for a in REGISTRY if a in TRAINED]


def inference_only_archs() -> list[str]:
    return [a for a in REGISTRY if a not in TRAINED]


def build_sae(cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> SAE:
    """The module of ``cfg.arch``, freshly initialized (seeded by ``generator``)."""
    return REGISTRY[cfg.arch](cfg, generator, device)  # type: ignore[call-arg]
