"""evaluate --suite absorption, probing and the comparison page, against hand computations on planted
examples: an absorbing latent that fires instead of the letter latent on one word is counted, a k-sparse
probe finds a planted feature, and the page lists every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.evaluate.absorption import absorption_rows, summary, word_absorption
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
    return LetterTask(words, letter, xt, test, probes, scores, -6)


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

