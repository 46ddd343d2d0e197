"""Steering evaluation: logit effects, output scores and the dose-response grid measure what they claim."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live import logits as logits_module
from pipeline.live.edit import Mode, Site
from pipeline.live.logits import logit_effects, output_scores
from pipeline.live.subject import Live, load_cache_tokenizer, load_llm, load_subject
from pipeline.llm.hooks import replace_input
from pipeline.llm.unembed import unembedding
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Latents
from pipeline.steer import stage as steer
from pipeline.steer.config import SteerConfig
from pipeline.steer.dose import Bench, Setting, held_out_cost
from pipeline.steer.judge import judge_messages
from tests.support.standin_openai import Script, standin_env
from tests.support.steer_by_hand import add_by_hand, greedy_by_hand

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def evaluated(cfg: SteerConfig) -> Folder:
    """The folder the steer stage's evaluation wrote (``cfg.evaluate`` is on)."""
    folder = steer.run(cfg).folder
    assert folder is not None
    return folder


@pytest.fixture(scope="module")
def run(layer_runs: list[str]) -> str:
    """The layer-2 TopK run (128 latents, k 8) shared with the steering tests (conftest.py, read only)."""
    return layer_runs[1]


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
    site = Site(2, subject.sae, subject.normalizer, "t")
    got = output_scores(model, blocks, prompt, directions, promoted, torch.zeros(2), site)
    with torch.no_grad():
        probs = model(input_ids=prompt[None]).logits[0, -1].softmax(-1)  # (V,)
    order = probs.argsort(descending=True).tolist()
    for row, tokens in enumerate(promoted.tolist()):
        best = min(order.index(t) for t in tokens)
        assert got[row].item() == pytest.approx(
            (1 - best / len(probs)) * max(probs[t].item() for t in tokens), rel=1e-5
        )
    pushed = output_scores(model, blocks, prompt, directions, promoted, torch.full((2,), 1e4), site)
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
    out = evaluated(cfg)
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
        out = evaluated(cfg).local()
        sent = script.requests
        evaluated(cfg)  # every answer is cached now
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
    out = evaluated(cfg).local()
    (row,) = csv.DictReader((out / "steering.csv").open())
    assert row["concept"] == "" and json.loads((out / "summary.json").read_text())["judge"].startswith("skipped")


def test_steering_cost_is_kl_clean_to_steered_by_hand(run: str) -> None:
    """At one held-out position: kl = KL(p_clean || p_steered) = sum_v p (log p - log q) and logprob_gain = the
    change of the promoted tokens' log-mass, from logits of a direction edit written out by hand (the EOS at
    position 2 is not edited)."""
    subject = load_subject(run, CPU)
    model, blocks = load_llm(subject.cache, CPU)
    tokens = torch.tensor([[5, 17, 0, 33, 80, 120, 7, 64]])  # (1, T)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 5] = True  # the one position the cost is read at
    latent, strength, promoted = 3, 60.0, torch.tensor([1, 2, 40])
    live = Live(subject, model, blocks, None, frozenset({0}))
    bench = Bench(live, [], tokens, mask, {latent: promoted}, {}, Mode.DELTA)
    ((kl, gain),) = held_out_cost(bench, [Setting(latent, strength)], batch_size=1).values()
    rows = [(0, t, strength) for t in range(tokens.shape[1]) if t != 2]
    with torch.no_grad():
        clean = model(input_ids=tokens).logits[0, 5].double().log_softmax(-1)  # (V,) log p
        with replace_input(blocks[2], add_by_hand(rows, latent, subject.sae, subject.normalizer.eps)):
            steered = model(input_ids=tokens).logits[0, 5].double().log_softmax(-1)  # (V,) log q
    expected = float((clean.exp() * (clean - steered)).sum())
    reverse = float((steered.exp() * (steered - clean)).sum())
    assert abs(reverse - expected) > 1e-3 * expected, (expected, reverse)  # 10x the tolerance below: a swap shows
    assert kl == pytest.approx(expected, rel=1e-4)
    assert gain == pytest.approx(float(steered[promoted].logsumexp(0) - clean[promoted].logsumexp(0)), rel=1e-4)


@torch.no_grad()
def code_by_hand(model: torch.nn.Module, sae: TopKSAE, seq: torch.Tensor, start: int) -> Latents:
    """The SAE's code of positions start.. of ``seq`` (1, T) as the clean model reads it at layer 2 (HF
    hidden_states[2] = the input of block 2), standardized per token with the cache's eps."""
    h = model(input_ids=seq, output_hidden_states=True).hidden_states[2][0, start:].float()  # (n, D)
    return sae.encode((h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-6))


