"""Evaluate on a tiny random Llama: identity and zero SAEs, an independent KL, hooks, RouteSAE splicing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.edit import EditSpec, Mode, Site
from pipeline.live.routing import Routing
from pipeline.live.runs import finished_runs
from pipeline.live.splice import site_edits
from pipeline.llm.hooks import replace_input
from pipeline.llm.model import find_blocks
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.folder import save_weights
from pipeline.sae.interface import SaeConfig
from tests.support.caches import tiny_extract_config


def make_cache(model_dir: Path, root: Path, normalize: str) -> str:
    cfg = tiny_extract_config(
        model_dir, root, layers="1,2", max_tokens=2400, batch_size=8, heldout=0.25, normalize=normalize, shard_mb=0.1
    )
    return extract.run(cfg).folder.url


@pytest.fixture(scope="module")
def caches(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval-cache")
    return {"standardize": make_cache(tiny_llama, root, "standardize"), "none": make_cache(tiny_llama, root, "none")}


def train(cache: str, root: Path, **kw: object) -> Folder:
    base = {
        "cache": cache,
        "layer": 1,
        "latents": 128,
        "k": 64,
        "batch_size": 256,
        "max_tokens": 1024,
        "out": str(root),
        "device": "cpu",
        "precision": "float32",
    }
    return fit.run(FitConfig(**{**base, **kw})).runs[0]  # type: ignore[arg-type]


def set_weights(run: Folder, w_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
    sae = TopKSAE(SaeConfig("topk", w_enc.shape[1], w_enc.shape[0], 64, [1]))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
    save_weights(run, sae)


def identity(d: int) -> torch.Tensor:
    """[I; -I]: with ReLU and k = d, x = relu(x) - relu(-x) is reconstructed exactly."""
    eye = torch.eye(d)
    return torch.cat([eye, -eye])


def run_eval(runs: list[Folder], root: Path, **kw: object) -> list[dict]:
    cfg = EvaluateConfig(runs=[r.url for r in runs], batch_size=4, device="cpu", cache_root=str(root), **kw)
    return evaluate.run(cfg).metrics  # type: ignore[arg-type]


def test_identity_sae_costs_nothing(caches: dict[str, str], tmp_path: Path) -> None:
    run = train(caches["standardize"], tmp_path / "saes")
    set_weights(run, identity(64), identity(64))
    (m,) = run_eval([run], tmp_path)
    assert m["nmse"] < 1e-10 and m["kl_per_token"] < 1e-5
    assert abs(m["ce_recovered"] - 1) < 1e-3 and abs(m["ce_spliced"] - m["ce_clean"]) < 1e-4
    assert m["ce_zero"] != m["ce_clean"]  # zeroing the stream changes a random model's predictions
    saved = json.loads((tmp_path / "evaluate" / run.name / "metrics.json").read_text())
    assert saved["kl_per_token"] == m["kl_per_token"] and "kl_paper_scale" in saved["definitions"]


def test_zero_reconstruction_equals_zero_ablation(caches: dict[str, str], tmp_path: Path) -> None:
    run = train(caches["none"], tmp_path / "saes")
    set_weights(run, identity(64), torch.zeros(128, 64))
    (m,) = run_eval([run], tmp_path)
    assert abs(m["ce_spliced"] - m["ce_zero"]) < 1e-5 and abs(m["ce_recovered"]) < 1e-4


def test_kl_matches_an_independent_computation(caches: dict[str, str], tiny_llama: Path, tmp_path: Path) -> None:
    run = train(caches["standardize"], tmp_path / "saes", k=8, max_tokens=2048)
    (m,) = run_eval([run], tmp_path)
    cache = ActivationCache.open(caches["standardize"])
    tokens, mask = (torch.from_numpy(a) for a in cache.heldout_sequences())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    from pipeline.sae.folder import load_sae

    sae, _ = load_sae(run.url)

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        h = args[0].clone()
        x = h[mask.bool()]
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + 1e-6
        h[mask.bool()] = sae((x - mean) / std).x_hat * std + mean
        return (h, *args[1:])

    with torch.no_grad():
        clean = model(tokens.long()).logits
        handle = model.model.layers[1].register_forward_pre_hook(hook)
        try:
            spliced = model(tokens.long()).logits
        finally:
            handle.remove()
    kl = F.kl_div(F.log_softmax(spliced, -1), F.log_softmax(clean, -1), log_target=True, reduction="none").sum(-1)
    assert m["kl_per_token"] == pytest.approx(float(kl[mask.bool()].mean()), rel=1e-3, abs=1e-6)
    assert m["kl_paper_scale"] == pytest.approx(float(kl[mask.bool()].sum() / len(tokens)), rel=1e-3)


def test_hooks_are_removed_even_after_an_error(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(1, 500, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    block = find_blocks(model)[2]

    def broken(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), replace_input(block, broken), torch.no_grad():
        model(ids)
    assert not block._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def route_edits(sae: RouteSAE, norm: Normalizer, mask, choice, weight, k, theta, undo_weight: bool = True) -> dict:  # noqa: ANN001
    """evaluate's splice of a routed SAE (pipeline.live), each token at its routed layer."""
    spec = EditSpec(Mode.REPLACE, k=k, theta=theta, undo_weight=undo_weight)
    return site_edits(Site(sae.cfg.layers[0], sae, norm, "route"), mask, spec, Routing(choice, weight))


