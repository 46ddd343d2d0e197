"""Steering evaluation: logit effects, output scores and the dose-response grid measure what they claim."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.extract.stage import extract
from pipeline.fit.config import FitConfig
from pipeline.fit.stage import fit
from pipeline.infra.errors import UserError
from pipeline.llm.unembed import unembedding
from pipeline.sae.logits import logit_effects, output_scores
from pipeline.sae.subject import load_llm, load_subject
from pipeline.steer.config import SteerConfig
from pipeline.steer.evaluation import evaluate_steering
from pipeline.steer.judge import judge_messages
from tests.support.caches import tiny_extract_config
from tests.support.standin_openai import Script, standin_env

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("steer-eval")
    cache = extract(tiny_extract_config(tiny_llama, root, layers="2"))
    cfg = FitConfig(cache=cache.url, latents=128, k=8, batch_size=256, out=str(root / "saes"), device="cpu")
    return fit(cfg)[0].url


def test_logit_effects_rank_tokens_by_their_readout() -> None:
    """W_U rows along known axes: a direction along axis a promotes the tokens read from +a, strongest first."""
    w_u = torch.zeros(8, 4)  # (V, D): token t reads axis t % 4 with sign and size set below
    for t, (axis, value) in enumerate(
        [(0, 1.0), (0, 3.0), (1, 2.0), (0, -5.0), (2, 1.0), (0, 2.0), (3, 1.0), (1, -1.0)]
    ):
        w_u[t, axis] = value
    w_dec = torch.eye(4)[[0, 1]]  # (2, D): axis 0, axis 1
    for chunk in (1, 256):
        effects = logit_effects(w_dec, w_u, k=2, chunk=chunk)
        assert effects.top_ids[0].tolist() == [1, 5] and effects.top_values[0].tolist() == [3.0, 2.0]
        assert effects.bottom_ids[0, 0] == 3 and effects.bottom_values[0, 0] == -5.0
        assert effects.top_ids[1, 0] == 2 and effects.bottom_ids[1, 0] == 7


def test_unembedding_is_the_model_readout(tiny_llama: Path) -> None:
    """W_U with the final norm folded in reproduces lm_head(norm(h)) up to the norm's per-token scale."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
        h = torch.randn(3, 64)
        expected = model.lm_head(model.model.norm(h))  # (3, V)
        rms = h.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).rsqrt()  # (3, 1)
        torch.testing.assert_close((h * rms) @ unembedding(model).T, expected, atol=1e-4, rtol=1e-4)


def test_output_score_follows_the_published_formula(run: str) -> None:
    """With no push, the score is (1 - best_rank / V) * max_prob of the clean next-token distribution."""
    subject = load_subject(run, CPU)
    model, blocks = load_llm(subject.cache, CPU)
    prompt = torch.tensor([5, 17, 33, 80])
    directions = subject.sae.W_dec[:2]
    promoted = logit_effects(directions, unembedding(model), k=3).top_ids  # (2, 3)
    got = output_scores(model, blocks[2], prompt, directions, promoted, torch.zeros(2), subject.normalizer, 2)
    with torch.no_grad():
        probs = model(input_ids=prompt[None]).logits[0, -1].softmax(-1)  # (V,)
    order = probs.argsort(descending=True).tolist()
    for row, tokens in enumerate(promoted.tolist()):
        best = min(order.index(t) for t in tokens)
        assert got[row].item() == pytest.approx(
            (1 - best / len(probs)) * max(probs[t].item() for t in tokens), rel=1e-5
        )
    pushed = output_scores(model, blocks[2], prompt, directions, promoted, torch.full((2,), 1e4), subject.normalizer, 2)
    assert bool((pushed > got).all())  # a strong push toward the promoted tokens raises the score


