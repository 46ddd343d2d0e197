"""One shard plan in, the shard's arrays out: forward, normalize, keep the planned rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.cache.compact import COMPACT, quantize
from pipeline.cache.manifest import site_arrays
from pipeline.cache.normalize import Normalizer
from pipeline.extract.packing import ShardPlan
from pipeline.infra.console import Bar
from pipeline.llm.hooks import run_to_sites

TORCH_STORE = {"float16": torch.float16, "float32": torch.float32}  # int8: pipeline.cache.compact


@dataclass
class Capturer:
    """A loaded model and the settings that turn its hidden states into stored rows."""

    model: nn.Module
    blocks: nn.ModuleList
    layers: list[int]
    normalizers: dict[str, Normalizer]  # site -> its normalization (pipeline.llm.sites)
    store_dtype: str
    batch_size: int
    device: torch.device

    @torch.inference_mode()
    def raw_sample(self, plan: ShardPlan) -> dict[tuple[str, int], torch.Tensor]:
        """Un-normalized stored rows ``{(site, layer): (N, D)}`` of the plan's first batch (for `scale`)."""
        ids = torch.from_numpy(plan.tokens[: self.batch_size]).to(self.device)
        keep = torch.from_numpy(plan.keep[: self.batch_size]).to(self.device)
        hidden = run_to_sites(self.model, self.blocks, ids, self.layers, tuple(self.normalizers))
        return {where: h[keep].float() for where, h in hidden.items()}

    def fit_scales(self, plan: ShardPlan) -> None:
        """Estimate every site's `scale` factors from the plan's first batch."""
        sample = self.raw_sample(plan)
        for site, normalizer in self.normalizers.items():
            normalizer.fit_scales({layer: x for (s, layer), x in sample.items() if s == site})

    @torch.inference_mode()
    def shard_arrays(self, plan: ShardPlan, progress: Bar | None = None) -> dict[str, np.ndarray]:
        """All arrays of one shard (see pipeline.cache.backends for the layout): act (L, n, D) and each MLP
        site's (L, n, D), with their scales (L, n) for an int8 cache."""
        parts: dict[str, list[list[np.ndarray]]] = {
            f"{split}/{name}": [[] for _ in self.layers]
            for split in ("train", "heldout")
            for site in self.normalizers
            for name in site_arrays(site)[: 2 if self.store_dtype == COMPACT else 1]
        }
        for start in range(0, len(plan.tokens), self.batch_size):
            stop = start + self.batch_size
            ids = torch.from_numpy(plan.tokens[start:stop]).to(self.device)  # (B, T)
            keep = torch.from_numpy(plan.keep[start:stop]).to(self.device)  # (B, T)
            held = torch.from_numpy(plan.heldout[start:stop]).to(self.device)[:, None]  # (B, 1)
            hidden = run_to_sites(self.model, self.blocks, ids, self.layers, tuple(self.normalizers))
            for (site, layer), h in hidden.items():
                i = self.layers.index(layer)
                stored = self._stored(self.normalizers[site].normalize(h, layer)[0], site)  # name -> (B, T, ...)
                for name, x in stored.items():
                    parts[f"train/{name}"][i].append(x[keep & ~held].cpu().numpy())
                    parts[f"heldout/{name}"][i].append(x[keep & held].cpu().numpy())
            if progress is not None:
                progress.advance(0, int(keep.sum()))
        arrays = {name: np.stack([np.concatenate(p) for p in layer_parts]) for name, layer_parts in parts.items()}
        return {**arrays, **row_metadata(plan)}

    def _stored(self, x: torch.Tensor, site: str) -> dict[str, torch.Tensor]:
        """Normalized rows (B, T, D) of ``site`` as stored: cast, or int8 codes and per-token scales."""
        act, scale = site_arrays(site)
        if self.store_dtype == COMPACT:
            codes, scales = quantize(x)  # (B, T, D), (B, T)
            return {act: codes, scale: scales}
        return {act: x.to(TORCH_STORE[self.store_dtype])}


def row_metadata(plan: ShardPlan) -> dict[str, np.ndarray]:
    """Token, document and position of every stored row, plus the held-out sequences themselves."""
    positions = np.broadcast_to(np.arange(plan.tokens.shape[1], dtype=np.uint16), plan.tokens.shape)
    seq_local = np.broadcast_to(np.arange(len(plan.tokens))[:, None], plan.tokens.shape)
    out: dict[str, np.ndarray] = {}
    for split, rows in (("train", ~plan.heldout), ("heldout", plan.heldout)):
        mask = plan.keep & rows[:, None]  # (P, T), row-major = (sequence, position) order
        out[f"{split}/token"] = plan.tokens[mask].astype(np.int32)
        out[f"{split}/doc"] = plan.docs[mask].astype(np.int32)
        out[f"{split}/pos"] = positions[mask].astype(np.uint16)
    held = np.flatnonzero(plan.heldout)
    renumber = np.full(len(plan.tokens), -1, dtype=np.int32)
    renumber[held] = np.arange(len(held), dtype=np.int32)
    out["heldout/seq"] = renumber[seq_local[plan.keep & plan.heldout[:, None]]]
    out["heldout/sequences"] = plan.tokens[held].astype(np.int32)  # (h, T)
    out["heldout/sequence_docs"] = plan.docs[held].astype(np.int32)  # (h, T)
    out["heldout/sequence_index"] = (plan.first_seq + held).astype(np.int32)  # (h,)
    return out
