"""`sae-pipe import`: every SAELens / sparsify convention against an independent dense computation,
round trips through export, the hub code path, and an imported run in evaluate / steer / interpret."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from pipeline.interop.export import export_run
from pipeline.interop.foreign import whole
from pipeline.interop.importing import import_checkpoint, same_model
from pipeline.interpret import stage as interpret
from pipeline.interpret.config import InterpretConfig
from pipeline.sae.folder import load_sae
from pipeline.steer import stage as steer
from pipeline.steer.config import SteerConfig
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
    (  # SAELens saves its BatchTopK trainer as jumprelu, naming the trainer in metadata (save_inference_model)
        "batchtopk-saved-as-jumprelu",
        "jumprelu",
        {  # SAETrainer.fit also records the last batch's L0 and dead count
            "meta": {
                "training_architecture": "batchtopk",
                "training_architecture_details": {"k": 8.0},
                "l0": 7.9,
                "num_dead_features": 3,
            }
        },
        False,
        "blocks.1.hook_resid_pre",
        1,
    ),
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
    cache = extract.run(ExtractConfig(**base, layers="1")).folder
    raw = extract.run(ExtractConfig(**base, layers="1", normalize="none")).folder
    run = fit.run(FitConfig(cache=cache.url, latents=N, k=4, batch_size=256, out=str(tmp / "saes"), device="cpu")).runs[
        0
    ]
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
        evaluate.run(EvaluateConfig(**common))
    (m,) = evaluate.run(EvaluateConfig(**common, cache=tiny_run["raw"])).metrics
    # nmse from the raw cached rows, computed with the reference (normalization none: raw = normalized)
    x = torch.from_numpy(np.concatenate([r[:, 0] for _, r in ActivationCache.open(tiny_run["raw"]).heldout_rows([1])]))
    _, x_hat = reference("jumprelu", their_tensors("jumprelu"), x.float(), {})
    expected = float((((x - x_hat) ** 2).sum(1) / (x.float() ** 2).sum(1)).mean())
    assert m["nmse"] == pytest.approx(expected, rel=1e-4)
    assert m["kl_per_token"] > 0 and m["ce_spliced"] > 0 and m["cache_key"] == ActivationCache.open(tiny_run["raw"]).key
    write_saelens(tmp_path / "ln", "standard", str(tiny_llama), normalize_activations="layer_norm")
    layer_norm_run = import_checkpoint(str(tmp_path / "ln"), cache_root=str(tmp_path / "c")).url
    (m_ln,) = evaluate.run(
        EvaluateConfig(**{**common, "runs": [layer_norm_run]}, cache=tiny_run["raw"], metrics=["nmse"])
    ).metrics
    mu = x.float().mean(1, keepdim=True)
    x_n = (x.float() - mu) / (
        (x.float() - mu).std(1, keepdim=True) + 1e-5
    )  # raw rows as SAELens's layer_norm sees them
    _, x_hat_n = reference("standard", their_tensors("standard"), x_n, {})
    assert m_ln["nmse"] == pytest.approx(float((((x_n - x_hat_n) ** 2).sum(1) / (x_n**2).sum(1)).mean()), rel=1e-4)
    other = EvaluateConfig(**common, cache=tiny_run["cache"], metrics=["kl", "ce"])  # other normalization: tokens only
    (m,) = evaluate.run(other).metrics
    assert "nmse" not in m and m["kl_per_token"] > 0
    with pytest.raises(UserError, match="cannot read"):
        evaluate.run(EvaluateConfig(**common, cache=tiny_run["cache"], metrics=["nmse"]))
    steered = steer.run(
        SteerConfig(run=run, features=["3=scale:1"], prompts=["The cat"], max_new_tokens=3, device="cpu")
    )
    (record,) = steered.records
    assert record["edited"] == record["unedited"]  # scale 1 in delta mode is the clean model, exactly
    tables = {"run": run, "cache": tiny_run["raw"], "explainer": "none", "device": "cpu", "max_tokens": 0}
    summary = interpret.run(InterpretConfig(**tables, out=str(tmp_path / "interpret"))).summaries[0]
    assert summary["latents"] == N and summary["active_latents"] > 0


def _runs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "saes").iterdir() if not p.name.startswith("."))


def test_another_conversion_of_the_same_weights_is_another_run(tmp_path: Path, tiny_llama: Path) -> None:
    cache = tmp_path / "cache"
    write_saelens(tmp_path / "sl", "topk", str(tiny_llama), k=8)
    first = import_checkpoint(str(tmp_path / "sl"), cache_root=str(cache)).url
    assert import_checkpoint(str(tmp_path / "sl"), cache_root=str(cache)).url == first  # same conversion: found
    write_saelens(tmp_path / "copy", "topk", str(tiny_llama), k=8)  # the same checkpoint elsewhere: the same run
    assert import_checkpoint(str(tmp_path / "copy"), cache_root=str(cache)).url == first
    variants = {  # folder -> (config options, scaling factor): the same tensors every time
        "k6": ({"k": 6}, None),
        "ln": ({"k": 8, "normalize_activations": "layer_norm"}, None),
        "avg37": ({"k": 8, "normalize_activations": "expected_average_only_in"}, 0.37),
        "avg50": ({"k": 8, "normalize_activations": "expected_average_only_in"}, 0.5),
    }
    runs = {}
    for name, (options, factor) in variants.items():
        write_saelens(tmp_path / name, "topk", str(tiny_llama), **options)
        if factor is not None:
            (tmp_path / name / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
        runs[name] = import_checkpoint(str(tmp_path / name), cache_root=str(cache)).url
    assert len({first, *runs.values()}) == 5 and len(_runs(cache)) == 5
    assert load_sae(runs["k6"])[1]["sae"]["k"] == 6
    assert load_sae(runs["ln"])[1]["cache"]["normalization"]["method"] == "layer_norm"
    assert load_sae(runs["avg50"])[1]["cache"]["normalization"]["scales"] == {"1": 0.5}


def test_fields_that_do_not_change_the_sae_give_the_same_run(tmp_path: Path, tiny_llama: Path) -> None:
    cache = str(tmp_path / "cache")
    write_saelens(tmp_path / "plain", "topk", str(tiny_llama))
    plain = import_checkpoint(str(tmp_path / "plain"), cache_root=cache).url
    irrelevant = {  # one field of each table that cannot change what the SAE computes
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "neuronpedia_id": "x/1-res",
        "model_from_pretrained_kwargs": {"center_writing_weights": False, "fold_ln": True, "dtype": "bfloat16"},
    }
    write_saelens(tmp_path / "rich", "topk", str(tiny_llama), meta=irrelevant, lr=3e-4, device="cuda", seed=42)
    assert import_checkpoint(str(tmp_path / "rich"), cache_root=cache).url == plain


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_a_hookpoint_that_is_not_there_is_refused_naming_those_that_are(
    tmp_path: Path, tiny_llama: Path, fmt: str
) -> None:
    if fmt == "saelens":
        there, wanted = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"
        write_saelens(tmp_path / "release" / there, "topk", str(tiny_llama), there)
    else:
        there, wanted = "layers.0", "layers.2"
        write_sparsify(tmp_path / "release", there, str(tiny_llama))
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match=rf"has no SAE at --hookpoint '{wanted}'; it holds {there}\. Choose"):
        import_checkpoint(str(tmp_path / "release"), hookpoint=wanted, cache_root=cache)
    with pytest.raises(UserError, match=rf"has no SAE at --hookpoint '{wanted}'; it holds one, at {there}\."):
        import_checkpoint(str(tmp_path / "release" / there), hookpoint=wanted, cache_root=cache)
    assert not (tmp_path / "cache" / "saes").exists()
    run = import_checkpoint(str(tmp_path / "release"), hookpoint=there, cache_root=cache)
    assert load_sae(run.url)[1]["sae"]["layers"] == [1]


def test_a_renamed_sparsify_folder_takes_its_hookpoint_from_the_option(tmp_path: Path, tiny_llama: Path) -> None:
    folder = write_sparsify(tmp_path / "run", "layers.0", str(tiny_llama))
    folder.rename(tmp_path / "run" / "my_sae")
    run = import_checkpoint(str(tmp_path / "run" / "my_sae"), hookpoint="layers.2", cache_root=str(tmp_path / "c"))
    assert load_sae(run.url)[1]["sae"]["layers"] == [3]


@pytest.mark.parametrize("value", ["wide", 8.5, True, 0, -3, float("nan"), float("inf"), None])
def test_sizes_and_k_are_whole_positive_numbers_never_rounded(value: Any) -> None:
    with pytest.raises(UserError, match="not a whole number|must be at least 1|lacks k"):
        whole({"k": value}, "k", Path("cfg.json"))
    assert whole({"k": 8.0}, "k", Path("cfg.json")) == 8 and whole({}, "k", Path("cfg.json"), default=32) == 32


def test_centred_writing_weights_give_the_stream_minus_its_mean(tiny_gpt2: Path) -> None:
    """What TransformerLens's center_writing_weights does to a LayerNorm model, done by hand on the HF model:
    every block input becomes the uncentred one minus its per-token mean (the premise of the mapping)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, bias in model.named_parameters():  # GPT-2 starts with zero biases: give them a mean to remove
            if name.endswith(".bias"):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
        centred = copy.deepcopy(model)
        body = centred.transformer
        writes = [body.wte.weight, body.wpe.weight]
        for block in body.h:  # GPT-2's Conv1D keeps (in, out): the residual-stream dimension is the last
            writes += [block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight]
            writes += [block.mlp.c_proj.bias]
        for w in writes:
            w -= w.mean(-1, keepdim=True)
        tokens = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        raw = model(tokens, output_hidden_states=True).hidden_states
        cen = centred(tokens, output_hidden_states=True).hidden_states
    for layer in range(model.config.n_layer):  # the last entry has ln_f applied: not a block input
        assert float(raw[layer].mean(-1).abs().max()) > 1e-4  # the mean is there to remove
        torch.testing.assert_close(cen[layer], raw[layer] - raw[layer].mean(-1, keepdim=True), atol=2e-5, rtol=1e-4)


