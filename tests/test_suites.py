"""evaluate --suite: SAEBench's core metrics and the geometry suite against numpy on tiny examples, and
the written file against SAEBench's documented output schema (field names written out here, from
sae-bench 0.6.0's ``BaseEvalOutput`` and ``CoreEvalOutput``, not read from the writer)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import geometry
from pipeline.evaluate.core import CoreTap, core_result
from pipeline.evaluate.geometry import Geometry, max_cosine
from pipeline.infra.files import Folder
from pipeline.interop.saebench import EvalResult, write_result
from pipeline.sae.interface import Latents, SaeOutput

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 5)) + np.array([4.0, -3.0, 0.0, 2.0, 1.0])  # far from zero: variance about the mean matters
X_HAT = X + 0.5 * RNG.normal(size=X.shape)
ACTS = np.array([[2.0, 1.0, 0.0]] * 6 + [[0.5, 0.0, 0.0]] * 6)  # (12, 3): the last slot pads
IDS = np.array([[0, 1, 2]] * 4 + [[1, 3, 0]] * 2 + [[3, 0, 0]] * 6)
KEYS = np.array([0] * 4 + [1] * 4 + [2] * 4)  # three sequences of four rows


def fed_tap() -> CoreTap:
    """A core tap fed the example in two batches (5 rows, then 7), as fast_metrics would."""
    tap = CoreTap(4, torch.from_numpy(KEYS))
    for rows in (slice(0, 5), slice(5, 12)):
        x, x_hat = torch.tensor(X[rows], dtype=torch.float32), torch.tensor(X_HAT[rows], dtype=torch.float32)
        code = Latents(torch.tensor(ACTS[rows], dtype=torch.float32), torch.tensor(IDS[rows]))
        tap.add(SaeOutput(x, x_hat, code, None, None))
    return tap


def test_explained_variance_is_about_the_mean() -> None:
    got = fed_tap().means()
    err = ((X - X_HAT) ** 2).sum()
    assert got["explained_variance"] == pytest.approx(1 - err / ((X - X.mean(0)) ** 2).sum(), rel=1e-5)
    assert got["explained_variance_about_zero"] == pytest.approx(1 - err / (X**2).sum(), rel=1e-5)
    assert got["mse"] == pytest.approx(((X - X_HAT) ** 2).mean(), rel=1e-5)


def test_cosine_shrinkage_and_sparsity_against_numpy() -> None:
    got = fed_tap().means()
    n_in, n_out = np.linalg.norm(X, axis=1), np.linalg.norm(X_HAT, axis=1)
    dots = (X * X_HAT).sum(1)
    assert got["cossim"] == pytest.approx(np.mean(dots / (n_in * n_out)), rel=1e-5)
    assert got["l2_norm_in"] == pytest.approx(n_in.mean(), rel=1e-5)
    assert got["l2_ratio"] == pytest.approx(np.mean(n_out / n_in), rel=1e-5)
    assert got["relative_reconstruction_bias"] == pytest.approx(np.mean(n_out**2) / np.mean(dots), rel=1e-5)
    assert got["l0"] == pytest.approx((ACTS != 0).sum(1).mean())
    assert got["l1"] == pytest.approx(np.abs(ACTS).sum(1).mean())
    legacy = np.concatenate([1 - ((x - h) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1) for x, h in
                             ((X[:5], X_HAT[:5]), (X[5:], X_HAT[5:]))])  # fmt: skip
    assert got["explained_variance_legacy"] == pytest.approx(legacy.mean(), rel=1e-5)


def test_feature_density_and_consistency_by_hand() -> None:
    density, consistent = fed_tap().density()
    # latent 0 fires on rows 0-3 (seq 0); 1 on rows 0-5 (seqs 0, 1); 2 only as padding; 3 on rows 4-11 (seqs 1, 2)
    assert density.tolist() == pytest.approx([4 / 12, 6 / 12, 0.0, 8 / 12])
    assert consistent[[0, 1, 3]].tolist() == pytest.approx([4 / 1, 6 / 2, 8 / 2])
    assert torch.isnan(consistent[2])


def test_max_cosine_against_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "CHUNK", 3)  # several chunks, one of them partial
    rows = RNG.normal(size=(8, 4))
    rows[5] = 2.5 * rows[2] + 0.01  # a near duplicate pair
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    best, which = max_cosine(torch.tensor(rows))
    assert best.numpy() == pytest.approx(sims.max(1), abs=1e-6)
    assert which.tolist() == sims.argmax(1).tolist()


def test_geometry_shares_and_alignment() -> None:
    g = Geometry(*(torch.tensor(v) for v in ([0.95, 0.2, 0.97, 0.1], [2, 0, 0, 1], [0.3] * 4, [1.0, 0.0, 0.5, 0.5],
                                             [1.0] * 4, [0.0] * 4)))  # fmt: skip
    metrics = geometry.geometry_result(g).metrics
    assert metrics["duplicates"]["frac_near_duplicate"] == 0.5
    assert metrics["encoder_decoder"]["encoder_decoder_cosine_sim_mean"] == pytest.approx(0.5)
    assert metrics["decoder"]["max_decoder_cosine_sim_p50"] == pytest.approx(np.quantile([0.95, 0.2, 0.97, 0.1], 0.5))


# sae-bench 0.6.0, evals/base_eval_output.py (BaseEvalOutput) and evals/core/eval_output.py, written out by hand
TOP = {
    "eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics", "eval_result_details",
    "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
    "eval_result_unstructured",
}  # fmt: skip
CORE = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {
        "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {
        "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
        "frac_alive"},
}  # fmt: skip
CORE_DETAIL = {
    "index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
    "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim",
}  # fmt: skip
RUN_CFG = {
    "sae": {"arch": "topk", "d_in": 5, "n_latents": 4, "k": 3, "layers": [2]},
    "cache": {"model": {"name": "tiny"}, "normalization": {"method": "standardize"}, "ctx_len": 4},
}


def test_written_core_file_has_saebench_structure(tmp_path: pytest.TempPathFactory) -> None:
    g = Geometry(*(torch.full((4,), 0.5, dtype=torch.float64) for _ in range(6)))
    spliced = {"kl_per_token": 0.1, "kl_zero_per_token": 2.0, "ce_clean": 2.0, "ce_spliced": 2.1, "ce_zero": 6.0}
    result = core_result(fed_tap(), g, {**spliced, "ce_recovered": 0.975, "tokens_spliced": 12}, {"model_name": "t"})
    path = write_result(result, "run-a", RUN_CFG, Folder.at(str(tmp_path)).child("run-a"))
    assert path.endswith("run-a/saebench/core/sae-pipe_run-a_eval_results.json")
    doc = json.loads(open(path).read())
    assert set(doc) == TOP and doc["eval_type_id"] == "core"
    assert {k: set(v) for k, v in doc["eval_result_metrics"].items()} == CORE
    assert [set(d) for d in doc["eval_result_details"]] == [CORE_DETAIL] * 4
    assert doc["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.95)
    assert doc["eval_result_details"][2]["consistent_activation_heuristic"] == -1  # NaN, as sae-bench writes it
    assert isinstance(doc["datetime_epoch_millis"], int) and doc["sae_cfg_dict"]["d_sae"] == 4


def test_missing_spliced_metrics_are_written_as_minus_one(tmp_path: pytest.TempPathFactory) -> None:
    result = EvalResult("core", {}, {"c": {"x": float("nan")}}, [], {})
    doc = json.loads(open(write_result(result, "r", RUN_CFG, Folder.at(str(tmp_path)))).read())
    assert doc["eval_result_metrics"] == {"c": {"x": -1}}


def test_evaluate_writes_each_suite_from_the_held_out_pass(tiny_llama: Path, tmp_path: Path) -> None:
    from pipeline.evaluate import stage as evaluate
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.extract import stage as extract
    from pipeline.fit import stage as fit
    from pipeline.fit.config import FitConfig
    from tests.support.caches import tiny_extract_config

    cache = extract.run(tiny_extract_config(tiny_llama, tmp_path, layers="1", max_tokens=400, heldout=0.25)).folder.url
    fitted = FitConfig(cache=cache, layer=1, latents=32, k=4, batch_size=128, max_tokens=128, out=str(tmp_path / "s"))
    run = fit.run(dataclasses.replace(fitted, device="cpu", precision="float32")).runs[0]
    cfg = EvaluateConfig(
        runs=[run.url], device="cpu", cache_root=str(tmp_path), suite=["core", "geometry"], max_tokens=64
    )
    (m,) = evaluate.run(cfg).metrics
    folder = tmp_path / "evaluate" / run.name / "saebench"
    core = json.loads((folder / "core" / f"sae-pipe_{run.name}_eval_results.json").read_text())
    geo = json.loads((folder / "sae_pipe_geometry" / f"sae-pipe_{run.name}_eval_results.json").read_text())
    metrics = core["eval_result_metrics"]
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - m["fvu"], rel=1e-5)
    assert metrics["sparsity"]["l0"] == pytest.approx(m["l0"])
    assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == m["tokens_reconstructed"]
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(m["kl_per_token"], rel=1e-4)
    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(m["ce_recovered"], rel=1e-4)
    assert len(geo["eval_result_details"]) == 32 and geo["eval_type_id"] == "sae_pipe_geometry"
