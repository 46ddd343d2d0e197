"""A run together with the cache it was trained on, checked to belong together (an imported run:
the cache it is given, read through :mod:`pipeline.live.borrowed`), and a run inside the model that cache
came from (:class:`Live`), loaded once by the stages that edit it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.infra.device import resolve_dtype
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.borrowed import Borrowed, ModelOnly
from pipeline.live.edit import Site
from pipeline.live.runs import soft_routed
from pipeline.live.splice import special_ids
from pipeline.llm.model import find_blocks, fingerprint_model, load_model, load_tokenizer, resolve_model
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import SAE, SaeOutput


def encode_rows(
    sae: SAE,
    cache: ActivationCache,
    layers: list[int],
    split: str,
    max_rows: int = 0,
    batch: int = 4096,
    k: int | None = None,
    theta: float | None = None,
) -> Iterator[SaeOutput]:
    """The SAE's output on the cache's rows of ``split`` (at most ``max_rows``; 0 = all), ``batch`` rows at a
    time, each row as the SAE reads it: one layer, a routed SAE's layers, or a transcoder's MLP input and
    output (its sites, read shard-aligned); ``k`` / ``theta`` override the inference rule."""
    reads = [cache.split_rows(split, layers, max_rows, site) for site in sae.sites]
    for parts in zip(*reads):
        rows = np.concatenate([part for _, part in parts], axis=1)  # (n, S * L, D)
        for start in range(0, len(rows), batch):
            x = torch.from_numpy(rows[start : start + batch]).to(device=sae.device, dtype=torch.float32)  # (b, ., D)
            yield sae(x if sae.multi_layer else x[:, 0], k=k, theta=theta)


@dataclass
class Subject:
    """One run being evaluated: its SAE, cfg.json and the cache it was trained on."""

    folder: Folder
    sae: SAE
    cfg: dict[str, Any]
    cache: ActivationCache
    normalizer: Normalizer
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(self.cfg["sae"]["layers"])

    @property
    def is_route(self) -> bool:
        """Whether the SAE reads several layers of the residual stream through a router (RouteSAE)."""
        return self.sae.multi_layer and self.sae.sites == ("resid",)

    @property
    def soft_routed(self) -> bool:
        """A routed SAE whose code mixes layers: no single layer of the model can take it back."""
        return soft_routed(self.cfg["sae"])

    def site(self) -> Site:
        """The SAE at its place in the model (its first layer; a routed SAE's first routed layer); a transcoder
        with its MLP sites' normalizations (cfg.json's cache block records them)."""
        sites = self.sae.sites
        if sites == ("resid",):
            return Site(self.layers[0], self.sae, self.normalizer, self.folder.name)
        norms = {k: Normalizer.from_dict(v) for k, v in self.cfg["cache"].get("site_normalization", {}).items()}
        return Site(self.layers[0], self.sae, norms[sites[0]], self.folder.name, norms.get(sites[-1]))

    @property
    def has_activations(self) -> bool:
        """Whether the cache's activation rows can feed this SAE (always, except for some imported runs)."""
        if isinstance(self.cache, Borrowed):
            return self.cache.usable
        return not isinstance(self.cache, ModelOnly)

    def check_infer_k(self, infer_k: int | None) -> None:
        """An inference-time k must pick some but not all latents of the SAE."""
        n_latents = self.cfg["sae"]["n_latents"]
        if infer_k is not None and not 0 < infer_k < n_latents:
            raise UserError(f"--infer-k {infer_k} must be between 1 and {n_latents - 1} for {self.folder.url}.")


