"""`sae-pipe import`: every SAELens / sparsify convention against an independent dense computation,
round trips through export, the hub code path, and an imported run in evaluate / steer / interpret."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import evaluate
from pipeline.extract.config import ExtractConfig
from pipeline.extract.stage import extract
from pipeline.fit.config import FitConfig
from pipeline.fit.stage import fit
from pipeline.infra.errors import UserError
from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.stage import interpret
from pipeline.sae.export import export_run
from pipeline.sae.folder import load_sae
from pipeline.sae.importing import import_checkpoint, same_model
from pipeline.steer.config import SteerConfig
from pipeline.steer.stage import steer
from tests.support.foreign import D, N, reference, their_tensors, write_saelens, write_sparsify

SAELENS_CASES = [  # (id, architecture, config options, legacy flat config, hook, our layer)
    ("standard", "standard", {}, False, "blocks.1.hook_resid_pre", 1),
    ("topk", "topk", {}, False, "blocks.1.hook_resid_pre", 1),
    ("jumprelu", "jumprelu", {}, False, "blocks.2.hook_resid_pre", 2),
    ("gated", "gated", {}, False, "blocks.1.hook_resid_pre", 1),
    ("resid-post", "topk", {}, False, "blocks.0.hook_resid_post", 1),
    ("topk-no-b_dec-in", "topk", {"apply_b_dec_to_input": False}, False, "blocks.1.hook_resid_pre", 1),
    ("jumprelu-no-b_dec-in", "jumprelu", {"apply_b_dec_to_input": False}, False, "blocks.1.hook_resid_pre", 1),
    ("gated-no-b_dec-in", "gated", {"apply_b_dec_to_input": False}, False, "blocks.1.hook_resid_pre", 1),
    ("topk-rescale", "topk", {"rescale_acts_by_decoder_norm": True}, False, "blocks.1.hook_resid_pre", 1),
    ("layer_norm", "standard", {"normalize_activations": "layer_norm"}, False, "blocks.1.hook_resid_pre", 1),
    (
        "expected-average",
        "topk",
        {"normalize_activations": "expected_average_only_in"},
        False,
        "blocks.1.hook_resid_pre",
        1,
    ),
    ("legacy-topk", "topk", {}, True, "blocks.3.hook_resid_pre", 3),
    ("legacy-standard", "standard", {}, True, "blocks.1.hook_resid_pre", 1),
    ("legacy-jumprelu-log-threshold", "jumprelu", {}, True, "blocks.1.hook_resid_pre", 1),
]


def ours(run: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(dense code, reconstruction in the model's space, cfg.json) of an imported run on raw x."""
    sae, cfg = load_sae(run)
    normalizer = Normalizer.from_dict(cfg["cache"]["normalization"])
    x_n, stats = normalizer.normalize(x, cfg["sae"]["layers"][0])
    with torch.no_grad():
        out = sae(x_n)
    code = torch.zeros(len(x), cfg["sae"]["n_latents"]).scatter(-1, out.latents.indices, out.latents.acts)
    return code, normalizer.denormalize(out.x_hat, stats), cfg


@pytest.mark.parametrize(
    ("arch", "options", "legacy", "hook", "layer"), [c[1:] for c in SAELENS_CASES], ids=[c[0] for c in SAELENS_CASES]
)
def test_saelens_conventions_match_a_dense_reference(
    tmp_path: Path, tiny_llama: Path, arch: str, options: dict[str, Any], legacy: bool, hook: str, layer: int
) -> None:
    tensors = their_tensors(arch)
    if legacy and arch == "jumprelu":  # an older file: the threshold stored as its log
        written = {**tensors, "log_threshold": tensors["threshold"].log()}
        del written["threshold"]
    else:
        written = tensors
    cfg = write_saelens(tmp_path / "sl", arch, str(tiny_llama), hook, legacy, written, **options)
    if options.get("normalize_activations") == "expected_average_only_in":
        (tmp_path / "sl" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
        cfg["_scale"] = 0.37
    run = import_checkpoint(str(tmp_path / "sl"), cache_root=str(tmp_path / "cache")).url
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3)) * 4 + 1  # raw residual-stream rows
    if options.get("normalize_activations") == "layer_norm":
        x = x * 1e-3  # rows with a small spread: where eps sits (std or std + eps) shows
    code, x_hat, run_cfg = ours(run, x)
    expected_code, expected = reference(arch, tensors, x, cfg)
    torch.testing.assert_close(code, expected_code, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    assert (code > 0).sum(1).float().mean() > 1  # the comparison saw active latents
    assert run_cfg["sae"]["layers"] == [layer]
    assert json.loads((Path(run) / "source_cfg.json").read_text()) == {k: v for k, v in cfg.items() if k != "_scale"}


@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize(("hookpoint", "layer"), [("layers.2", 3), ("embed_tokens", 0)])
def test_sparsify_conventions_match_a_dense_reference(
    tmp_path: Path, tiny_llama: Path, multi_topk: bool, hookpoint: str, layer: int
) -> None:
    folder = write_sparsify(tmp_path / "run", hookpoint, str(tiny_llama), multi_topk=multi_topk)
    run = import_checkpoint(str(tmp_path / "run"), cache_root=str(tmp_path / "cache")).url  # one hookpoint: found
    t = load_file(str(folder / "sae.safetensors"))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4)) * 2
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify: ReLU, then top-k
    values, idx = pre.topk(8, dim=-1)
    expected_code = torch.zeros_like(pre).scatter(-1, idx, values)
    code, x_hat, cfg = ours(run, x)
    torch.testing.assert_close(code, expected_code, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, expected_code @ t["W_dec"] + t["b_dec"], atol=1e-4, rtol=1e-5)
    assert cfg["sae"]["layers"] == [layer] and cfg["sae"]["k"] == 8
    assert cfg["cache"]["model"]["name"] == str(tiny_llama)  # from the run-level config.json