CENTRED = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}


@pytest.mark.parametrize("norm", ["none", "expected_average_only_in", "layer_norm"])
def test_saelens_centred_stream_on_a_layer_norm_model_matches_the_reference(
    tmp_path: Path, tiny_gpt2: Path, norm: str
) -> None:
    tensors = their_tensors("topk", d=48)
    cfg = write_saelens(tmp_path / "sl", "topk", str(tiny_gpt2), tensors=tensors, meta=CENTRED)
    cfg.update(normalize_activations=norm, _center=True)
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "_center"}))
    if norm == "expected_average_only_in":
        (tmp_path / "sl" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
        cfg["_scale"] = 0.37
    run = import_checkpoint(str(tmp_path / "sl"), cache_root=str(tmp_path / "cache")).url
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(5)) + torch.randn(64, 1) * 3  # large means
    code, x_hat, run_cfg = ours(run, x)
    expected_code, expected = reference("topk", tensors, x, cfg)
    torch.testing.assert_close(code, expected_code, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    assert run_cfg["cache"]["normalization"].get("center", False) == (norm != "layer_norm")  # layer_norm centres


def test_centred_writing_weights_change_nothing_on_an_rms_norm_model(tmp_path: Path, tiny_llama: Path) -> None:
    tensors = their_tensors("topk")
    write_saelens(tmp_path / "sl", "topk", str(tiny_llama), tensors=tensors, meta=CENTRED)
    run = import_checkpoint(str(tmp_path / "sl"), cache_root=str(tmp_path / "cache")).url
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6)) + 2
    code, _, cfg = ours(run, x)
    torch.testing.assert_close(code, reference("topk", tensors, x, {})[0], atol=2e-5, rtol=1e-5)
    assert "center" not in cfg["cache"]["normalization"]
    assert any("does not centre LlamaForCausalLM" in note for note in cfg["imported"]["conventions"])