def test_route_splice_touches_only_the_routed_layer() -> None:
    torch.manual_seed(0)
    sae = RouteSAE(SaeConfig("route", 16, 64, 4, [1, 2, 3]))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    choice = torch.randint(0, 3, (2, 5))
    edits = route_edits(sae, Normalizer("standardize"), mask, choice, torch.rand(2, 5) + 0.5, None, None)
    for i, layer in enumerate([1, 2, 3]):
        h = torch.randn(2, 5, 16)
        changed = (edits[layer](h) != h).any(-1)
        assert torch.equal(changed, mask & (choice == i))


def test_route_run_evaluates(caches: dict[str, str], tmp_path: Path) -> None:
    run = train(caches["standardize"], tmp_path / "saes", arch="route", layer=None, k=8)
    (m,) = run_eval([run], tmp_path)
    assert set(m["routing_shares"]) == {"1", "2"} and abs(sum(m["routing_shares"].values()) - 1) < 1e-6
    assert m["kl_per_token"] > 0 and m["tokens_spliced"] > 0


def test_runs_on_one_cache_load_the_llm_once_and_match_solo(
    caches: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.evaluate.stage as evaluate_module

    runs = [
        train(caches["standardize"], tmp_path / "saes", layer=1, k=8),
        train(caches["standardize"], tmp_path / "saes", layer=2, k=8),
        train(caches["standardize"], tmp_path / "saes", arch="route", layer=None, k=8),
    ]
    solo = [run_eval([run], tmp_path / "solo")[0] for run in runs]
    loads = []
    real = evaluate_module.load_llm
    monkeypatch.setattr(evaluate_module, "load_llm", lambda *a: loads.append(1) or real(*a))
    together = run_eval(runs, tmp_path / "together")
    assert len(loads) == 1
    for alone, shared in zip(solo, together):
        for key in ("nmse", "kl_per_token", "ce_clean", "ce_zero", "ce_spliced"):
            assert shared[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key


def test_all_writes_table_and_plots(caches: dict[str, str], tmp_path: Path) -> None:
    from pipeline.evaluate.compare import write_comparison

    for k in (4, 8, 16):
        train(caches["standardize"], tmp_path / "saes", k=k)
    runs = [Folder.at(r) for r in finished_runs(str(tmp_path / "saes"))]
    assert len(runs) == 3
    results = run_eval(runs, tmp_path, metrics=["nmse", "kl"])
    written = write_comparison(results, Folder.at(tmp_path / "evaluate"))
    for name in ("comparison.csv", "comparison.md", "comparison.html", "l0_vs_nmse.png", "l0_vs_kl.png"):
        assert (tmp_path / "evaluate" / name).stat().st_size > 0
    assert len(written) == 5
    assert (tmp_path / "evaluate" / "comparison.csv").read_text().count("\n") == 4


def test_bad_inputs(caches: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an SAE run folder"):
        run_eval([Folder.at(tmp_path)], tmp_path)
    run = train(caches["standardize"], tmp_path / "saes")
    with pytest.raises(UserError, match="held-out tokens"):
        run_eval([run], tmp_path, max_tokens=10**7)
    cfg = json.loads((Path(run.url) / "cfg.json").read_text())
    cfg["cache"]["normalization"]["method"] = "none"
    (Path(run.url) / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="normalization"):
        run_eval([run], tmp_path)
    (Path(run.url) / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="no sae.safetensors"):
        run_eval([run], tmp_path)


def test_paper_splice_keeps_the_routing_weight() -> None:
    """--splice paper puts x_hat in as it is; scaled divides it by the token's routing weight."""
    torch.manual_seed(1)
    sae = RouteSAE(SaeConfig("route", 16, 64, 4, [1, 2]))
    mask = torch.ones(2, 5, dtype=torch.bool)
    choice = torch.randint(0, 2, (2, 5))
    weight = torch.rand(2, 5) * 0.5 + 0.5
    none = Normalizer("none")
    scaled = route_edits(sae, none, mask, choice, weight, None, None, undo_weight=True)
    paper = route_edits(sae, none, mask, choice, weight, None, None, undo_weight=False)
    h = torch.randn(2, 5, 16)
    for i, layer in enumerate([1, 2]):
        here = choice == i
        torch.testing.assert_close(paper[layer](h)[here], scaled[layer](h)[here] * weight[here][:, None])


def test_soft_routing_is_not_spliced(caches: dict[str, str], tmp_path: Path) -> None:
    run = train(caches["standardize"], tmp_path / "saes", arch="route", layer=None, k=8, routing="soft")
    with pytest.raises(UserError, match="soft routing: its reconstruction mixes layers"):
        run_eval([run], tmp_path)
    (m,) = run_eval([run], tmp_path, metrics=["nmse"])
    assert "kl_per_token" not in m and abs(sum(m["routing_shares"].values()) - 1) < 1e-6


def test_n_runs_cost_one_forward_below_the_layer_and_two_plus_n_above(
    caches: dict[str, str], tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block calls per batch: the blocks below the spliced layer run once (plus the one-batch replay check),
    the blocks above it 2 + N times; the numbers equal those of whole forwards."""
    import pipeline.evaluate.stage as evaluate_module

    runs = [train(caches["standardize"], tmp_path / "saes", k=8, seed=s) for s in (0, 1, 2)]
    whole = run_eval(runs, tmp_path / "whole", max_tokens=512)  # replay check passes on the tiny Llama
    monkeypatch.setattr(evaluate_module, "replays_exactly", lambda *a: False)
    assert [m["kl_per_token"] for m in run_eval(runs, tmp_path / "x", max_tokens=512)] == pytest.approx(
        [m["kl_per_token"] for m in whole], rel=1e-5
    )
    monkeypatch.undo()
    calls = {0: 0, 3: 0}
    real = evaluate_module.load_llm

    def counted(*args: object) -> tuple:
        model, blocks = real(*args)
        for i in calls:
            blocks[i].register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        return model, blocks

    monkeypatch.setattr(evaluate_module, "load_llm", counted)
    run_eval(runs, tmp_path / "counted", max_tokens=512)
    batches = -(-len(ActivationCache.open(caches["standardize"]).heldout_sequences(512)[0]) // 4)
    # the one-batch replay check adds a stem and a whole forward (both blocks) and one resume (block 3)
    assert calls[0] == batches + 2
    assert calls[3] == batches * (2 + len(runs)) + 3


def test_a_model_replay_cannot_rebuild_runs_whole_forwards(tiny_llama: Path) -> None:
    """Logits that are not head(final norm(h)) (here scaled, as a soft-capped model's are) fail the check."""
    from pipeline.live.splice import replays_exactly

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(1, 500, (2, 16))
    assert replays_exactly(model, find_blocks(model), ids, 2)
    model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out.logits * 0.5) or out)
    assert not replays_exactly(model, find_blocks(model), ids, 2)


def test_the_model_runs_in_the_precision_of_the_extraction_unless_told(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.evaluate.stage as evaluate_module

    cfg = tiny_extract_config(tiny_llama, tmp_path, layers="1", max_tokens=600, heldout=0.25, compute_dtype="bfloat16")
    cache = extract.run(cfg).folder.url
    assert ActivationCache.open(cache).manifest["spec"]["compute_dtype"] == "bfloat16"
    run = train(cache, tmp_path / "saes", k=8, max_tokens=256)
    loaded = []
    real = evaluate_module.load_llm

    def spied(*args: object) -> tuple:
        model, blocks = real(*args)
        loaded.append(next(model.parameters()).dtype)
        return model, blocks

    monkeypatch.setattr(evaluate_module, "load_llm", spied)
    assert run_eval([run], tmp_path / "as-cache", metrics=["kl"], max_tokens=64)[0]["kl_per_token"] >= 0
    run_eval([run], tmp_path / "told", metrics=["kl"], max_tokens=64, compute_dtype="float32")
    assert loaded == [torch.bfloat16, torch.float32]


def test_train_dead_counts_a_latent_firing_only_on_the_last_training_row_as_alive(tmp_path: Path) -> None:
    """k - 1 latents fire everywhere (bias +1e4), one only on the last training row of the last shard,
    the rest nowhere: train_dead_share = 1 - k / N. Reading all but that row would give 1 - (k - 1) / N."""
    from pipeline.cache.reader import ActivationCache as Cache
    from pipeline.sae.folder import load_sae
    from tests.support.caches import synthetic_cache

    cache = synthetic_cache(tmp_path, [60, 50], layers=(12,), d=16)
    (run,) = fit.run(
        FitConfig(cache=cache.url, layer=12, latents=32, k=4, max_tokens=64, batch_size=32, out=str(tmp_path))
    ).runs
    sae, _ = load_sae(run)
    last = torch.from_numpy(Cache.open(cache.url).layer_rows(1, "train", 0)[-1])  # (D,)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1e4)
        sae.b_enc[:3] = 1e4  # always in the top k
        sae.W_enc[3] = last / last.norm()
        sae.b_enc[3] = -(last.norm() - 1e-3)  # above zero on rows nearly equal to the last one only
    save_weights(run, sae)
    (result,) = evaluate.run(EvaluateConfig(runs=[run.url], metrics=["train_dead"], out=str(tmp_path / "ev"))).metrics
    assert result["train_dead_share"] == 1 - 4 / 32
    (top3,) = evaluate.run(
        EvaluateConfig(runs=[run.url], metrics=["train_dead"], infer_k=3, out=str(tmp_path / "ev"))
    ).metrics
    assert top3["train_dead_share"] == 1 - 3 / 32  # encoded with --infer-k, as the other metrics are


def test_train_fvu_is_the_fvu_of_every_training_row_written_out(tmp_path: Path) -> None:
    """--metrics train_fvu: sum ||x - x_hat||^2 / sum ||x - mean x||^2 over every training row of both shards
    (not the held-out rows' fvu), with their nmse and L0, from the same pass as train_dead; neither is
    written unless asked for."""
    from pipeline.cache.reader import ActivationCache as Cache
    from pipeline.sae.folder import load_sae
    from tests.support.caches import synthetic_cache

    cache = synthetic_cache(tmp_path, [60, 50], layers=(12,), d=16)
    (run,) = fit.run(
        FitConfig(cache=cache.url, layer=12, latents=32, k=4, max_tokens=64, batch_size=32, out=str(tmp_path))
    ).runs
    sae, _ = load_sae(run)
    x = torch.from_numpy(np.concatenate([r[:, 0] for _, r in Cache.open(cache.url).split_rows("train", [12])]))
    with torch.no_grad():
        out = sae(x)
    x_hat, l0 = out.x_hat, float((out.latents.acts > 0).sum()) / len(x)  # (R, D), a scalar
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    nmse = float((((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean())
    (result,) = evaluate.run(
        EvaluateConfig(runs=[run.url], metrics=["nmse", "train_fvu"], out=str(tmp_path / "ev"))
    ).metrics
    assert len(x) == Cache.open(cache.url).rows("train")
    assert result["train_fvu"] == pytest.approx(fvu, rel=1e-5) and result["train_fvu"] != result["fvu"]
    assert result["train_nmse"] == pytest.approx(nmse, rel=1e-5) and "train_dead_share" not in result
    assert result["train_l0"] == pytest.approx(l0, rel=1e-5)
    (dead,) = evaluate.run(EvaluateConfig(runs=[run.url], metrics=["train_dead"], out=str(tmp_path / "ev2"))).metrics
    assert "train_fvu" not in dead and "train_dead_share" in dead
