"""Per-token normalization applied before storing, and undone when splicing back into the model.

``standardize`` (default, the RouteSAE recipe): x' = (x - mean(x)) / (std(x) + eps) over the hidden
dimension, with the Bessel-corrected std as in the RouteSAE code. ``scale``: one factor per layer,
estimated once, so that E||x'|| = sqrt(d). ``none``: stored as computed.

``layer_norm`` is SAELens's per-token standardization, kept for imported SAEs (extract does not offer
it): the same map on the way in, but the reconstruction is scaled back by std, not std + eps.

``center`` (imported SAELens SAEs read from a TransformerLens model loaded with ``center_writing_weights``,
with ``none`` or ``scale``): the per-token mean over the hidden dimension is subtracted first and added back
to the reconstruction. On a LayerNorm model that centred stream is exactly what TransformerLens computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.infra.errors import UserError

METHODS = ("standardize", "scale", "none")  # what extract offers
LAYER_NORM = "layer_norm"  # SAELens's variant, for imported SAEs
EPS = 1e-6


@dataclass
class Normalizer:
    """A normalization method and its constants (recorded in the manifest and every cfg.json)."""

    method: str = "standardize"  # standardize | scale | none | layer_norm (imported SAELens SAEs)
    eps: float = EPS  # added to the per-token std
    scales: dict[int, float] = field(default_factory=dict)  # layer -> factor, for `scale`
    center: bool = False  # subtract the per-token mean first (none and scale only; the others center anyway)

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, LAYER_NORM):
            raise UserError(f"unknown normalization {self.method!r}; use one of {', '.join(METHODS)}.")
        if self.center and self.method not in ("none", "scale"):
            raise UserError(f"normalization {self.method!r} centers every token already; `center` is for none|scale.")
        self.scales = {int(k): float(v) for k, v in self.scales.items()}

    def to_dict(self) -> dict[str, object]:
        out = {"method": self.method, "eps": self.eps, "scales": {str(k): v for k, v in self.scales.items()}}
        return {**out, "center": True} if self.center else out  # absent when off: existing keys stay as they were

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        center = data.get("center") is True
        return cls(str(data["method"]), float(data.get("eps", EPS)), dict(data.get("scales", {})), center)

    def fit_scales(self, samples: dict[int, torch.Tensor]) -> None:
        """Estimate the `scale` factors from ``{layer: (N, D)}`` samples of raw activations."""
        if self.method == "scale":
            for layer, x in samples.items():
                mean_norm = x.float().norm(dim=-1).mean().item()
                self.scales[layer] = (x.shape[-1] ** 0.5) / max(mean_norm, 1e-12)

    def normalize(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(x', stats): x' in float32, stats to undo it with :meth:`denormalize`."""
        x = x.float()  # (..., D)
        if self.method == "standardize":
            mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
            std = x.std(dim=-1, keepdim=True) + self.eps  # (..., 1)
            return (x - mean) / std, (mean, std)
        if self.method == LAYER_NORM:  # as SAELens computes it: std of the centered x, eps only on the way in
            mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
            centered = x - mean  # (..., D)
            std = centered.std(dim=-1, keepdim=True)  # (..., 1)
            return centered / (std + self.eps), (mean, std)
        mean = x.mean(dim=-1, keepdim=True) if self.center else torch.zeros((), device=x.device)  # (..., 1) or ()
        if self.method == "scale":
            factor = torch.tensor(1.0 / self._scale(layer), device=x.device)
            return (x - mean) / factor, (mean, factor)
        return x - mean, (mean, torch.ones((), device=x.device))

    def denormalize(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Map a reconstruction in normalized space back to the model's space."""
        mean, std = stats
        return x * std + mean

    def _scale(self, layer: int) -> float:
        if layer not in self.scales:
            raise UserError(f"no `scale` normalization factor for layer {layer}; the cache has {sorted(self.scales)}.")
        return self.scales[layer]
