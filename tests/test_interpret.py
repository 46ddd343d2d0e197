"""Interpret on a tiny model: tables against a dense brute force, the explainer against a stand-in
server on loopback (retries, answer cache, malformed answers, failures), and the HTML report."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.reader import ActivationCache
from pipeline.infra.errors import UserError
from pipeline.interpret import stage as interpret
from pipeline.interpret.explain import parse_answer
from pipeline.interpret.splits import scoring_rows
from pipeline.live.subject import load_llm
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.sae.folder import load_sae
from tests.support.interpret_run import icfg, train_run
from tests.support.standin_openai import Script, standin_env

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(scope="module")
def run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_run(tiny_llama, tmp_path_factory.mktemp("interp"))


def test_tables_match_a_dense_brute_force(run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    summary = interpret.run(icfg(run, tmp_path / "out", explainer="none")).summaries[0]
    features = pq.read_table(tmp_path / "out" / "features.parquet").to_pandas()
    examples = pq.read_table(tmp_path / "out" / "examples.parquet").to_pandas()
    sae, cfg = load_sae(run)
    cache = ActivationCache.open(cfg["cache"]["path"])
    rows = np.concatenate([r[:, 0] for _, r in cache.heldout_rows([2])])
    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(rows).float())
    dense = torch.zeros(len(rows), 128).scatter(1, latents.indices, latents.acts).numpy()  # (R, N)
    assert summary["tokens_scanned"] == len(rows)
    np.testing.assert_array_equal(features["count"].to_numpy(), (dense > 0).sum(0))
    sequence = np.concatenate(  # each row's packed sequence and document, read from the cache's own arrays
        [cache.read(s["index"], "heldout/sequence_index")[cache.read(s["index"], "heldout/seq")] for s in cache.shards]
    )
    doc = np.concatenate([cache.read(s["index"], "heldout/doc") for s in cache.shards])
    train = ~scoring_rows(sequence, doc, 0.5, 0)  # the explainer's side of the split (default test_share and seed)
    np.testing.assert_array_equal(features["train_count"].to_numpy(), (dense[train] > 0).sum(0))
    for latent in np.flatnonzero((dense > 0).sum(0) >= 3)[:20]:
        values = np.sort(dense[:, latent][dense[:, latent] > 0])[::-1]
        seen = np.sort(dense[train, latent][dense[train, latent] > 0])[::-1]
        top = examples[(examples.latent == latent) & (examples.kind == "top")].sort_values("rank")
        assert set(top.split) <= {"train"} and train[top.row.to_numpy()].all()
        np.testing.assert_allclose(top.activation.to_numpy(), seen[: len(top)], rtol=1e-5)
        np.testing.assert_allclose(top.activation.to_numpy(), dense[top.row.to_numpy(), latent], rtol=1e-5)
        row = features.iloc[latent]
        assert row.max_act == pytest.approx(values[0], rel=1e-5)
        for q in (10, 50, 90):
            assert row[f"q{q:02d}"] == pytest.approx(np.quantile(values, q / 100), rel=1e-4)
        quiet = examples[(examples.latent == latent) & (examples.kind == "random")]
        assert (dense[quiet.row.to_numpy(), latent] == 0).all()
    _check_logit_effects(features, sae.W_dec, cache)


def _check_logit_effects(features, w_dec: torch.Tensor, cache: ActivationCache) -> None:  # noqa: ANN001
    """Each latent's first promoted token is the argmax of its decoder row through the model's own norm
    gain and head; output scores exist exactly for the latents that fired."""
    model, _ = load_llm(cache, torch.device("cpu"))
    tokenizer = load_tokenizer(resolve_model(cache.manifest["spec"]["model"]["name"]))
    with torch.no_grad():
        readout = model.lm_head(model.model.norm.weight * w_dec)  # (N, V)
    for latent in (0, 7, 64, 127):
        assert features.promotes[latent][0] == tokenizer.decode([int(readout[latent].argmax())])
        assert features.suppresses[latent][0] == tokenizer.decode([int(readout[latent].argmin())])
        assert list(features.promotes_logit[latent]) == sorted(features.promotes_logit[latent], reverse=True)
    np.testing.assert_array_equal(features.output_score.notna().to_numpy(), features["count"].to_numpy() > 0)


def test_explainer_with_retries_cache_and_malformed(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    answers = [
        '{"category": "high-level", "score": 5, "explanation": "Lists."}',
        "I cannot tell, sorry.",
        "Feature category: Low-level\nScore: 3\nExplanation: punctuation",
    ]
    script = Script(failures=[429, 500], answers=answers)
    with standin_env(script, monkeypatch, KEY):
        first = interpret.run(icfg(run, tmp_path / "out")).summaries[0]
        sent = script.requests
        # requests 3..8 got answers 2, 0, 1, 2, 0, 1: two malformed, asked again now as requests 9 and 10,
        # which get answers 2 and 0, both good
        second = interpret.run(icfg(run, tmp_path / "out")).summaries[0]
        resent = script.requests - sent
        third = interpret.run(icfg(run, tmp_path / "out")).summaries[0]
    assert sent == 6 + 2 and resent == 2 and script.requests == sent + resent  # the third run sent nothing
    assert first["explained"] == 4 and first["malformed"] == 2 and first["requests_sent"] == 6
    assert first["from_cache"] == 0 and first["failed"] == first["not_sent"] == 0
    assert first["prompt_tokens"] == 600 and first["cost_usd"] == pytest.approx(600 * 2.5e-6 + 120 * 1e-5)
    assert (second["requests_sent"], second["from_cache"], second["malformed"], second["explained"]) == (2, 4, 0, 6)
    assert second["prompt_tokens"] == 200 and second["cost_usd"] == pytest.approx(200 * 2.5e-6 + 40 * 1e-5)
    assert (third["requests_sent"], third["from_cache"], third["malformed"], third["cost_usd"]) == (0, 6, 0, 0)
    table = pq.read_table(tmp_path / "out" / "explanations.parquet").to_pandas()
    assert set(table.status) == {"ok"} and table.cached.all() and len(table) == 6
    _assert_key_nowhere(tmp_path, capsys)


def test_failing_api_keeps_answers_and_reports_missing(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = Script(always_fail=503)
    with standin_env(script, monkeypatch, KEY):
        summary = interpret.run(icfg(run, tmp_path / "out", concurrency=1, max_retries=1)).summaries[0]
    assert summary["failed"] == 3 and summary["not_sent"] == 3  # stopped after 3 failed features
    assert script.requests == 3 * 2  # each failed feature: 1 try + 1 retry
    assert "explainer stopped" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "features.parquet").exists()


def test_bad_key_is_one_clear_line(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = Script(always_fail=401)
    with standin_env(script, monkeypatch, KEY):
        summary = interpret.run(icfg(run, tmp_path / "out", concurrency=1)).summaries[0]
    assert summary["failed"] == 1 and summary["not_sent"] == 5 and script.requests == 1
    assert "refused the key" in capsys.readouterr().err
    _assert_key_nowhere(tmp_path, capsys)


def test_nothing_eligible_sends_nothing_and_says_so(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = Script(answers=['{"category": "high-level", "score": 5, "explanation": "Lists."}'])
    with standin_env(script, monkeypatch, KEY):
        summary = interpret.run(icfg(run, tmp_path / "out", min_count=10**9)).summaries[0]
    assert script.requests == 0 and summary["features_asked"] == 0 and "explanations" not in summary
    assert "nothing to explain" in capsys.readouterr().err


def test_without_key_tables_and_report_are_built(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    summary = interpret.run(icfg(run, tmp_path / "out")).summaries[0]
    assert summary["explanations"] == "skipped"
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "features.parquet",
        "examples.parquet",
        "report.html",
        "summary.json",
    }


def test_report_escapes_corpus_text_and_renders(run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    interpret.run(icfg(run, tmp_path / "out", report_features=12, random_examples=20))
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    page = (tmp_path / "out" / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="feature"') >= 10 and "<mark>" in dom and "&lt;script&gt;" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    highlight = np.abs(pixels - np.array([0xFF, 0xD5, 0x4F])).sum(-1) < 30  # <mark> background
    assert highlight.sum() > 50


def test_parse_answer() -> None:
    assert parse_answer('{"category": "Low-level", "score": 4, "explanation": "x"}')["category"] == "low-level"
    assert parse_answer("Feature category: High-level\nScore: 2\nExplanation: y")["score"] == 2
    assert parse_answer('{"category": "mid-level", "score": 4}') is None
    assert parse_answer("no idea") is None


@pytest.mark.parametrize(
    "answer, expected",
    [
        # the prompt's template echoed back: not an answer, whatever its first alternative says
        (
            '{"category": "low-level" | "high-level" | "undiscernible", "score": 1-5, "explanation": "<one sentence>"}',
            None,
        ),
        ('"category": "low-level" | "high-level" | "undiscernible",\n"score": 4,\n"explanation": "Numbers."', None),
        # JSON with a trailing comma: the values are unambiguous, and none of the syntax leaks into the text
        (
            '{\n"category": "high-level",\n"score": 4,\n"explanation": "Extract information from text.",}',
            ("high-level", 4, "Extract information from text."),
        ),
        ('Category: high-level\nScore: 4\nExplanation: Extract information.", "score": 4}', None),
        ('{"category": "low-level", "score": 1.5, "explanation": "Commas."}', None),  # not 1: malformed
        ("Category: low-level\nScore: 1.5\nExplanation: Commas.", None),
        ('{"category": "low-level", "score": true, "explanation": "Commas."}', None),
        ('{"category": "low-level", "score": 4.0, "explanation": "Commas."}', ("low-level", 4, "Commas.")),
        (
            '**Category:** Low-level\n**Score:** 4/5\n**Explanation:** The word "the".',
            ("low-level", 4, 'The word "the".'),
        ),
        ('{"category": "low-level", "score": 3, "explanation": ""}', None),  # no explanation
        ("Category: low-level\nCategory: high-level\nScore: 3\nExplanation: Both.", None),  # two answers
    ],
)
def test_parse_answer_is_strict_where_leniency_invents(answer: str, expected: tuple | None) -> None:
    parsed = parse_answer(answer)
    assert (parsed and (parsed["category"], parsed["score"], parsed["explanation"])) == expected


def test_bad_inputs(run: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an SAE run folder"):
        interpret.run(icfg(str(tmp_path), tmp_path / "out"))
    with pytest.raises(UserError, match="unknown explainer"):
        interpret.run(icfg(run, tmp_path / "out", explainer="claude"))


def _assert_key_nowhere(root: Path, capsys: pytest.CaptureFixture) -> None:
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_route_tables_report_unscaled_activations_and_layers(tmp_path: Path) -> None:
    """A hard-routed RouteSAE encodes w * x; its tables hold a / w and the layer each row went to."""
    import numpy as np
    import torch

    from pipeline.cache.reader import ActivationCache
    from pipeline.interpret.features import collect
    from pipeline.sae.archs.route import RouteSAE
    from pipeline.sae.interface import SaeConfig
    from tests.support.caches import synthetic_cache

    cache = ActivationCache.open(synthetic_cache(tmp_path, [64], layers=(1, 2, 3), d=16, heldout_rows=40))
    torch.manual_seed(0)
    sae = RouteSAE(SaeConfig("route", 16, 64, 4, [1, 2, 3]))
    acts = collect(sae, [1, 2, 3], cache, 0, 16, None, None)
    xs = torch.from_numpy(np.concatenate([a for _, a in cache.heldout_rows([1, 2, 3])])).float()  # (R, L, D)
    with torch.no_grad():
        logits = xs.sum(1) @ sae.router.weight.T  # (R, L), by hand
        w = logits.softmax(-1)
        choice = w.argmax(-1)
        rows = torch.arange(len(xs))
        wx = xs[rows, choice] * w[rows, choice][:, None]
        pre = torch.relu((wx - sae.sae.b_dec) @ sae.sae.W_enc.T + sae.sae.b_enc)  # (R, N) dense
        top = pre.topk(4)
        dense = torch.zeros_like(pre).scatter(1, top.indices, top.values) / w[rows, choice][:, None]
    np.testing.assert_array_equal(acts.row_layer, choice.numpy())
    got = np.zeros(dense.shape, np.float32)
    got[acts.row, acts.latent] = acts.act
    np.testing.assert_allclose(got, dense.numpy(), rtol=1e-4, atol=1e-5)


def test_a_killed_run_leaves_the_previous_result_or_none(run: str, tmp_path: Path) -> None:
    """SIGKILL after the tables and summary.json of a new run are written, before its report: the folder still
    holds the previous run's files byte for byte, and a first run killed there leaves no folder at all."""
    import os
    import signal
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SAE_PIPE_QUIET": "1"}
    env.pop("OPENAI_API_KEY", None)
    old = interpret.run(icfg(run, tmp_path / "out", explainer="none", logit_effects=False)).summaries[0]
    before = {p.name: p.read_bytes() for p in Path(old["out"]).iterdir()}
    for out in ("out", "fresh"):
        argv = [run, "--out", str(tmp_path / out), "--cache-root", str(tmp_path), "--device", "cpu"]
        argv += ["--explainer", "none", "--seed", "1"]  # another sample of latents: other tables
        proc = subprocess.run(
            [sys.executable, "-m", "tests.support.killpoint", "interpret-report", "1", "--", "interpret", *argv],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert set(before) >= {"features.parquet", "examples.parquet", "summary.json", "report.html"}
    assert not (tmp_path / "fresh").exists()
