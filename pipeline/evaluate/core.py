"""The core suite: SAEBench's core metrics (sae-bench 0.6.0, ``evals/core``), with its field names.

Everything but KL / CE is summed over the held-out rows of the cache in the pass that computes nmse
(:class:`CoreTap` rides along in ``stage.fast_metrics``); KL / CE are the spliced forwards' own numbers.
Measured in the space the SAE reads, the cache's normalized rows (SAEBench: the model's raw stream).

  explained_variance   1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: variance about the mean, as
                       sae-bench documents it (its 0.6.0 code measures it about zero, the bug SAELens
                       fixed for #659; that value is kept as ``explained_variance_about_zero``)
  explained_variance_legacy  mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2
  mse                  mean over tokens and dimensions of (x - x_hat)^2
  cossim               mean over tokens of cos(x, x_hat)
  l2_norm_in / out, l2_ratio   mean ||x||, mean ||x_hat||, mean ||x_hat|| / ||x||
  relative_reconstruction_bias  mean ||x_hat||^2 / mean <x, x_hat>   (Eq. 10 of arXiv:2404.16014)
  l0 / l1              mean count / mean absolute sum of the active latents per token
  feature_density      share of tokens each latent fires on; frac_alive, freq_over_1/10_percent from it
  kl_div_score         (KL_zero - KL_sae) / KL_zero; ce_loss_score (CE_zero - CE_sae) / (CE_zero - CE_clean)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.reader import ActivationCache
from pipeline.evaluate.geometry import Geometry
from pipeline.interop.saebench import EvalResult
from pipeline.sae.interface import SaeOutput

EVAL_TYPE = "core"
SEQ_STRIDE = 1 << 24  # a held-out row's sequence key: shard * SEQ_STRIDE + its sequence in the shard


def heldout_keys(cache: ActivationCache, max_rows: int = 0) -> np.ndarray:
    """The sequence key (R,) of each held-out row, in the order ``split_rows`` gives the rows."""
    left, keys = max_rows or cache.rows("heldout"), []
    for record in cache.shards:
        n = min(record["rows"]["heldout"], left)
        if n > 0:
            keys.append(record["index"] * SEQ_STRIDE + cache.read(record["index"], "heldout/seq")[:n].astype(np.int64))
            left -= n
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)


def row_sums(x: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
    """Sums over a batch (B, D) of every per-row reconstruction quantity the core metrics average."""
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).pow(2).sum(-1)  # (B,)
    norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)  # (B,)
    dot = (x * x_hat).sum(-1)  # (B,)
    spread = (x - x.mean(0)).pow(2).sum(-1)  # (B,) about this batch's mean, as the legacy formula takes it
    return {
        "err": err.sum(),
        "x2": x.pow(2).sum(),
        "cos": (dot / (norm_in * norm_out).clamp_min(1e-12)).sum(),
        "norm_in": norm_in.sum(),
        "norm_out": norm_out.sum(),
        "ratio": (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum(),  # sae-bench's guard
        "x_hat2": norm_out.pow(2).sum(),
        "dot": dot.sum(),
        "legacy": (1 - err / spread.clamp_min(1e-12)).sum(),
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (written as -1 in SAEBench's files, as sae-bench writes NaN)."""
    return a / b if b else float("nan")


