"""evaluate --suite absorption, probing and the comparison page, against hand computations on planted
examples: an absorbing latent that fires instead of the letter latent on one word is counted, a k-sparse
probe finds a planted feature, and the page lists every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.evaluate.absorption import absorption_rows, ranked_latents, summary, word_absorption
from pipeline.evaluate.letters import LETTERS, LetterTask
from pipeline.evaluate.page import write_page
from pipeline.evaluate.probes import f1, fit_probe
from pipeline.evaluate.probing import Pooled, class_scores
from pipeline.infra.files import Folder
from pipeline.sae.interface import SAE, Latents


def test_word_absorption_by_hand() -> None:
    # probe p = e0; latent 0 writes e0 (the letter latent), latent 1 writes (0.6, 0.8, 0) (cosine 0.6 with p)
    cos = torch.tensor([1.0, 0.6, 0.0])
    acts = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.5, 2.0, 0.0]])  # (W, N)
    proj = torch.tensor([2.0, 1.8, 1.7])  # <x, p> of each word
    fraction, full = word_absorption(acts, cos, proj, main=[0])
    # word 0: the letter latent carries it all -> 0; word 1: latent 1 carries 1.8 of 1.8 and the letter latent is
    # silent -> 1, fully absorbed; word 2: main 0.5, absorber 1.2 (>= 0.4 of 1.7) -> 1.2 / (1.2 + 0.5)
    assert fraction.tolist() == pytest.approx([0.0, 1.0, 1.2 / 1.7])
    assert full.tolist() == [False, True, False]


def test_letter_candidates_by_hand() -> None:
    codes = torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])  # (M, N)
    ranked = ranked_latents(codes, torch.tensor([0, 0, 1, 1]))  # letters a, a, b, b
    # a: means on a minus on the rest: [2 - 0, 0 - 1, 1 - 3] -> 0, 1, 2; b: [0 - 2, 1 - 0, 3 - 1] -> 2, 1, 0
    assert ranked[0].tolist() == [0, 1, 2] and ranked[1].tolist() == [2, 1, 0]
    assert ranked[2].tolist() == [1, 0, 2]  # c has no words: 0 minus the overall means [1, .5, 2]


def test_f1_and_probe_by_hand() -> None:
    assert f1(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])) == 0.5
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    probe = fit_probe(x, torch.tensor([False, False, True, True]))
    assert (probe.score(x) > 0).tolist() == [False, False, True, True]


class Planted(SAE):
    """Three latents: 0 reads the letter direction e0 unless e2 is there, 1 reads e1, 2 reads e2; decoder
    directions e0, e1 and (e0 + e2) / sqrt 2, so latent 2 absorbs the letter on the one word that has e2."""

    def __init__(self) -> None:
        super().__init__()
        self.read = torch.nn.Parameter(torch.tensor([[1.0, 0.0, -2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
        self.write_rows = torch.nn.Parameter(
            torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5**0.5, 0.0, 0.5**0.5]])
        )

    def dense_code(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.read.T)

    def directions(self, latents: object = None) -> Tensor:
        return self.write_rows

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        raise NotImplementedError

    def decode(self, latents: Latents) -> Tensor:
        raise NotImplementedError

    def encoder_rows(self) -> tuple[Tensor, Tensor]:
        return self.read, torch.zeros(3)


def planted_task() -> LetterTask:
    """12 'a' words (e0) and 12 'b' words (e1), a little noise; the held-out 'a' word 'apple' also has e2."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.tile([1.0, 0.0, 0.0], (12, 1)), np.tile([0.0, 1.0, 0.0], (12, 1))])
    x[:, :2] += 0.05 * rng.random((24, 2))
    x[11, 2] = 1.0  # 'apple'
    letter = torch.tensor([0] * 12 + [1] * 12)
    test = torch.zeros(24, dtype=torch.bool)
    test[[9, 10, 11, 21, 22, 23]] = True  # three 'a' and three 'b' words held out
    xt = torch.tensor(x)
    probes = [fit_probe(xt[~test], letter[~test] == i) for i in range(len(LETTERS))]
    scores = [f1(p.score(xt[test]) > 0, letter[test] == i) for i, p in enumerate(probes)]
    words = [f"a{i}" for i in range(11)] + ["apple"] + [f"b{i}" for i in range(12)]
    return LetterTask(words, letter, xt, test, probes, scores, -6, xt, 3)