def test_a_centred_run_reads_a_raw_cache_and_the_registry_states_centring(
    tmp_path: Path, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = their_tensors("topk", d=48)
    hub_copy = tmp_path / "snapshot" / "blocks.1.hook_resid_pre"  # a pre-6 config that does not say it
    write_saelens(hub_copy, "topk", str(tiny_gpt2), legacy=True, tensors=tensors)
    with pytest.raises(UserError, match="does not say whether its GPT2LMHeadModel was loaded with centred"):
        import_checkpoint(str(hub_copy), cache_root=str(tmp_path / "c"))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, allow_patterns=None: str(hub_copy.parent))
    repo = "jbloom/GPT2-Small-SAEs-Reformatted"
    run = import_checkpoint(repo, hookpoint="blocks.1.hook_resid_pre", cache_root=str(tmp_path / "c")).url
    base = {"model": str(tiny_gpt2), "ctx_len": 32, "max_tokens": 1200, "cache_root": str(tmp_path), "device": "cpu"}
    raw = extract.run(ExtractConfig(**base, layers="1", normalize="none")).folder.url
    (m,) = evaluate.run(
        EvaluateConfig(runs=[run], cache=raw, metrics=["nmse"], device="cpu", out=str(tmp_path / "e"))
    ).metrics
    x = torch.from_numpy(np.concatenate([r[:, 0] for _, r in ActivationCache.open(raw).heldout_rows([1])])).float()
    _, x_hat = reference("topk", tensors, x, {"_center": True})
    x_c = x - x.mean(1, keepdim=True)  # nmse is measured in the space the SAE reads: the centred stream
    x_hat_c = x_hat - x.mean(1, keepdim=True)
    assert m["nmse"] == pytest.approx(float((((x_c - x_hat_c) ** 2).sum(1) / (x_c**2).sum(1)).mean()), rel=1e-4)
