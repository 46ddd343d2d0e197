"""Circuits: the masked model is exact at both ends, a planted latent is found, tasks and files are clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cache.normalize import Normalizer
from pipeline.circuit.config import CircuitConfig
from pipeline.circuit.measures import Score, ends, measure
from pipeline.circuit.methods import Lens, MaskHyper, attributions, top_circuits, train_masks
from pipeline.circuit.outputs import Found, chosen
from pipeline.circuit.spliced import Batch, Masking, ablation_values, batches, logit_diff
from pipeline.circuit.stage import run
from pipeline.circuit.tasks import NAMES, VERBS, Pair, encode, generate, read_jsonl, split
from pipeline.cli import app
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.edit import Site
from pipeline.live.subject import load_llm, load_subject
from pipeline.llm.hooks import replacing, run_to_layers
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.llm.replay import resume, stem
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.folder import save_weights
from pipeline.sae.interface import SaeConfig

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
PLANTED = 24  # pairs of the planted task


@pytest.fixture(scope="module")
def runs(layer_runs: list[str]) -> list[str]:
    """TopK runs (128 latents, k 8) on layers 1 and 2 of one cache (conftest.py, shared, read only)."""
    return layer_runs


@pytest.fixture(scope="module")
def lensed(runs: list[str]) -> tuple:
    subjects = [load_subject(run, CPU) for run in runs]
    model, blocks = load_llm(subjects[0].cache, CPU)
    sites = [s.site() for s in subjects]
    generator = torch.Generator().manual_seed(3)
    pairs = []
    for _ in range(6):
        prefix = torch.randint(5, 500, (7,), generator=generator).tolist()
        pairs.append(Pair([*prefix, 40], [*prefix, 90], 61, 77))
    return model, blocks, sites, batches(pairs, 8, {0}, CPU)[0]


def independent_splice(sites: list[Site], means: list[torch.Tensor] | None, real: torch.Tensor) -> dict:
    """Reference hooks written with the SAE's own encode / decode (its sparse kernels): each site's
    reconstruction plus its error, with the code replaced by ``means`` when given."""

    def edit(site: Site, mean: torch.Tensor | None):  # noqa: ANN202
        def hook(h: torch.Tensor) -> torch.Tensor:
            x, stats = site.normalizer.normalize(h[real], site.layer)
            out = site.sae(x)
            code = out.x_hat if mean is None else mean @ site.sae.W_dec + site.sae.b_dec
            new = h.clone()
            new[real] = site.normalizer.denormalize(code + (x - out.x_hat), stats)
            return new

        return hook

    return {s.layer: edit(s, None if means is None else means[i]) for i, s in enumerate(sites)}


def reference_ld(model, blocks, batch: Batch, edits: dict) -> torch.Tensor:  # noqa: ANN001
    with replacing(blocks, edits), torch.no_grad():
        logits = model(input_ids=batch.clean).logits[:, -1]
    return logits[:, 61] - logits[:, 77]


def test_every_latent_kept_is_the_spliced_model_and_the_clean_model(lensed: tuple) -> None:
    model, blocks, sites, batch = lensed
    ones = [torch.ones(s.sae.cfg.n_latents) for s in sites]
    means = ablation_values(model, blocks, sites, [batch], "mean")
    with torch.no_grad():
        kept = logit_diff(model, blocks, sites, "clean", batch, Masking(ones, means))
    torch.testing.assert_close(kept, reference_ld(model, blocks, batch, {}), atol=1e-6, rtol=0)  # clean model
    spliced = reference_ld(model, blocks, batch, independent_splice(sites, None, batch.real))
    torch.testing.assert_close(kept, spliced, atol=1e-4, rtol=1e-4)


def test_every_latent_ablated_is_the_mean_ablated_model(lensed: tuple) -> None:
    model, blocks, sites, batch = lensed
    means = []  # each latent's mean over the patch prompts' real positions, from the SAE's own encoder
    for site, hidden in zip(sites, run_to_layers(model, blocks, batch.patch, [s.layer for s in sites]).values()):
        latents = site.sae.encode(site.normalizer.normalize(hidden[batch.real], site.layer)[0])
        dense = torch.zeros(len(latents.acts), site.sae.cfg.n_latents).scatter(-1, latents.indices, latents.acts)
        means.append(dense.mean(dim=0))
    zeros = [torch.zeros(s.sae.cfg.n_latents) for s in sites]
    ours = ablation_values(model, blocks, sites, [batch], "mean")
    with torch.no_grad():
        ablated = logit_diff(model, blocks, sites, "clean", batch, Masking(zeros, ours))
    expected = reference_ld(model, blocks, batch, independent_splice(sites, means, batch.real))
    torch.testing.assert_close(ablated, expected, atol=1e-4, rtol=1e-4)
    assert (ablated - reference_ld(model, blocks, batch, {})).abs().max() > 1e-2  # the ablation does something


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_resuming_from_a_stem_equals_the_full_forward(name: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.llm.model import find_blocks

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(name)).eval()
    blocks = find_blocks(model)
    tokens = torch.randint(5, 500, (3, 9), generator=torch.Generator().manual_seed(0))  # (B, T)
    edits = {1: lambda h: h + torch.sin(3 * h), 3: lambda h: h * 1.5}  # above the stem's layer, nonlinear
    with torch.no_grad(), replacing(blocks, edits):
        full = model.base_model(input_ids=tokens, use_cache=False).last_hidden_state  # (B, T, D)
    start = stem(model, blocks, tokens, 1)
    assert start is not None
    below = []
    handle = blocks[0].register_forward_pre_hook(lambda *args: below.append(1))
    try:
        with torch.no_grad(), replacing(blocks, edits):
            resumed = resume(model, blocks, start)
    finally:
        handle.remove()
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)
    assert not below  # block 0 did not run again


def test_the_masked_model_with_a_stem_equals_the_whole_forward(lensed: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logit differences and mask gradients from the blocks above the first site only equal those of the
    whole model (the path taken for a model whose final norm is unknown)."""
    model, blocks, sites, batch = lensed
    generator = torch.Generator().manual_seed(5)
    keep = [torch.rand(s.sae.cfg.n_latents, generator=generator).requires_grad_() for s in sites]
    masking = Masking(keep, ablation_values(model, blocks, sites, [batch], "mean"))

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list]:
        fresh = batch._replace(stems={})
        ld = logit_diff(model, blocks, sites, "clean", fresh, masking)
        return ld.detach(), torch.autograd.grad(ld.sum(), keep), list(fresh.stems.values())

    fast, fast_grads, stems = run()
    monkeypatch.setattr("pipeline.llm.replay.final_norm", lambda model: None)
    whole, whole_grads, none = run()
    assert [s.layer for s in stems] == [1] and none == [None]
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (fast_grads[0] != 0).any()