def test_planted_absorption_is_counted() -> None:
    task = planted_task()
    rows = absorption_rows(task, Planted())
    a = rows[0]
    assert a["first_letter"] == "a" and a["num_probe_true_positives"] == 3 and a["num_split_features"] == 1
    assert a["num_full_absorption"] == 1  # 'apple': latent 2 fires instead of latent 0
    assert a["full_absorption_rate"] == pytest.approx(1 / 3)
    assert a["mean_absorption_fraction"] == pytest.approx(1 / 3)  # fractions 0, 0, 1
    assert rows[1]["num_full_absorption"] == 0 and rows[1]["mean_absorption_fraction"] == 0.0
    metrics, kept = summary(rows, task.probe_f1)
    assert [r["first_letter"] for r in kept] == ["a", "b"]  # the letters with no words have no probe
    assert metrics["mean_absorption_fraction_score"] == pytest.approx(1 / 6)
    assert metrics["std_dev_absorption_fraction_score"] == pytest.approx(np.std([1 / 3, 0.0], ddof=1))


def test_k_sparse_probe_finds_a_planted_feature() -> None:
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.random(80) < 0.5).long()  # (P,)
    code = torch.from_numpy(rng.random((80, 50)) * 0.3)  # (P, N) uninformative latents
    code[:, 37] = 2.0 * labels  # the planted feature
    raw = torch.from_numpy(rng.normal(size=(80, 8)))  # (P, D) knows nothing
    pooled = Pooled(np.arange(80), raw, code, [""] * 80)
    test = torch.from_numpy(np.arange(80) % 4 == 0)
    scores = class_scores(pooled, labels, test, np.random.default_rng(0))
    assert scores is not None
    assert scores["sae_top_1_test_accuracy"] == 1.0
    assert scores["sae_top_20_test_accuracy"] == 1.0
    assert scores["llm_top_1_test_accuracy"] < 0.9  # the raw activations do not have it