def load_subject(run: str, device: torch.device, cache_path: str | None = None) -> Subject:
    """Load a run and the cache named in its cfg.json (or ``cache_path``), refusing mismatches."""
    sae, cfg = load_sae(run, device)
    if cfg.get("imported"):
        return Subject(
            Folder.at(run),
            sae,
            cfg,
            _imported_cache(run, cfg, cache_path),
            Normalizer.from_dict(cfg["cache"]["normalization"]),
        )
    cache = ActivationCache.open(cache_path or cfg["cache"]["path"])
    if cache.key != cfg["cache"]["key"]:
        raise UserError(
            f"run {run} was trained on cache {cfg['cache']['key']}, but {cache_path or cfg['cache']['path']} "
            f"holds {cache.key}; use the cache the SAE was trained on (or re-train on this one)."
        )
    if cache.manifest["normalization"] != cfg["cache"]["normalization"]:
        raise UserError(
            f"run {run} was trained with normalization {cfg['cache']['normalization']}, the cache "
            f"now has {cache.manifest['normalization']}; the SAE cannot be evaluated on it."
        )
    for layer in cfg["sae"]["layers"]:
        cache.layer_index(layer)
    return Subject(Folder.at(run), sae, cfg, cache, Normalizer.from_dict(cache.manifest["normalization"]))


def _imported_cache(run: str, cfg: dict[str, Any], cache_path: str | None) -> ActivationCache:
    """An imported run's view of ``cache_path`` (a cache of the same model), or of no cache at all."""
    if not cache_path:
        return ModelOnly(run, cfg)
    cache = ActivationCache.open(cache_path)
    model, held = cfg["cache"]["model"], cache.manifest["spec"]["model"]
    if {k: held.get(k) for k in ("sha256", "commit")} != {k: model.get(k) for k in ("sha256", "commit")}:
        raise UserError(
            f"cache {cache.key} was extracted from {held['name']!r}, not from {model['name']!r} that imported run "
            f"{Folder.at(run).name} reads; give a cache of that model."
        )
    return Borrowed(cache, run, cfg)


@dataclass
class Live:
    """A run inside the running model: the run, the model its cache came from, its tokenizer."""

    subject: Subject
    model: torch.nn.Module
    blocks: torch.nn.ModuleList
    tokenizer: Any  # the model's Hugging Face tokenizer
    special: frozenset[int]  # token ids no edit touches (BOS, EOS, pad...)

    @property
    def site(self) -> Site:
        return self.subject.site()

    @property
    def device(self) -> torch.device:
        return self.subject.sae.device


def go_live(subject: Subject, dtype: str = "cache") -> Live:
    """``subject`` with the model and tokenizer of its cache, on the SAE's device."""
    model, blocks = load_llm(subject.cache, subject.sae.device, dtype)
    tokenizer = load_cache_tokenizer(subject.cache)
    return Live(subject, model, blocks, tokenizer, special_ids(tokenizer))


def load_llm(
    cache: ActivationCache, device: torch.device, dtype: str = "cache"
) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The model the cache was extracted from, checked by fingerprint, in ``dtype``: by default ("cache")
    the precision it was extracted in, so that the activations an SAE is spliced into are the ones it
    was trained on (a bf16 GPU extraction is not evaluated against a float32 forward)."""
    spec = cache.manifest["spec"]["model"]
    source = resolve_model(spec["name"], spec.get("revision"))
    expected = {k: v for k, v in spec.items() if k in ("sha256", "commit")}
    found = fingerprint_model(source)
    if found != expected:
        raise UserError(
            f"the model at {spec['name']!r} is not the one cache {cache.key} was extracted from "
            f"(fingerprint {found} != {expected}); the SAE would be spliced into another model."
        )
    if dtype == "cache":  # a cache from before the manifest recorded it: what extraction chose then
        dtype = cache.manifest["spec"].get("compute_dtype", "auto")
    model = load_model(source, device, resolve_dtype(dtype, device))
    return model, find_blocks(model)


def load_cache_tokenizer(cache: ActivationCache) -> Any:
    """The tokenizer of the model the cache was extracted from."""
    spec = cache.manifest["spec"]["model"]
    return load_tokenizer(resolve_model(spec["name"], spec.get("revision")))