def test_ig_layer_scores_add_up_to_each_layer_patched_alone(lensed: tuple) -> None:
    """Completeness of integrated gradients, layer by layer: a site's ig_layer scores sum to what the logit
    difference loses when that site alone is mean-ablated (the other sites live)."""
    model, blocks, sites, batch = lensed
    lens = Lens(model, blocks, sites, ablation_values(model, blocks, sites, [batch], "mean"))
    scores = attributions(lens, [batch], steps=24, per_site=True)
    with torch.no_grad():
        clean = float(logit_diff(model, blocks, sites, "clean", batch).mean())
        for i, score in enumerate(scores):
            keep = [torch.zeros_like(k) if j == i else k for j, k in enumerate(lens.ones())]
            alone = float(logit_diff(model, blocks, sites, "clean", batch, Masking(keep, lens.ablate)).mean())
            assert float(score.sum()) == pytest.approx(clean - alone, rel=0.03), sites[i].layer


def planted(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, sae: TopKSAE | None = None, norm: Normalizer | None = None
) -> tuple[Site, list[Pair]]:
    """An SAE at layer 2 (``sae``, or a fresh 64-latent one) whose latent 0 reads what tells the clean prompts
    from the patch ones (their last token), and answers chosen as the tokens that latent raises and lowers
    most: the task runs through it."""
    generator = torch.Generator().manual_seed(0)
    prefixes = torch.randint(5, 500, (PLANTED, 6), generator=generator)  # (P, 6)
    clean = torch.cat([prefixes, torch.full((PLANTED, 1), 40)], 1)  # (P, 7)
    patch = torch.cat([prefixes, torch.full((PLANTED, 1), 90)], 1)
    norm = norm or Normalizer("standardize")
    xc = norm.normalize(run_to_layers(model, blocks, clean, [2])[2][:, -1], 2)[0]  # (P, D)
    xp = norm.normalize(run_to_layers(model, blocks, patch, [2])[2][:, -1], 2)[0]
    w = xc.mean(0) - xp.mean(0)
    w = w / w.norm()
    sae = sae or TopKSAE(SaeConfig("topk", 64, 16, 8, [2]), torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_dec[0] = w
        sae.W_enc[0] = w
        sae.b_enc[0] = -float((xc @ w).mean() + (xp @ w).mean()) / 2  # fires on clean last tokens only
    site = Site(2, sae.requires_grad_(False), norm, "planted")

    def without_latent(h: torch.Tensor) -> torch.Tensor:
        x, (_, scale) = norm.normalize(h[:, -1], 2)
        act = (x @ w + sae.b_enc[0]).relu()  # (P,)
        out = h.clone()
        out[:, -1] = h[:, -1] - act[:, None] * w * scale
        return out

    with torch.no_grad():
        full = model(input_ids=clean).logits[:, -1]
        with replacing(blocks, {2: without_latent}):
            effect = (full - model(input_ids=clean).logits[:, -1]).mean(0)  # (V,)
    up, down = int(effect.argmax()), int(effect.argmin())
    return site, [Pair(c.tolist(), p.tolist(), up, down) for c, p in zip(clean, patch)]


def test_mask_finds_a_planted_latent(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.llm.model import find_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().requires_grad_(False)
    blocks = find_blocks(model)
    site, pairs = planted(model, blocks)
    train, test = batches(pairs[:12], 12, set(), CPU), batches(pairs[12:], 12, set(), CPU)
    lens = Lens(model, blocks, [site], ablation_values(model, blocks, [site], train, "mean"))
    full = ends(lens, train)
    (logits,) = train_masks(lens, train, [full.full], full.gap, [0.02], MaskHyper(60, 0.1, 100.0), seed=0)
    circuit = [m > 0 for m in logits]
    score = measure(lens, test, ends(lens, test), circuit)
    assert bool(circuit[0][0]), circuit
    assert score.size <= 3
    assert score.faithfulness >= 0.9


def test_built_in_tasks_have_one_token_answers(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(resolve_model(str(tiny_llama)))
    verbs = {" is", " are", " was", " were", " has", " have"}
    sva = generate("sva", tokenizer, 32, 0)
    assert sva and all({tokenizer.decode([p.clean_answer]), tokenizer.decode([p.patch_answer])} <= verbs for p in sva)
    code = generate("code", tokenizer, 32, 0)
    answers = {tokenizer.decode([a]) for p in code for a in (p.clean_answer, p.patch_answer)}
    assert answers <= {*"0123456789", tokenizer.decode(tokenizer("Traceback", add_special_tokens=False).input_ids[:1])}
    assert all(len(p.clean) == len(p.patch) for p in sva + code)
    with pytest.raises(UserError, match="yields only 0 pair"):  # no first name is one token of this vocabulary
        generate("ioi", tokenizer, 32, 0)


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"clean_prefix": "The pilot", "patch_prefix": "The pilots", "clean_answer": " is"},
            "lacks the text field(s) patch_answer",
        ),
        (
            {"clean_prefix": "The pilot", "patch_prefix": "The pilots", "clean_answer": " is", "patch_answer": " were"},
            "is 3 tokens",
        ),
        ("not json", "is not a JSON object"),
    ],
)
def test_a_bad_task_line_is_one_clear_error(tiny_llama: Path, tmp_path: Path, line: object, message: str) -> None:
    tokenizer = load_tokenizer(resolve_model(str(tiny_llama)))
    good = {"clean_prefix": "The pilot", "patch_prefix": "The pilots", "clean_answer": " is", "patch_answer": " are"}
    assert not isinstance(encode(tokenizer, good), str)
    file = tmp_path / "task.jsonl"
    file.write_text(json.dumps(good) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(UserError, match=rf"task.jsonl:2.*{re.escape(message)}"):
        read_jsonl(file, tokenizer)


def test_cli_writes_json_csv_safetensors_and_html_only(
    runs: list[str], planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.circuit.stage.load_task", lambda *args: planted_run[1])
    args = ["circuit", runs[0], planted_run[0], "--task", "sva", "--method", "mask,ig,ig_layer,attrib"]
    args += ["--lambdas", "0.01", "--min-gap", "0.1"]
    args += ["--steps", "4", "--ig-steps", "2", "--sizes", "1,4", "--cache-root", str(tmp_path), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip().splitlines()[-1])
    assert out.parent == tmp_path / "circuits" and out.name.startswith("sva-")
    assert sorted(p.name for p in out.iterdir()) == [
        "circuit.json",
        "curve.csv",
        "curve.png",
        "index.html",
        "scores.safetensors",
    ]
    found = json.loads((out / "circuit.json").read_text())
    assert found["layers"] == [1, 2] and {c["method"] for c in found["circuits"]} == {
        "mask",
        "ig",
        "ig_layer",
        "attrib",
    }, result.output
    assert set(load_file(out / "scores.safetensors")) == {
        "mask/0.01/seed0/L1",
        "mask/0.01/seed0/L2",
        "ig/L1",
        "ig/L2",
        "ig_layer/L1",
        "ig_layer/L2",
        "attrib/L1",
        "attrib/L2",
    }
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0] == (
        "method,param,seed,size,per_layer,val_faithfulness,faithfulness,faithfulness_low,faithfulness_high,"
        "completeness,completeness_low,completeness_high"
    )
    assert len(rows) == 1 + 1 + 2 + 2 + 2


def test_a_second_seed_reruns_the_mask_and_reports_the_overlap(
    runs: list[str], planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.circuit.stage.load_task", lambda *args: planted_run[1])
    settings = {"method": ["mask"], "lambdas": [0.01], "steps": 6, "lr": 0.5, "min_gap": 0.1}
    cfg = CircuitConfig(
        runs=[runs[0], planted_run[0]],
        seeds=[0, 1],
        device="cpu",
        cache_root=str(tmp_path),
        **settings,  # type: ignore[arg-type]
    )
    out = run(cfg).folder.local()
    found = json.loads((out / "circuit.json").read_text())
    by_seed = {c["seed"]: c for c in found["circuits"]}
    assert sorted(by_seed) == [0, 1] and found["circuit"]["seed"] == 0
    first, second = ({(layer, i) for layer, ids in by_seed[s]["latents"].items() for i in ids} for s in (0, 1))
    (overlap,) = found["stability"]["mask_seeds"]
    assert overlap["seeds"] == [0, 1] and overlap["sizes"] == [len(first), len(second)]
    assert overlap["jaccard"] == round(len(first & second) / len(first | second), 4) < 1
    scores = load_file(out / "scores.safetensors")
    assert not torch.equal(scores["mask/0.01/seed0/L1"], scores["mask/0.01/seed1/L1"])
    assert [row.split(",")[2] for row in (out / "curve.csv").read_text().splitlines()[1:]] == ["0", "1"]


def test_stage_metrics_name_the_output_folder_relative_to_the_cache_root(
    runs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import circuit as stage

    monkeypatch.chdir(tmp_path)
    settings = {"task": "sva", "pairs": 8, "method": ["mask"], "lambdas": [0.01], "steps": 2, "device": "cpu"}
    Path("params.yaml").write_text(json.dumps({"circuit": settings}))  # JSON is YAML
    Path("cache").mkdir()
    Path("cache/fit.json").write_text(json.dumps({"stage": "fit", "runs": [{"path": run} for run in runs]}))
    stage.main()
    metrics = json.loads(Path("cache/circuit.json").read_text())
    assert re.fullmatch(r"circuits/sva-[0-9a-f]{12}", metrics["out"]), metrics
    assert Path("cache", metrics["out"], "circuit.json").is_file()
    assert str(tmp_path) not in json.dumps(metrics)  # nothing that differs between checkouts


@pytest.mark.slow  # loads SmolLM2's tokenizer (the GGUF file) to check the names of ioi
def test_smollm2_takes_every_built_in_task(smollm2: tuple) -> None:
    tokenizer = smollm2[1]
    whole = {"sva": {v for pair in VERBS for v in pair}, "ioi": {f" {name}" for name in NAMES}}
    whole["code"] = {*"0123456789", tokenizer.decode(tokenizer("Traceback", add_special_tokens=False).input_ids[:1])}
    for task, answers in whole.items():
        pairs = generate(task, tokenizer, 64, 0)
        assert len(pairs) == 64
        assert {tokenizer.decode([a]) for p in pairs for a in (p.clean_answer, p.patch_answer)} <= answers, task


class TableLens:
    """A model small enough to enumerate: one site of 3 latents, two pairs, and a logit difference per pair
    that is a known function of the kept shares (linear plus one interaction of latents 0 and 1)."""

    sites = [Site(5, None, None, "table")]  # type: ignore[arg-type]

    def ones(self) -> list[torch.Tensor]:
        return [torch.ones(3)]

    def ld(self, batch: object, keep: list[torch.Tensor] | None) -> torch.Tensor:
        k = torch.ones(3) if keep is None else keep[0]
        first = 1 + 2 * k[0] + 1 * k[1] + 0.5 * k[2] + 1 * k[0] * k[1]
        second = 0 + 1 * k[0] + 3 * k[1] - 1 * k[2]
        return torch.stack([first, second])


def test_faithfulness_and_completeness_by_hand() -> None:
    """m(empty) = (1 + 0) / 2 = 0.5, m(all) = (5.5 + 3) / 2 = 4.25, gap 3.75; circuit {0}: m = (3 + 1) / 2 = 2,
    faithfulness 1.5 / 3.75 = 0.4; its complement {1, 2}: m = (2.5 + 2) / 2 = 2.25, completeness 1.75 / 3.75.
    Bootstrap over the two pairs: the first pair alone gives (3 - 1) / (5.5 - 1) = 4/9, the second 1/3."""
    lens, parts = TableLens(), [object()]
    base = ends(lens, parts)  # type: ignore[arg-type]
    assert base.full.tolist() == [5.5, 3.0] and base.empty.tolist() == [1.0, 0.0] and base.gap == 3.75
    score = measure(lens, parts, base, [torch.tensor([True, False, False])])  # type: ignore[arg-type]
    assert score.size == 1 and score.per_layer == {5: 1}
    assert score.faithfulness == pytest.approx(0.4)
    assert score.completeness == pytest.approx(1.75 / 3.75)
    assert score.faithfulness_ci == pytest.approx((1 / 3, 4 / 9))
    every = measure(lens, parts, base, [torch.tensor([True, True, True])])  # type: ignore[arg-type]
    assert (every.faithfulness, every.completeness) == pytest.approx((1.0, 0.0))


def finite_difference(lens: Lens, batch: Batch, at: float, site: int, latent: int, eps: float = 1e-3) -> float:
    """d mean ld / d keep of one latent, all kept shares at ``at``, by central differences.

    The step shrinks (by 3, at most three times) until the forward and backward differences agree within 10 %:
    a TopK selection that flips inside the window (a latent of a later site crossing its k-th's value) is a
    jump there, not a slope, and a central difference across it is no estimate of the gradient.
    """

    def mean_ld(step: float) -> float:
        keep = [torch.full_like(k, at) for k in lens.ones()]
        keep[site][latent] += step
        with torch.no_grad():
            ld = logit_diff(lens.model, lens.blocks, lens.sites, "clean", batch, Masking(keep, lens.ablate))
        return float(ld.mean())

    middle = mean_ld(0.0)
    for _ in range(4):
        up, down = (mean_ld(eps) - middle) / eps, (middle - mean_ld(-eps)) / eps
        if abs(up - down) <= 0.1 * max(abs(up), abs(down)) + 1e-4:
            break
        eps /= 3
    return (up + down) / 2


def test_attrib_and_ig_match_finite_differences_of_the_mean_ablated_model(lensed: tuple) -> None:
    model, blocks, sites, batch = lensed
    lens = Lens(model, blocks, sites, ablation_values(model, blocks, sites, [batch], "mean"))
    attrib = attributions(lens, [batch], steps=1)
    ig = attributions(lens, [batch], steps=4)
    for site in range(len(sites)):
        for latent in attrib[site].abs().argsort(descending=True)[:3].tolist():
            expected = finite_difference(lens, batch, 1.0, site, latent)
            assert float(attrib[site][latent]) == pytest.approx(expected, rel=0.05, abs=1e-4), (site, latent)
        for latent in ig[site].abs().argsort(descending=True)[:3].tolist():
            path = [finite_difference(lens, batch, (i + 0.5) / 4, site, latent) for i in range(4)]
            assert float(ig[site][latent]) == pytest.approx(sum(path) / 4, rel=0.05, abs=1e-4), (site, latent)


def test_attribution_circuits_take_the_largest_absolute_scores() -> None:
    scores = [torch.tensor([0.1, -3.0, 0.0]), torch.tensor([2.0, -0.5])]
    (one, first), (three, second) = top_circuits(scores, [1, 3])
    assert (one, three) == (1, 3)
    assert [c.tolist() for c in first] == [[False, True, False], [False, False]]
    assert [c.tolist() for c in second] == [[False, True, False], [True, True]]


def test_lambdas_trained_together_equal_each_trained_alone(lensed: tuple) -> None:
    model, blocks, sites, batch = lensed
    lens = Lens(model, blocks, sites, ablation_values(model, blocks, sites, [batch], "mean"))
    base = ends(lens, [batch])
    hyper = MaskHyper(4, 0.2, 10.0)
    together = train_masks(lens, [batch], [base.full], 1.0, [0.001, 0.05], hyper, seed=2)
    for lam, stacked in zip([0.001, 0.05], together):
        (alone,) = train_masks(lens, [batch], [base.full], 1.0, [lam], hyper, seed=2)
        for a, b in zip(stacked, alone):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(together[0][0], together[1][0])  # the two lambdas did train apart


def test_pairs_split_three_ways_and_built_in_tasks_test_on_64_pairs() -> None:
    cfg = CircuitConfig()
    assert round(cfg.pairs * cfg.test_share) >= 64
    train, val, test = split(list(range(10)), 0.2, 0.5, seed=1)  # type: ignore[arg-type]
    assert (len(train), len(val), len(test)) == (3, 2, 5)
    assert sorted(train + val + test) == list(range(10))
    assert [len(p) for p in split(list(range(3)), 0.9, 0.9, seed=0)] == [1, 1, 1]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted_run(runs: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Pair]]:
    """A copy of the layer-2 run whose latent 0 carries the planted task, and that task's pairs."""
    subject = load_subject(runs[1], CPU)
    model, blocks = load_llm(subject.cache, CPU)
    site, pairs = planted(model, blocks, subject.sae, subject.normalizer)  # type: ignore[arg-type]
    folder = tmp_path_factory.mktemp("planted") / "run"
    shutil.copytree(subject.folder.local(), folder)
    save_weights(Folder.at(str(folder)), site.sae)
    return str(folder), pairs


def run_planted(
    planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str
) -> dict:
    """circuit.json of the CLI on the planted run and task (the task handed in where a built-in one is made)."""
    run, pairs = planted_run
    monkeypatch.setattr("pipeline.circuit.stage.load_task", lambda *args: pairs)
    args = ["circuit", run, "--method", "mask,attrib", "--sizes", "1,100", "--steps", "40", "--lambdas", "0.02"]
    args += ["--min-gap", "0.1"]  # the planted latent moves the answers by about 0.4
    result = CliRunner().invoke(app, [*args, "--cache-root", str(tmp_path), "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((Path(result.stdout.strip().splitlines()[-1]) / "circuit.json").read_text())


def test_a_planted_circuit_is_chosen_on_validation_and_reported_on_test(
    planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run_planted(planted_run, tmp_path, monkeypatch)
    assert found["pairs"] == {"train": 6, "val": 6, "test": 12}
    assert found["status"] == "found" and found["found"], found["message"]
    best = found["circuit"]
    assert best["size"] <= 3 and {"layer": 2, "latent": 0} in [
        {k: r[k] for k in ("layer", "latent")} for r in best["latents"]
    ]
    assert best["val_faithfulness"] >= 0.8
    low, high = best["faithfulness_ci"]
    assert low <= best["faithfulness"] <= high and high - low > 0
    same = next(c for c in found["circuits"] if (c["method"], c["param"]) == (best["method"], best["param"]))
    assert same["faithfulness"] == best["faithfulness"] != same["val_faithfulness"]  # reported on test, not val
    smaller = [c for c in found["circuits"] if c["size"] < best["size"]]
    assert all(c["val_faithfulness"] < 0.8 for c in smaller)  # chosen as the smallest good one on validation


def test_a_circuit_of_most_latents_is_trivial_not_found(
    planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run_planted(planted_run, tmp_path, monkeypatch, "--steps", "1", "--lambdas", "0", "--method", "mask")
    assert found["status"] == "trivial" and not found["found"], found["message"]
    assert found["circuit"]["size"] == 128 and "more than half of the latents" in found["message"]


@pytest.mark.parametrize("swap, extra", [(False, ["--min-gap", "1000"]), (True, [])])
def test_a_task_with_a_small_or_negative_gap_claims_no_circuit(
    planted_run: tuple[str, list[Pair]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: bool, extra: list[str]
) -> None:
    run, pairs = planted_run
    if swap:  # the answers the other way round: the clean model prefers the wrong one, the gap is negative
        pairs = [p._replace(clean_answer=p.patch_answer, patch_answer=p.clean_answer) for p in pairs]
    found = run_planted((run, pairs), tmp_path, monkeypatch, *extra)
    assert found["status"] == "not solved" and not found["solved"] and found["circuit"] is None
    assert found["circuits"] == [] and "no circuit claimed" in found["message"]
    gap = found["baseline"]["train"]["gap"]
    assert (gap < 0) if swap else (0 < gap < 1000)
    assert f"{gap:.3f}" in found["message"]  # the real gap, not clamped


def kill_during_write(argv: list[str]) -> int:
    """Run the CLI in a child that is SIGKILLed when the circuit's outputs are half written (after curve.csv
    and scores.safetensors, before curve.png); its exit code."""
    script = (
        "import sys\nfrom tests.support.killpoint import _on_call\nfrom pipeline.circuit import outputs\n"
        "_on_call(outputs, 'curve_png', 1)\nsys.argv = ['sae-pipe', *sys.argv[1:]]\n"
        "from pipeline.cli import main\nmain()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True).returncode


def test_a_run_killed_while_writing_leaves_the_old_result_or_none(runs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["circuit", *runs, "--task", "sva", "--pairs", "16", "--method", "attrib", "--sizes", "1"]
    argv += ["--device", "cpu", "--out", str(out), "--min-gap", "0"]
    assert kill_during_write(argv) == -signal.SIGKILL
    assert not out.exists()  # the first run died: no result at all
    assert CliRunner().invoke(app, argv).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert kill_during_write([*argv[:-2], "--min-gap", "0.001", "--sizes", "2"]) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old result, whole


def test_the_circuit_is_chosen_by_validation_faithfulness_never_by_test() -> None:
    def circuit(method: str, size: int, val: float, test: float) -> Found:
        score = Score(size, {1: size}, test, 0.0, (test, test), (0.0, 0.0))
        return Found(method, size, 0, [torch.arange(10) < size], [torch.zeros(10)], val, score)

    overfit = circuit("ig", 1, val=0.5, test=0.95)  # good on test only: must not be chosen
    good = circuit("attrib", 3, val=0.9, test=0.7)
    verdict = chosen([overfit, good, circuit("mask", 4, val=0.95, test=0.99)], "")
    assert (verdict.best, verdict.status) == (good, "found")
    assert "test faithfulness 0.700 [0.700, 0.700]" in verdict.message
    assert chosen([overfit], "").status == "unfaithful"
    assert chosen([circuit("mask", 6, val=0.9, test=0.9)], "").status == "trivial"  # 6 of 10 latents