def test_page_lists_every_run(tmp_path: Path) -> None:
    out = Folder.at(str(tmp_path))
    results = [
        {"run": f"topk-{k}", "arch": "topk", "layers": [3], "n_latents": 64, "k": k, "l0": float(k), "nmse": 1 / k}
        for k in (4, 8, 16)
    ] + [{"run": "relu-a", "arch": "standard", "layers": [3], "n_latents": 64, "k": 0, "l0": 11.0, "nmse": 0.2}]
    doc = {"eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.25}}}
    out.write_json(doc, "topk-8", "saebench", "absorption_first_letter", "sae-pipe_topk-8_eval_results.json")
    page = (tmp_path / write_page(results, out)).read_text()
    for r in results:
        assert page.count(f"<td>{r['run']}</td>") == 1
        assert page.count(f"<title>{r['run']}: L0 {r['l0']:.4g}, nmse") == 1  # its point in the nmse plot
    assert page.count("<svg") == 2 and "L0 vs absorption" in page  # nmse, and absorption for the run that has it
    assert page.count("<title>topk-8: L0 8, absorption 0.25</title>") == 1 and "<td>0.25</td>" in page


def test_words_read_after_a_shared_prefix_match_whole_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' keys and values, computed once, give each word the activation its whole prompt gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.evaluate import letters
    from pipeline.llm.hooks import run_to_layers
    from pipeline.llm.model import find_blocks

    monkeypatch.setattr(letters, "WORD_BATCH", 2)  # two batches: the second must not see the first's words
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    blocks = find_blocks(model)
    prefix, suffix, words = [5, 6, 7, 8, 9], [11, 12], [20, 21, 22]
    got = letters.word_activations(model, blocks, (prefix, suffix), words, [1, 2])  # (M, L, D)
    whole = torch.tensor([[*prefix, w, *suffix] for w in words])
    with torch.no_grad():
        expected = run_to_layers(model, blocks, whole, [1, 2])
    for i, layer in enumerate((1, 2)):
        assert torch.allclose(got[:, i], expected[layer][:, len(prefix)], atol=1e-5)


# sae-bench 0.6.0's field names, written out from evals/absorption/eval_output.py and sparse_probing/eval_output.py
ABSORPTION_MEAN = {
    "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
    "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features",
}  # fmt: skip
ABSORPTION_DETAIL = {
    "first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
    "num_probe_true_positives", "num_split_features",
}  # fmt: skip
PROBING = {side: {f"{side}_test_accuracy", *(f"{side}_top_{k}_test_accuracy" for k in (1, 2, 5, 20))}
           for side in ("llm", "sae")}  # fmt: skip


def test_evaluate_writes_absorption_and_probing(tiny_llama: Path, tmp_path: Path) -> None:
    """The suites end to end on the tiny model: a JSONL corpus with a label column, one TopK run."""
    import dataclasses
    import json

    from pipeline.evaluate import stage as evaluate
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.extract import stage as extract
    from pipeline.extract.corpus import builtin_documents
    from pipeline.fit import stage as fit
    from pipeline.fit.config import FitConfig
    from tests.support.caches import tiny_extract_config

    corpus = tmp_path / "labelled.jsonl"
    docs = [(doc[:120], "long" if len(doc) > 600 else "short") for doc in builtin_documents()[300:380]]
    corpus.write_text("".join(json.dumps({"text": t, "size": label}) + "\n" for t, label in docs))
    extract_cfg = tiny_extract_config(tiny_llama, tmp_path, layers="1", dataset=str(corpus), max_tokens=2400)
    cache = extract.run(dataclasses.replace(extract_cfg, heldout=0.25)).folder.url
    fitted = FitConfig(cache=cache, layer=1, latents=32, k=4, batch_size=128, max_tokens=128, out=str(tmp_path / "s"))
    run = fit.run(dataclasses.replace(fitted, device="cpu", precision="float32")).runs[0]
    cfg = EvaluateConfig(
        runs=[run.url], device="cpu", cache_root=str(tmp_path), suite=["absorption", "probing"], metrics=["nmse"],
        probe_words=4, probe_label="size",
    )  # fmt: skip
    evaluate.run(cfg)
    folder = tmp_path / "evaluate" / run.name / "saebench"
    absorption = json.loads((folder / "absorption_first_letter" / f"sae-pipe_{run.name}_eval_results.json").read_text())
    assert set(absorption["eval_result_metrics"]) == {"mean"}
    assert set(absorption["eval_result_metrics"]["mean"]) == ABSORPTION_MEAN
    assert all(set(d) == ABSORPTION_DETAIL for d in absorption["eval_result_details"])
    assert sorted(absorption["eval_result_unstructured"]["probe_f1"]) == list(LETTERS)  # every probe's F1 shown
    probing = json.loads((folder / "sparse_probing" / f"sae-pipe_{run.name}_eval_results.json").read_text())
    assert {k: set(v) for k, v in probing["eval_result_metrics"].items()} == PROBING
    assert "labelled.jsonl/size" in [d["dataset_name"] for d in probing["eval_result_details"]]
    assert probing["eval_result_unstructured"]["documents"] > 30


def test_routesae_probes_the_layer_most_words_are_routed_to() -> None:
    """A RouteSAE's letter probes read the layer its router sends most words to, and absorption reads the
    routed input: the chosen layer's activation times its routing weight (a softmax written out in numpy)."""
    from pipeline.evaluate.letters import probe_layer
    from pipeline.sae.archs.route import RouteSAE
    from pipeline.sae.interface import SaeConfig

    sae = RouteSAE(SaeConfig("route", d_in=3, n_latents=4, k=2, layers=[5, 6, 7])).eval()
    with torch.no_grad():
        sae.router.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))  # (L, D)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 3, 3))  # (M, L, D)
    xs[:, :, 0] = [[1, 1, 1], [2, 0, 1], [0.5, 0.5, 0.5], [-1, -1, -1], [-2, 0, 0]]  # summed: 3, 3, 1.5, -3, -2
    at, inputs = probe_layer(sae, torch.tensor(xs, dtype=torch.float32))
    logits = np.stack([np.zeros(5), np.zeros(5), xs[:, :, 0].sum(1)], axis=1)  # (M, L)
    weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    choice = logits.argmax(1)  # layer 7 for the three positive words, the first of the tied two (5) otherwise
    assert at == 2 and list(choice) == [2, 2, 2, 0, 0]
    expected = xs[np.arange(5), choice] * weights[np.arange(5), choice][:, None]  # (M, D)
    np.testing.assert_allclose(inputs.numpy(), expected, rtol=1e-5)
