"""Evaluation results in SAEBench's output format (Karvonen et al., 2025; the ``sae-bench`` package, 0.6.0).

One JSON file per SAE and per metric family, with the fields of sae-bench's ``BaseEvalOutput``:
``eval_type_id``, ``eval_config``, ``eval_id`` (a UUID), ``datetime_epoch_millis``, ``eval_result_metrics``
(categories of flat numbers), ``eval_result_details`` (one object per latent), ``eval_result_unstructured``,
``sae_bench_commit_hash``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version`` and
``sae_cfg_dict``. The file is named as sae-bench names it, ``<release>_<sae id>_eval_results.json``, in a
folder named after the eval type, so SAEBench's plotting code (which keys on both) reads it unchanged.
``make check-peers`` validates every written file with sae-bench's own classes (benchmarks/check_saebench.py).
"""

from __future__ import annotations

import math
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple

from pipeline.infra.files import Folder
from pipeline.interop.saelens import THEIRS

RELEASE = "sae-pipe"  # sae_lens_release_id: where the SAE comes from
SCHEMA = "sae-bench 0.6.0"  # the version whose output classes these files are checked against
NOT_SAE_BENCH = "Unknown"  # sae_bench_commit_hash: what sae-bench itself writes when it has no commit


class EvalResult(NamedTuple):
    """One metric family of one SAE, before it is dressed as a SAEBench file."""

    eval_type_id: str  # "core", or "sae_pipe_<suite>" for families SAEBench does not have
    eval_config: dict[str, Any]
    metrics: dict[str, dict[str, float]]  # category -> flat metrics
    details: list[dict[str, Any]]  # one object per latent (or per item of the family)
    unstructured: dict[str, Any]  # notes: what differs from sae-bench's own computation


def sae_cfg_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The SAE's config with SAELens's field names (SAEBench's ``sae_cfg_dict``), sae-pipe's own block in
    ``metadata.sae_pipe`` (a RouteSAE reads several layers: its hook is its first one)."""
    sae, cache = cfg["sae"], cfg.get("cache", {})
    model = cache.get("model", {}).get("name", "")
    return {
        "architecture": THEIRS.get(sae["arch"], sae["arch"]),
        "d_in": sae["d_in"],
        "d_sae": sae["n_latents"],
        **({"k": sae["k"]} if sae.get("k") else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": cache.get("normalization", {}).get("method", "none"),
        "metadata": {
            "model_name": model,
            "hook_name": f"blocks.{sae['layers'][0]}.hook_resid_pre",
            "hook_layer": sae["layers"][0],
            "context_size": cache.get("ctx_len"),
            "sae_pipe": sae,
        },
    }


def document(result: EvalResult, run: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The whole SAEBench file of ``result`` for run ``run`` (NaN written as -1, as sae-bench does)."""
    doc = {
        "eval_type_id": result.eval_type_id,
        "eval_config": result.eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": result.metrics,
        "eval_result_details": result.details,
        "sae_bench_commit_hash": NOT_SAE_BENCH,
        "sae_lens_id": run,
        "sae_lens_release_id": RELEASE,
        "sae_lens_version": None,  # no SAELens code ran
        "sae_cfg_dict": sae_cfg_dict(cfg),
        "eval_result_unstructured": {"computed_by": f"sae-pipe {_version()}", "schema": SCHEMA, **result.unstructured},
    }
    return _no_nan(doc)


def file_name(run: str) -> str:
    """sae-bench's ``get_results_filepath`` name for an SAE."""
    return f"{RELEASE}_{run}_eval_results.json".replace("/", "_")


def write_result(result: EvalResult, run: str, cfg: dict[str, Any], folder: Folder) -> str:
    """Write ``result`` under ``folder`` (the run's evaluate folder) as ``saebench/<type>/<file>``, atomically."""
    parts = ("saebench", result.eval_type_id, file_name(run))
    folder.write_json(document(result, run, cfg), *parts)
    return folder.path(*parts)


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return -1 if isinstance(obj, float) and not math.isfinite(obj) else obj


def _version() -> str:
    try:
        return version("sae-pipe")
    except PackageNotFoundError:
        return "unknown"