LOSSLESS = [
    ("standard", {}),
    ("topk", {}),
    ("jumprelu", {}),
    ("gated", {}),
    ("topk", {"normalize_activations": "layer_norm"}),
]


@pytest.mark.parametrize(("arch", "options"), LOSSLESS, ids=["standard", "topk", "jumprelu", "gated", "layer_norm"])
def test_import_then_export_gives_the_same_tensor_bytes(
    tmp_path: Path, tiny_llama: Path, arch: str, options: dict[str, Any]
) -> None:
    write_saelens(tmp_path / "sl", arch, str(tiny_llama), **options)
    run = import_checkpoint(str(tmp_path / "sl"), cache_root=str(tmp_path / "cache")).url
    back = export_run(run, "saelens", str(tmp_path / "back"))
    before = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    after = load_file(str(Path(back.url) / "sae_weights.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape, name
        assert before[name].numpy().tobytes() == after[name].numpy().tobytes(), name
    cfg = json.loads((Path(back.url) / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == options.get("normalize_activations", "none")


def test_sparsify_import_then_export_gives_the_same_tensor_bytes(tmp_path: Path, tiny_llama: Path) -> None:
    folder = write_sparsify(tmp_path / "run", "layers.1", str(tiny_llama))
    run = import_checkpoint(str(tmp_path / "run"), cache_root=str(tmp_path / "cache")).url
    back = export_run(run, "sparsify", str(tmp_path / "back"))
    assert Path(back.url).name == "layers.1"
    before, after = load_file(str(folder / "sae.safetensors")), load_file(str(Path(back.url) / "sae.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(before[n].numpy().tobytes() == after[n].numpy().tobytes() for n in before)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A standardized cache of the tiny Llama (layer 1), a raw one, and a TopK run trained on the first."""
    tmp = tmp_path_factory.mktemp("imp")
    base = {"model": str(tiny_llama), "ctx_len": 32, "max_tokens": 1200, "cache_root": str(tmp), "device": "cpu"}
    cache = extract(ExtractConfig(**base, layers="1"))
    raw = extract(ExtractConfig(**base, layers="1", normalize="none"))
    run = fit(FitConfig(cache=cache.url, latents=N, k=4, batch_size=256, out=str(tmp / "saes"), device="cpu"))[0]
    return {"cache": cache.url, "raw": raw.url, "run": run.url, "tmp": str(tmp)}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_our_run_exported_and_imported_encodes_identically(
    tiny_run: dict[str, str], tiny_llama: Path, tmp_path: Path, fmt: str
) -> None:
    folder = export_run(tiny_run["run"], fmt, str(tmp_path / "export"))
    back = import_checkpoint(folder.url, model=str(tiny_llama), cache_root=str(tmp_path / "cache")).url
    (original, cfg), (imported, back_cfg) = load_sae(tiny_run["run"]), load_sae(back)
    x = torch.from_numpy(
        np.concatenate([r[:, 0] for _, r in ActivationCache.open(tiny_run["cache"]).heldout_rows([1])])
    )
    with torch.no_grad():
        a, b = original.encode(x.float()), imported.encode(x.float())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.acts, b.acts)
    assert back_cfg["cache"]["normalization"] == cfg["cache"]["normalization"]  # standardize, eps 1e-6, exactly
    assert back_cfg["sae"]["layers"] == cfg["sae"]["layers"]


def test_hub_repo_id_downloads_only_the_chosen_hookpoint(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_copy = tmp_path / "snapshot"  # laid out like a SAELens release repo: one folder per hook
    write_saelens(hub_copy / "blocks.1.hook_resid_pre", "topk", str(tiny_llama))
    write_saelens(hub_copy / "blocks.2.hook_resid_pre", "standard", str(tiny_llama), "blocks.2.hook_resid_pre")
    calls: list[tuple[str, Any]] = []

    def fake_download(repo_id: str, allow_patterns: Any = None) -> str:
        calls.append((repo_id, allow_patterns))
        return str(hub_copy)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    run = import_checkpoint("someone/saes", hookpoint="blocks.2.hook_resid_pre", cache_root=str(tmp_path / "c"))
    assert calls == [("someone/saes", ["blocks.2.hook_resid_pre/*", "*.json"])]
    _, cfg = load_sae(run.url)
    assert cfg["sae"]["arch"] == "relu" and cfg["sae"]["layers"] == [2]
    with pytest.raises(UserError, match="choose one with --hookpoint"):
        import_checkpoint("someone/saes", cache_root=str(tmp_path / "c"))


def test_model_names_compare_across_aliases_and_mismatch_needs_force(tmp_path: Path, tiny_llama: Path) -> None:
    assert same_model("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")
    assert not same_model("gpt2", "smollm2-135m")
    write_saelens(tmp_path / "sl", "topk", "gpt2")
    with pytest.raises(UserError, match="was trained on 'gpt2'"):
        import_checkpoint(str(tmp_path / "sl"), model=str(tiny_llama), cache_root=str(tmp_path / "c"))
    run = import_checkpoint(str(tmp_path / "sl"), model=str(tiny_llama), force=True, cache_root=str(tmp_path / "c"))
    _, cfg = load_sae(run.url)
    assert cfg["imported"]["forced"] and cfg["imported"]["checkpoint_model"] == "gpt2"


def test_imported_run_in_evaluate_steer_and_interpret(
    tiny_run: dict[str, str], tiny_llama: Path, tmp_path: Path
) -> None:
    write_saelens(tmp_path / "sl", "jumprelu", str(tiny_llama))
    run = import_checkpoint(str(tmp_path / "sl"), cache_root=str(tmp_path / "c")).url
    common = {"runs": [run], "device": "cpu", "out": str(tmp_path / "eval"), "max_tokens": 0}
    with pytest.raises(UserError, match="has no activation cache of its own"):
        evaluate(EvaluateConfig(**common))
    (m,) = evaluate(EvaluateConfig(**common, cache=tiny_run["raw"]))
    # nmse from the raw cached rows, computed with the reference (normalization none: raw = normalized)
    x = torch.from_numpy(np.concatenate([r[:, 0] for _, r in ActivationCache.open(tiny_run["raw"]).heldout_rows([1])]))
    _, x_hat = reference("jumprelu", their_tensors("jumprelu"), x.float(), {})
    expected = float((((x - x_hat) ** 2).sum(1) / (x.float() ** 2).sum(1)).mean())
    assert m["nmse"] == pytest.approx(expected, rel=1e-4)
    assert m["kl_per_token"] > 0 and m["ce_spliced"] > 0 and m["cache_key"] == ActivationCache.open(tiny_run["raw"]).key
    write_saelens(tmp_path / "ln", "standard", str(tiny_llama), normalize_activations="layer_norm")
    layer_norm_run = import_checkpoint(str(tmp_path / "ln"), cache_root=str(tmp_path / "c")).url
    (m_ln,) = evaluate(EvaluateConfig(**{**common, "runs": [layer_norm_run]}, cache=tiny_run["raw"], metrics=["nmse"]))
    mu = x.float().mean(1, keepdim=True)
    x_n = (x.float() - mu) / (
        (x.float() - mu).std(1, keepdim=True) + 1e-5
    )  # raw rows as SAELens's layer_norm sees them
    _, x_hat_n = reference("standard", their_tensors("standard"), x_n, {})
    assert m_ln["nmse"] == pytest.approx(float((((x_n - x_hat_n) ** 2).sum(1) / (x_n**2).sum(1)).mean()), rel=1e-4)
    other = EvaluateConfig(**common, cache=tiny_run["cache"], metrics=["kl", "ce"])  # other normalization: tokens only
    (m,) = evaluate(other)
    assert "nmse" not in m and m["kl_per_token"] > 0
    with pytest.raises(UserError, match="cannot read"):
        evaluate(EvaluateConfig(**common, cache=tiny_run["cache"], metrics=["nmse"]))
    (record,) = steer(SteerConfig(run=run, features=["3=scale:1"], prompts=["The cat"], max_new_tokens=3, device="cpu"))
    assert record["edited"] == record["unedited"]  # scale 1 in delta mode is the clean model, exactly
    tables = {"run": run, "cache": tiny_run["raw"], "explainer": "none", "device": "cpu", "max_tokens": 0}
    summary = interpret(InterpretConfig(**tables, out=str(tmp_path / "interpret")))
    assert summary["latents"] == N and summary["active_latents"] > 0
