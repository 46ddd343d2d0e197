"""An edit of an SAE's code inside the running model, written once for every stage and architecture.

At a site (an SAE reading the input h of block L) the rows of h are normalized as the cache was
(x, with each token's stats), encoded to a code z, and an edit gives the change z' - z. The
:class:`Mode` says what reaches the next block:

    delta    h + s * W^T (z' - z) / w        only the change of the decoded code: every feature the
                                             edit leaves alone, and the SAE's reconstruction error,
                                             pass through (an unchanged code gives h exactly)
    replace  denorm((x_hat + W^T (z' - z)) / w)   the edited reconstruction (evaluate's splice, the
                                             RouteSAE reference's hook): the SAE's error is dropped

``W^T (z' - z)`` is the decoder's linear part on the change (``SAE.write``, or ``SAE.directions`` of the
few latents an edit names), s the token's own normalization scale (its std for `standardize`; the
mean cancels in a difference), w a routed SAE's routing weight (it encodes w * x, so its change reaches
x divided by w) or 1. Nothing here reads an SAE's parameters: every architecture is asked through
:class:`pipeline.sae.interface.SAE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.sae.interface import SAE, Latents, pack


class Mode(str, Enum):
    """What reaches the next block when an edit changes the code from z to z' (see the module doc)."""

    DELTA = "delta"
    REPLACE = "replace"


MODES = tuple(m.value for m in Mode)


class Site(NamedTuple):
    """An SAE at its place in the model: the block input it reads and the cache's normalization."""

    layer: int  # model layer (input of block `layer`); a routed SAE's first routed layer
    sae: SAE
    normalizer: Normalizer  # of what the SAE reads: the residual stream, or a transcoder's MLP input
    name: str  # the run folder's name
    target: Normalizer | None = None  # a transcoder: its MLP output's, to map the prediction back

    @property
    def transcodes(self) -> bool:
        """Whether the SAE reads block ``layer``'s MLP input and stands in for that MLP's output."""
        return self.sites == ("mlp_in", "mlp_out")

    @property
    def written_norm(self) -> Normalizer:
        """The normalization of what the SAE writes, which maps its directions into the model: a transcoder's MLP
        output's, an SAE's residual stream's (the one it reads)."""
        assert self.target is not None or not self.transcodes, f"{self.name} transcodes: its Site needs the target"
        return self.target if self.target is not None else self.normalizer

    @property
    def routed(self) -> bool:
        """Whether the SAE reads several layers through a router (each token edited at its routed layer)."""
        return self.sae.multi_layer and self.resid

    @property
    def sites(self) -> tuple[str, ...]:
        """The cache sites the SAE reads (a transcoder: an MLP's input and output; an SAE: the residual stream)."""
        return tuple(getattr(self.sae, "sites", ("resid",)))

    @property
    def resid(self) -> bool:
        """Whether the SAE reads and writes the residual stream, where every edit here lands."""
        return self.sites == ("resid",)

    def check(self) -> Site:
        """This site, refused with one clear error when its SAE does not live in the residual stream."""
        if not self.resid:
            raise UserError(
                f"run {self.name} is a {self.sae.cfg.arch} SAE of the sites {', '.join(self.sites)}: its edits land on "
                "its MLP's output (pipeline.live.splice.site_edits), not on a block's input."
            )
        return self

    @property
    def layers(self) -> list[int]:
        """Every layer the SAE reads: its routed range, or the one layer."""
        return list(self.sae.cfg.layers) if self.routed else [self.layer]


class Change(NamedTuple):
    """z' - z of M rows: (M, F) on the F latents ``ids``, or (M, N) on every latent when ``ids`` is None."""

    values: Tensor
    ids: Tensor | None = None


CodeEdit = Callable[[Tensor | Latents], Change | None]  # a row's code -> its change (None: left as it is)


@dataclass(frozen=True)
class EditSpec:
    """One edit of a site's code: the mode and what changes (None: nothing, the code as encoded)."""

    mode: Mode
    change: CodeEdit | None = None
    dense: bool = False  # hand ``change`` the dense code (M, N), differentiable in x (circuit masks), not Latents
    k: int | None = None  # inference overrides of the sparse code (evaluate --infer-k / --theta)
    theta: float | None = None
    undo_weight: bool = True  # replace, routed SAE: x_hat / w on the model's scale (False: evaluate --splice paper)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))  # "delta" from a config is Mode.DELTA


def written(sae: SAE, change: Change) -> Tensor:
    """W^T (z' - z): the change (M, D) a code change makes to the reconstruction, no bias."""
    if change.ids is None:
        return sae.write(change.values)
    return change.values @ sae.directions(change.ids)  # (M, F) @ (F, D)


def moved(h: Tensor, change: Tensor, scale: Tensor) -> Tensor:
    """h + s * change: a change (M, D) of the normalized input mapped into the rows ``h`` (M, D) of the residual
    stream by each token's scale ``scale`` (M, 1) or ()."""
    return (h.float() + change * scale).to(h.dtype)


def edit_mlp_rows(x_in: Tensor, out: Tensor, site: Site, spec: EditSpec) -> Tensor:
    """The rows ``out`` (M, D) of a transcoder's MLP output after ``spec``, the MLP's input rows ``x_in`` (M, D)
    encoded: delta moves the output by the change's write; replace puts the edited prediction in its place."""
    assert site.target is not None, f"{site.name} transcodes: its Site needs the MLP output's normalization"
    x, _ = site.normalizer.normalize(x_in, site.layer)  # (M, D)
    code = site.sae.dense_code(x) if spec.dense else site.sae.encode(x, spec.k, spec.theta)  # (M, N) | Latents
    change = spec.change(code) if spec.change is not None else None
    shift = written(site.sae, change) if change is not None else None  # (M, D) in the output's scaled space
    stats = site.target.normalize(out, site.layer)[1]  # the MLP sites' scale: one constant per layer
    if spec.mode is Mode.DELTA:
        return out if shift is None else moved(out, shift, stats[1])
    y_hat = site.sae.output(x, code if isinstance(code, Latents) else pack(code))  # (M, D)
    return site.target.denormalize(y_hat if shift is None else y_hat + shift, stats).to(out.dtype)


def edit_rows(h: Tensor, site: Site, spec: EditSpec, weight: Tensor | None = None) -> Tensor:
    """The rows ``h`` (M, D) of block ``site.layer``'s input after ``spec``; ``weight`` (M,): a routed SAE's
    routing weights of these rows (None: a one-layer SAE)."""
    x, stats = site.check().normalizer.normalize(h, site.layer)  # (M, D)
    w = weight[:, None] if weight is not None else torch.ones((), device=h.device)  # (M, 1) or ()
    x = x * w if weight is not None else x
    code = site.sae.dense_code(x) if spec.dense else site.sae.encode(x, spec.k, spec.theta)  # (M, N) | Latents
    change = spec.change(code) if spec.change is not None else None
    shift = written(site.sae, change) if change is not None else None  # (M, D) in the SAE's input space
    if spec.mode is Mode.DELTA:
        return h if shift is None else moved(h, shift / w, stats[1])
    x_hat = site.sae.decode(code if isinstance(code, Latents) else pack(code))  # (M, D)
    if shift is not None:
        x_hat = x_hat + shift
    if spec.undo_weight:
        x_hat = x_hat / w
    return site.normalizer.denormalize(x_hat, stats).to(h.dtype)