def test_dose_response_grid(run: str, tmp_path: Path) -> None:
    cfg = SteerConfig(
        run=run,
        evaluate=True,
        eval_features=[3, 40],
        strengths=[0.0, 4.0, 16.0],
        heldout_tokens=64,
        max_new_tokens=4,
        prompts=["the cat"],
        out=str(tmp_path / "out"),
        device="cpu",
    )
    out = evaluate_steering(cfg)
    rows = list(csv.DictReader((out.local() / "steering.csv").open()))
    assert [(int(r["feature"]), float(r["strength"])) for r in rows] == [(f, s) for f in (3, 40) for s in (0, 4, 16)]
    for feature in ("3", "40"):
        mine = {float(r["strength"]): r for r in rows if r["feature"] == feature}
        assert float(mine[0]["kl"]) == 0 and float(mine[0]["logprob_gain"]) == 0  # strength 0 = the unedited model
        assert 0 < float(mine[4]["kl"]) < float(mine[16]["kl"])  # cost grows with strength
        assert float(mine[16]["logprob_gain"]) > 0  # pushing d_i raises its promoted tokens
    summary = json.loads((out.local() / "summary.json").read_text())
    assert set(summary["features"]) == {"3", "40"} and len(summary["promoted"]["3"]) == 10
    assert (out.local() / "dose_response.png").read_bytes()[:4] == b"\x89PNG"
    assert "Dose-response" in (out.local() / "steering.html").read_text()


def test_cli_evaluate_prints_the_folder_last(run: str, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = [
        "steer",
        run,
        "--evaluate",
        "--eval-feature",
        "3",
        "--strength",
        "0",
        "--strength",
        "2",
        "--heldout-tokens",
        "32",
        "--max-new-tokens",
        "2",
        "--prompt",
        "a b",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert len((out / "steering.csv").read_text().splitlines()) == 3


def judge_rule(body: dict) -> tuple[str, None]:
    """A judge by rule: concept 2 when the continuation has a letter of the concept's first quoted token, else 0;
    fluency 2 for fewer than 10 characters, else 1."""
    user = body["messages"][-1]["content"]
    concept = user.split("Concept: ", 1)[1].split("\n", 1)[0]
    text = user.split("Continuation: ", 1)[1]
    first = concept.split("'")[1] if "'" in concept else concept
    hit = any(ch.isalpha() and ch in text for ch in first)
    return json.dumps({"concept": 2 if hit else 0, "fluency": 2 if len(text) < 10 else 1}), None


def test_llm_judge_rates_cached_and_capped(run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-judge-SECRET-42"
    base = dict(run=run, evaluate=True, eval_features=[3], strengths=[0.0, 8.0], heldout_tokens=32, device="cpu")
    cfg = SteerConfig(
        **base, max_new_tokens=3, prompts=["the cat", "a dog"], cache_root=str(tmp_path), out=str(tmp_path / "o")
    )
    script = Script(rule=judge_rule)
    with standin_env(script, monkeypatch, key):
        out = evaluate_steering(cfg).local()
        sent = script.requests
        evaluate_steering(cfg)  # every answer is cached now
        with pytest.raises(UserError, match="above --max-cost"):
            evaluate_steering(dataclasses.replace(cfg, judge_model="gpt-4o", max_cost=1e-9, prompts=["new"]))
    assert sent == 4 and script.requests == 4  # 2 strengths x 2 prompts, then nothing more
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    concept = json.loads((out / "summary.json").read_text())["concepts"]["3"]
    for row in csv.DictReader((out / "steering.csv").open()):
        mine = [g for g in generations if g["strength"] == float(row["strength"])]
        asked = [judge_messages(concept, g["prompt"], g["text"]) for g in mine]
        expected = [json.loads(judge_rule({"messages": m})[0]) for m in asked]
        assert float(row["concept"]) == sum(e["concept"] for e in expected) / len(expected)
        assert float(row["fluency"]) == sum(e["fluency"] for e in expected) / len(expected)
    assert not any(key in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


def test_without_key_the_judge_is_skipped(run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = SteerConfig(
        run=run,
        evaluate=True,
        eval_features=[3],
        strengths=[0.0],
        heldout_tokens=32,
        max_new_tokens=2,
        prompts=["x"],
        out=str(tmp_path),
        device="cpu",
    )
    out = evaluate_steering(cfg).local()
    (row,) = csv.DictReader((out / "steering.csv").open())
    assert row["concept"] == "" and json.loads((out / "summary.json").read_text())["judge"].startswith("skipped")