def test_effect_column_is_the_hand_counted_activation(run: str, tmp_path: Path) -> None:
    """effect = the feature's activation summed over the generated tokens / their number; here the greedy
    generations and their read-back are written out by hand, for the unedited and a steered setting."""
    subject = load_subject(run, CPU)
    model, blocks = load_llm(subject.cache, CPU)
    assert subject.normalizer.eps == 1e-6
    ids = load_cache_tokenizer(subject.cache)("the cat", return_tensors="pt").input_ids  # (1, T)
    unedited = greedy_by_hand(model, blocks[2], ids, 4, (0, 0.0, subject.sae, 1e-6))
    code = code_by_hand(model, subject.sae, unedited, ids.shape[1])
    latent = int(code.indices.flatten()[code.acts.flatten().argmax()])  # fires on the unedited continuation
    cfg = SteerConfig(
        run=run,
        evaluate=True,
        eval_features=[latent],
        strengths=[0.0, 3.0],
        heldout_tokens=16,
        max_new_tokens=4,
        prompts=["the cat"],
        out=str(tmp_path / "o"),
        device="cpu",
    )
    rows = list(csv.DictReader((evaluated(cfg).local() / "steering.csv").open()))
    for row in rows:
        seq = greedy_by_hand(model, blocks[2], ids, 4, (latent, float(row["strength"]), subject.sae, 1e-6))
        code = code_by_hand(model, subject.sae, seq, ids.shape[1])
        count = float((code.acts * (code.indices == latent)).sum()) / (seq.shape[1] - ids.shape[1])
        assert float(row["effect"]) == pytest.approx(count, rel=1e-4, abs=1e-5)
    assert float(rows[0]["effect"]) > 0.1  # the unedited row is a real count, not a zero that any mutant matches


def test_features_are_selected_on_prompts_the_evaluation_never_generates_from(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output score that picks the features is measured on a prompt that no evaluated generation starts with."""
    selection: list[list[int]] = []
    real = logits_module.output_scores

    def spy(model: torch.nn.Module, blocks: torch.nn.Module, prompt: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        selection.append(prompt.tolist())
        return real(model, blocks, prompt, *args, **kwargs)

    monkeypatch.setattr(logits_module, "output_scores", spy)
    cfg = SteerConfig(run=run, evaluate=True, n_features=1, strengths=[0.0], heldout_tokens=16, max_new_tokens=2)
    out = evaluated(dataclasses.replace(cfg, out=str(tmp_path), device="cpu")).local()
    tokenizer = load_cache_tokenizer(load_subject(run, CPU).cache)
    started = {json.loads(line)["prompt"] for line in (out / "generations.jsonl").read_text().splitlines()}
    assert selection and len(started) == 3
    for prompt in started:
        ids = tokenizer(prompt).input_ids
        assert all(ids[: len(chosen)] != chosen for chosen in selection), prompt


def test_unreadable_judge_answers_are_asked_again(run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that is not two ratings leaves the cell empty and is not cached: the next run asks again."""
    cfg = SteerConfig(
        run=run,
        evaluate=True,
        eval_features=[3],
        strengths=[0.0],
        heldout_tokens=16,
        max_new_tokens=2,
        prompts=["the cat", "a dog"],
        cache_root=str(tmp_path),
        out=str(tmp_path / "o"),
        device="cpu",
    )
    garbled = Script(rule=lambda body: ("concept: high, fluency: fine", None))
    with standin_env(garbled, monkeypatch, "sk-judge"):
        (row,) = csv.DictReader((evaluated(cfg).local() / "steering.csv").open())
    assert garbled.requests == 2 and row["concept"] == ""
    script = Script(rule=judge_rule)
    with standin_env(script, monkeypatch, "sk-judge"):
        (row,) = csv.DictReader((evaluated(cfg).local() / "steering.csv").open())
    assert script.requests == 2 and row["concept"] != ""


def test_judge_cost_is_checked_before_any_request_and_the_grid_is_kept(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An estimate above --max-cost sends nothing, and the grid computed before it is written, judge columns empty."""
    cfg = SteerConfig(
        run=run,
        evaluate=True,
        eval_features=[3],
        strengths=[0.0, 8.0],
        heldout_tokens=32,
        max_new_tokens=3,
        prompts=["the cat"],
        judge_model="gpt-4o",
        max_cost=1e-9,
        cache_root=str(tmp_path),
        out=str(tmp_path / "o"),
        device="cpu",
    )
    script = Script(rule=judge_rule)
    with standin_env(script, monkeypatch, "sk-judge"):
        with pytest.raises(UserError, match=r"above --max-cost .* the judge's ratings is written to"):
            evaluated(cfg)
    assert script.requests == 0
    rows = list(csv.DictReader((tmp_path / "o" / "steering.csv").open()))
    assert [(r["feature"], float(r["strength"])) for r in rows] == [("3", 0.0), ("3", 8.0)]
    assert float(rows[1]["kl"]) > 0 and all(r["concept"] == r["fluency"] == "" for r in rows)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["judge"].startswith("refused")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def test_a_run_killed_while_writing_leaves_the_old_result_or_none(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL with steering.csv and generations.jsonl of the new grid written, the plot not yet: the folder is the
    previous result, byte for byte, or absent; no visible half-written folder is left beside it."""
    out = tmp_path / "steer"
    args = [
        "steer", run, "--evaluate", "--eval-feature", "3", "--strength", "0", "--heldout-tokens", "16",
        "--max-new-tokens", "2", "--prompt", "the cat", "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no judge: the grid alone
    env = {**os.environ, "SAE_PIPE_QUIET": "1"}

    def killed(*more: str) -> None:
        command = [sys.executable, "-m", "tests.support.killpoint", "steer-write", "1", "--", *args, *more]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stdout + proc.stderr

    killed("--strength", "8")
    assert not out.exists()
    assert CliRunner().invoke(app, args).exit_code == 0
    before = snapshot(out)
    assert set(before) == {"steering.csv", "generations.jsonl", "dose_response.png", "summary.json", "steering.html"}
    killed("--strength", "8")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["steer"]
