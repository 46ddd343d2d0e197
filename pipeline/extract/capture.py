"""One shard plan in, the shard's arrays out: forward, normalize, keep the planned rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.cache.compact import COMPACT, quantize
from pipeline.cache.normalize import Normalizer
from pipeline.extract.packing import ShardPlan
from pipeline.infra.console import Bar
from pipeline.llm.hooks import run_to_layers

TORCH_STORE = {"float16": torch.float16, "float32": torch.float32}  # int8: pipeline.cache.compact


@dataclass
class Capturer:
    """A loaded model and the settings that turn its hidden states into stored rows."""

    model: nn.Module
    blocks: nn.ModuleList
    layers: list[int]
    normalizer: Normalizer
    store_dtype: str
    batch_size: int
    device: torch.device

    @torch.inference_mode()
    def raw_sample(self, plan: ShardPlan) -> dict[int, torch.Tensor]:
        """Un-normalized stored rows ``{layer: (N, D)}`` of the plan's first batch (for `scale`)."""
        ids = torch.from_numpy(plan.tokens[: self.batch_size]).to(self.device)
        keep = torch.from_numpy(plan.keep[: self.batch_size]).to(self.device)
        hidden = run_to_layers(self.model, self.blocks, ids, self.layers)
        return {layer: h[keep].float() for layer, h in hidden.items()}

    @torch.inference_mode()
    def shard_arrays(self, plan: ShardPlan, progress: Bar | None = None) -> dict[str, np.ndarray]:
        """All arrays of one shard (see pipeline.cache.backends for the layout): act (L, n, D), and scale
        (L, n) for an int8 cache."""
        names = ["act", "scale"] if self.store_dtype == COMPACT else ["act"]
        parts: dict[str, list[list[np.ndarray]]] = {
            f"{split}/{name}": [[] for _ in self.layers] for split in ("train", "heldout") for name in names
        }
        for start in range(0, len(plan.tokens), self.batch_size):
            stop = start + self.batch_size
            ids = torch.from_numpy(plan.tokens[start:stop]).to(self.device)  # (B, T)
            keep = torch.from_numpy(plan.keep[start:stop]).to(self.device)  # (B, T)
            held = torch.from_numpy(plan.heldout[start:stop]).to(self.device)[:, None]  # (B, 1)
            hidden = run_to_layers(self.model, self.blocks, ids, self.layers)
            for i, layer in enumerate(self.layers):
                stored = self._stored(self.normalizer.normalize(hidden[layer], layer)[0])  # name -> (B, T, ...)
                for name, x in stored.items():
                    parts[f"train/{name}"][i].append(x[keep & ~held].cpu().numpy())
                    parts[f"heldout/{name}"][i].append(x[keep & held].cpu().numpy())
            if progress is not None:
                progress.advance(0, int(keep.sum()))
        arrays = {name: np.stack([np.concatenate(p) for p in layer_parts]) for name, layer_parts in parts.items()}
        return {**arrays, **row_metadata(plan)}

    def _stored(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized rows (B, T, D) as stored: cast, or int8 codes and per-token scales."""
        if self.store_dtype == COMPACT:
            codes, scale = quantize(x)  # (B, T, D), (B, T)
            return {"act": codes, "scale": scale}
        return {"act": x.to(TORCH_STORE[self.store_dtype])}


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