@dataclass
class CoreTap:
    """Running sums of the core metrics over the held-out rows one SAE reconstructs."""

    n_latents: int
    keys: Tensor  # (R,) sequence key of each held-out row, in reading order
    sums: dict[str, Tensor] = field(default_factory=dict)
    x_sum: Tensor | float = 0.0  # (D,)
    fires: Tensor | None = None  # (N,) tokens each latent fired on
    pairs: list[Tensor] = field(default_factory=list)  # unique (sequence, latent) keys with a firing
    rows: int = 0
    batches: int = 0

    def add(self, out: SaeOutput) -> None:
        """Add one batch of the SAE's output."""
        for name, value in row_sums(out.x, out.x_hat).items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        acts, ids = out.latents.acts, out.latents.indices  # (B, k), (B, k)
        self.sums["l0"] = self.sums.get("l0", 0.0) + (acts != 0).sum().double()
        self.sums["l1"] = self.sums.get("l1", 0.0) + acts.double().abs().sum()
        fired = acts > 0  # (B, k)
        counts = torch.bincount(ids[fired], minlength=self.n_latents)  # (N,)
        self.fires = counts if self.fires is None else self.fires + counts
        seq = self.keys[self.rows : self.rows + len(acts)].to(ids.device)  # (B,)
        self.pairs.append(torch.unique(seq[:, None].expand_as(ids)[fired] * self.n_latents + ids[fired]))
        self.x_sum = self.x_sum + out.x.double().sum(0)
        self.rows += len(acts)
        self.batches += 1

    def means(self) -> dict[str, float]:
        """Every per-token mean, named as sae-bench names it."""
        n, s = self.rows, {k: float(v) for k, v in self.sums.items()}
        about_mean = s["x2"] - float(torch.as_tensor(self.x_sum).square().sum()) / n
        return {
            "explained_variance": 1 - ratio(s["err"], about_mean),
            "explained_variance_about_zero": 1 - ratio(s["err"], s["x2"]),
            "explained_variance_legacy": s["legacy"] / n,
            "mse": s["err"] / (n * len(torch.as_tensor(self.x_sum))),
            "cossim": s["cos"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": ratio(s["x_hat2"], s["dot"]),  # NaN for an all-zero reconstruction
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
        }

    def density(self) -> tuple[Tensor, Tensor]:
        """Per latent (N,): the share of tokens it fires on, and its firing tokens per sequence it fires in."""
        fires = self.fires.double() if self.fires is not None else torch.zeros(self.n_latents, dtype=torch.float64)
        latents = torch.unique(torch.cat(self.pairs)) % self.n_latents if self.pairs else torch.zeros(0).long()
        prompts = torch.bincount(latents, minlength=self.n_latents).double().to(fires.device)  # (N,)
        return fires / max(self.rows, 1), fires / prompts  # NaN where it never fires, as in sae-bench


def misc_metrics(density: Tensor, geometry: Geometry) -> dict[str, float]:
    """sae-bench's ``misc_metrics`` from the feature densities (N,) and the weights' geometry."""
    total = float(density.sum())
    return {
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total > 0 else 0.0,
        "average_max_encoder_cosine_sim": float(geometry.max_encoder_cos.mean()),
        "average_max_decoder_cosine_sim": float(geometry.max_decoder_cos.mean()),
        "frac_alive": float((density > 0).double().mean()),
    }


def spliced(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """KL and CE under sae-bench's names from the spliced forwards' numbers (NaN when not measured)."""
    nan = math.nan
    kl_sae, kl_zero = result.get("kl_per_token", nan), result.get("kl_zero_per_token", nan)
    return {
        "model_behavior_preservation": {
            "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero else nan,
            "kl_div_with_ablation": kl_zero,
            "kl_div_with_sae": kl_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": result.get("ce_recovered", nan),
            "ce_loss_with_ablation": result.get("ce_zero", nan),
            "ce_loss_with_sae": result.get("ce_spliced", nan),
            "ce_loss_without_sae": result.get("ce_clean", nan),
        },
    }


def eval_config(manifest: dict[str, Any], result: dict[str, Any], batch_size: int, tap: CoreTap) -> dict[str, Any]:
    """sae-bench's ``CoreEvalConfig`` as this evaluation ran it."""
    spec = manifest["spec"]
    measured = "kl_per_token" in result
    return {
        "model_name": spec["model"]["name"],
        "llm_dtype": spec.get("compute_dtype", "auto"),
        "batch_size_prompts": batch_size,
        "n_eval_reconstruction_batches": math.ceil(result.get("sequences", 0) / batch_size),
        "n_eval_sparsity_variance_batches": tap.batches,
        "dataset": str(spec.get("corpus", {}).get("dataset", "")),
        "context_size": spec.get("ctx_len", 0),
        "compute_kl": measured,
        "compute_ce_loss": "ce_spliced" in result,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": True,  # the cache stores real tokens only
        "verbose": False,
    }


def core_result(tap: CoreTap, geometry: Geometry, result: dict[str, Any], config: dict[str, Any]) -> EvalResult:
    """The core suite of one SAE from its held-out sums, its weights and the spliced metrics ``result``."""
    m = tap.means()
    density, consistent = tap.density()
    quality = ("explained_variance", "explained_variance_legacy", "mse", "cossim")
    metrics: dict[str, dict[str, float]] = {
        **spliced(result),
        "reconstruction_quality": {k: m[k] for k in quality},
        "shrinkage": {k: m[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
        "sparsity": {"l0": m["l0"], "l1": m["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": int(result.get("tokens_spliced", 0)),
            "total_tokens_eval_sparsity_variance": tap.rows,
        },
        "misc_metrics": misc_metrics(density, geometry),
    }
    columns = {
        "feature_density": density,
        "consistent_activation_heuristic": consistent,
        "encoder_bias": geometry.encoder_bias,
        "encoder_norm": geometry.encoder_norm,
        "encoder_decoder_cosine_sim": geometry.encoder_decoder_cos,
        "max_decoder_cosine_sim": geometry.max_decoder_cos,
        "max_encoder_cosine_sim": geometry.max_encoder_cos,
    }
    lists = {name: values.tolist() for name, values in columns.items()}
    details = [{"index": i, **{name: lists[name][i] for name in lists}} for i in range(tap.n_latents)]
    notes = {
        "explained_variance_about_zero": m["explained_variance_about_zero"],
        "space": "the SAE's input: the cache's normalized rows",
        "definitions": "pipeline/evaluate/core.py",
    }
    return EvalResult(EVAL_TYPE, config, metrics, details, notes)
