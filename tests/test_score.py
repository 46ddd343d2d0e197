"""Scoring explanations: a run of exact token detectors judged by a rule-based stand-in model (the truth is
known), the train/test split on the real tables, the client's cache, retries, cost cap and key hygiene,
the metrics against hand computation, the report and the comparison across runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache.reader import ActivationCache
from pipeline.infra.errors import UserError
from pipeline.interpret import stage as interpret
from pipeline.interpret.checks import check_config
from pipeline.interpret.explain import parse_answer
from pipeline.interpret.score import parse_verdicts, probabilities
from pipeline.interpret.splits import scoring_rows
from pipeline.interpret.stats import auc, bootstrap_mean, feature_scores, summarize_scores
from pipeline.sae.folder import load_sae
from tests.support.interpret_run import icfg, token_run, train_run
from tests.support.standin_openai import Script, rule_hits, rule_model, standin_env

KEY = "sk-test-SCORER-SECRET-0123456789"
SCORING = {"score": ["detection", "fuzzing"], "features": 40, "min_count": 3}


@pytest.fixture(scope="module")
def tokens(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, str]]:
    return token_run(tiny_llama, tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def scored(
    tokens: tuple[str, dict[int, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], Script]:
    """The token run explained and scored (with the shuffled control) through the stand-in."""
    out = tmp_path_factory.mktemp("scored") / "out"
    script = Script(rule=rule_model)
    with pytest.MonkeyPatch.context() as monkeypatch, standin_env(script, monkeypatch, KEY):
        summary = interpret.run(icfg(tokens[0], out, control=True, **SCORING)).summaries[0]
    return out, summary, script


def test_correct_explanations_score_high_shuffled_ones_at_chance(
    tokens: tuple[str, dict[int, str]], scored: tuple[Path, dict[str, Any], Script]
) -> None:
    out, summary, _ = scored
    words = tokens[1]
    explanations = pq.read_table(out / "explanations.parquet").to_pandas().set_index("latent")
    assert len(explanations) >= 20 and all(explanations.explanation[j] == words[j] for j in explanations.index)
    scores = summary["scores"]
    for scorer in ("detection", "fuzzing"):
        right, shuffled = scores[scorer], scores[f"{scorer}_shuffled"]
        assert right["features"] == shuffled["features"] == len(explanations)
        assert right["balanced_accuracy_low"] > 0.9, right  # the truth: each latent is exactly its token
        assert right["auc_low"] > 0.9, right
        assert shuffled["balanced_accuracy_low"] <= 0.5 <= shuffled["balanced_accuracy_high"], shuffled
        assert shuffled["auc_low"] <= 0.5 <= shuffled["auc_high"], shuffled


def test_detection_scores_equal_the_rule_applied_by_hand(scored: tuple[Path, dict[str, Any], Script]) -> None:
    """Every step between the tables and the numbers (batching, shuffling, prompts, parsing, metrics)."""
    out, summary, _ = scored
    examples = pq.read_table(out / "examples.parquet").to_pandas()
    features = pq.read_table(out / "features.parquet").to_pandas().set_index("latent")
    explanations = pq.read_table(out / "explanations.parquet").to_pandas().set_index("latent").explanation
    by_hand = {}
    for latent, explanation in explanations.items():
        test = examples[(examples.latent == latent) & (examples.split == "test")]
        texts = [" ".join((p + t + s).split()) for p, t, s in zip(test.prefix, test.token, test.suffix)]
        said = np.array([rule_hits(text, explanation.lower().split(), False) > 0 for text in texts])
        active = test.activation.to_numpy() > 0
        by_hand[latent] = (said[active].mean() + (~said[~active]).mean()) / 2
        assert features.detection_balanced_accuracy[latent] == pytest.approx(by_hand[latent])
        assert features.detection_n[latent] == len(test) == 2 * active.sum()
    entry = summary["scores"]["detection"]
    assert entry["balanced_accuracy"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-4)
    assert entry["balanced_accuracy_low"] <= entry["balanced_accuracy"] <= entry["balanced_accuracy_high"]


def test_fuzzing_marks(scored: tuple[Path, dict[str, Any], Script]) -> None:
    """Activating excerpts: their own token and every token at >= 0.3 x the feature's max; silent ones:
    as many random tokens."""
    out, _, _ = scored
    verdicts = pq.read_table(out / "scores.parquet").to_pandas()
    fuzz = verdicts[(verdicts.scorer == "fuzzing") & ~verdicts.control]
    examples = pq.read_table(out / "examples.parquet").to_pandas()
    test = examples[examples.split == "test"].set_index(["latent", "row"])
    max_act = pq.read_table(out / "features.parquet").to_pandas().max_act
    for record in fuzz.itertuples():
        example = test.loc[(record.latent, record.row)]
        if record.label:
            expected = {int(example.center)} | set(np.flatnonzero(example.window_acts >= 0.3 * max_act[record.latent]))
            assert set(record.marked) == expected
        else:
            assert len(record.marked) >= 1 and not np.any(example.window_acts)


def test_no_test_example_shares_a_sequence_with_the_explainer(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the real tables of a trained run: sequences read back from the cache, the explainer's prompts
    built only from train examples, every verdict on a test example."""
    run = train_run(tiny_llama, tmp_path / "run")
    script = Script(rule=rule_model)
    with standin_env(script, monkeypatch, KEY):
        interpret.run(icfg(run, tmp_path / "out", features=12, score=["detection"], concurrency=1))
    examples = pq.read_table(tmp_path / "out" / "examples.parquet").to_pandas()
    cache = ActivationCache.open(load_sae(run)[1]["cache"]["path"])
    sequence = np.concatenate(
        [cache.read(s["index"], "heldout/sequence_index")[cache.read(s["index"], "heldout/seq")] for s in cache.shards]
    )
    np.testing.assert_array_equal(examples.sequence.to_numpy(), sequence[examples.row.to_numpy()])
    train, test = examples[examples.split == "train"], examples[examples.split == "test"]
    assert len(test) > 100 and set(test.kind) >= {"q0", "q9", "random"}
    assert set(train.sequence).isdisjoint(set(test.sequence))
    shown = [b["messages"][1]["content"] for b in script.bodies if "interpret features" in b["messages"][0]["content"]]
    assert len(shown) == 12
    verdicts = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    keys = set(zip(test.latent, test.row))
    assert len(verdicts) and all(k in keys for k in zip(verdicts.latent, verdicts.row))
    sampled = pq.read_table(tmp_path / "out" / "features.parquet").to_pandas().query("sampled == True").latent
    for latent, text in zip(sorted(sampled), shown):  # one request at a time: prompts in latent order
        contexts = train[(train.latent == latent) & (train.kind != "random")][:20]
        assert re.findall(r"\(activation ([\d.]+)\)", text) == [f"{a:.2f}" for a in contexts.activation]


def test_rerun_sends_nothing_and_the_key_stays_out(
    tokens: tuple[str, dict[int, str]],
    scored: tuple[Path, dict[str, Any], Script],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out, first, script = scored
    before = script.requests
    with standin_env(script, monkeypatch, KEY):
        again = interpret.run(icfg(tokens[0], out, control=True, **SCORING)).summaries[0]
    assert script.requests == before  # not one HTTP request
    assert again["scorer_from_cache"] == again["scorer_prompts"] == first["scorer_prompts"]
    assert again["scorer_requests_sent"] == 0 and again["scorer_cost_usd"] == 0
    assert again["scores"] == first["scores"]
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    for path in out.parent.parent.rglob("*"):  # outputs, answer cache, the run and its cache
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_429_then_200_is_retried(
    tokens: tuple[str, dict[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(failures=[429], rule=rule_model)
    with standin_env(script, monkeypatch, KEY):
        summary = interpret.run(
            icfg(tokens[0], tmp_path / "out", concurrency=1, features=3, score=["detection"])
        ).summaries[0]
    assert summary["failed"] == summary["scorer_failed"] == summary["scorer_malformed"] == 0
    assert script.requests == 1 + summary["requests_sent"] + summary["scorer_requests_sent"]  # one retry


def test_max_cost_below_the_estimate_stops_before_any_request(
    tokens: tuple[str, dict[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = Script(rule=rule_model)
    with standin_env(script, monkeypatch, KEY), pytest.raises(UserError, match="is above --max-cost"):
        interpret.run(icfg(tokens[0], tmp_path / "out", max_cost=0.001, **SCORING))
    assert script.requests == 0 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "cost estimate, explain:" in err and "cost estimate, score:" in err and "gpt-4o-mini" in err


def test_without_a_key_scoring_is_skipped(
    tokens: tuple[str, dict[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    summary = interpret.run(icfg(tokens[0], tmp_path / "out", **SCORING)).summaries[0]
    assert summary["scores"] == "skipped" and summary["explanations"] == "skipped"
    assert "skipped: OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert "Scores</h2><p class='muted'>skipped" in (tmp_path / "out" / "report.html").read_text()
    assert not (tmp_path / "out" / "scores.parquet").exists()


def test_report_and_comparison_show_the_scores(
    tokens: tuple[str, dict[int, str]],
    scored: tuple[Path, dict[str, Any], Script],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, summary, script = scored
    html = (out / "report.html").read_text()
    features = pq.read_table(out / "features.parquet").to_pandas()
    shown = features[features.detection_balanced_accuracy.notna()]
    assert "balanced accuracy vs frequency" in html and html.count("<circle") >= 2 * len(shown)
    assert f"<th>detection</th><td>{summary['scores']['detection']['features']}</td>" in html
    for row in shown.itertuples():
        assert f"detection {row.detection_balanced_accuracy:.2f}" in html
    with standin_env(script, monkeypatch, KEY):  # from the answer cache: the same numbers again
        page = interpret.run(icfg(tokens[0], tmp_path / "cmp", control=True, **SCORING), [tokens[0]]).comparison
    table = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert len(table) == 2 and "detection_shuffled_balanced_accuracy_low" in table[0]
    assert f"{summary['scores']['fuzzing']['balanced_accuracy']}" in table[1]
    assert "report.html" in Path(page).read_text()


def test_metrics_by_hand() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    verdicts = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.3])
    m = feature_scores(labels, verdicts, probs)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # 16 pairs: positives 0.9, 0.8 beat all; 0.6 beats 3 (loses to 0.7); 0.3 beats 2, ties 1 (0.3)
    assert m["auc"] == pytest.approx((4 + 4 + 3 + 2 + 0.5) / 16)
    silent = feature_scores(labels, np.zeros(8, dtype=int), None)  # the scorer never says "active"
    assert silent["precision"] is None  # 0 / 0: undefined, not 0
    assert silent["recall"] == 0 and silent["f1"] == 0 and silent["balanced_accuracy"] == 0.5
    # F1 = 2 TP / (2 TP + FP + FN): TP 1, FP 3, FN 3 -> 2 / 8, with P = R = 1/4
    assert feature_scores(labels, np.array([1, 0, 0, 0, 1, 1, 1, 0]), None)["f1"] == pytest.approx(0.25)
    assert auc(np.array([0.5]), np.array([])) is None
    mean, low, high = bootstrap_mean([0.0] * 50 + [1.0] * 50, 2000, 0)
    assert mean == 0.5 and 0.39 < low < 0.42 and 0.58 < high < 0.61  # +-1.96 x sqrt(0.25 / 100)
    assert bootstrap_mean([0.7], 100, 0) == (0.7, 0.7, 0.7)
    undefined = {"balanced_accuracy": 0.5, "precision": None, "recall": 0.0, "f1": 0.0, "auc": None}
    defined = {"balanced_accuracy": 1.0, "precision": 0.8, "recall": 1.0, "f1": 0.9, "auc": None}
    entry = summarize_scores({("detection", False): {1: undefined, 2: defined}}, 200, 0)["detection"]
    assert entry["precision"] == 0.8 and entry["precision_undefined"] == 1  # the mean of the defined one only
    assert entry["balanced_accuracy"] == 0.75 and "balanced_accuracy_undefined" not in entry and "auc" not in entry
    alone = summarize_scores({("detection", False): {1: undefined}}, 200, 0)["detection"]
    assert alone["precision"] is None and alone["precision_undefined"] == 1


def test_verdicts_and_probabilities_parse() -> None:
    assert parse_verdicts("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_verdicts("[1, 0]", 3) is None and parse_verdicts("[1, 2, 0]", 3) is None
    assert parse_verdicts("[true, false, true]", 3) is None and parse_verdicts("no", 3) is None
    assert parse_verdicts("For three excerpts: [1, 0, 1]. Mine: [0, 0, 1]", 3) is None  # which list is the answer?
    assert parse_verdicts('["1", "0"]', 2) is None and parse_verdicts("[0.5, 1]", 2) is None
    tokens = [
        {"token": "[", "top": {}},
        {"token": "1", "top": {"1": np.log(0.8), "0": np.log(0.2)}},
        {"token": ", ", "top": {}},
        {"token": "0", "top": {"0": np.log(0.6), " 1": np.log(0.3), "x": np.log(0.1)}},
        {"token": "]", "top": {}},
    ]
    assert probabilities(tokens, 2) == pytest.approx([0.8, 1 / 3])
    assert probabilities(tokens, 3) is None and probabilities(None, 2) is None
    assert json.loads(json.dumps(probabilities(tokens, 2)))  # plain floats


def test_split_never_gives_one_document_to_both_sides() -> None:
    """Six packed sequences of four tokens; document 1 runs across sequences 0-2 and document 3 across 3-4, so
    the groups are A = {0, 1, 2}, B = {3, 4}, C = {5}. With share 0.5 (3 sequences wanted), taking groups in
    a random order while they fit gives A (when A comes first) or B + C (otherwise): by hand."""
    sequence = np.repeat(np.arange(6), 4)
    doc = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5])
    outcomes = set()
    for seed in range(40):
        test = scoring_rows(sequence, doc, 0.5, seed)
        assert set(doc[test]).isdisjoint(set(doc[~test])), seed
        outcomes.add(tuple(np.unique(sequence[test])))
    assert outcomes == {(0, 1, 2), (3, 4, 5)}
    linked = np.zeros(8, dtype=int)  # two sequences, one document: nothing can be held out without sharing it
    assert not scoring_rows(np.repeat([0, 1], 4), linked, 0.5, 0).any()


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("test_share", float("nan"), "--test-share nan must be in [0, 1)"),
        ("test_share", 1.0, "--test-share 1.0 must be in [0, 1)"),
        ("bootstrap", 0, "--bootstrap 0 must be between 100 and 100,000"),
        ("bootstrap", 10**12, "--bootstrap 1000000000000 must be between 100 and 100,000"),
        ("fuzz_threshold", 0.0, "--fuzz-threshold 0.0 must be in (0, 1]"),
        ("fuzz_threshold", float("inf"), "--fuzz-threshold inf must be in (0, 1]"),
        ("score_hard", -0.1, "--score-hard -0.1 must be in [0, 1]"),
        ("score_hard", 1.5, "--score-hard 1.5 must be in [0, 1]"),
        ("score_per_quantile", 0, "--score-per-quantile 0 must be at least 1"),
        ("max_cost", float("nan"), "--max-cost nan must be 0 or more"),
        ("max_cost", float("inf"), "--max-cost inf must be 0 or more"),
        ("concurrency", 0, "--concurrency 0 must be at least 1"),
        ("seed", -1, "--seed -1 must be 0 or more"),
        ("theta", float("nan"), "--theta nan must be a finite number"),
        ("test_share", 0.0, "--test-share 0 keeps none"),
    ],
)
def test_settings_out_of_range_are_refused(setting: str, value: float, message: str) -> None:
    with pytest.raises(UserError) as info:
        check_config(icfg("some/run", Path("out"), score=["detection"], **{setting: value}))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_settings_in_range_pass() -> None:
    check_config(icfg("some/run", Path("out"), score=["detection"], test_share=0.5, bootstrap=100, fuzz_threshold=1.0))
    check_config(icfg("some/run", Path("out"), test_share=0.0, score_hard=1.0, theta=None))  # no --score: 0 is fine


def _flaky(rule: Any) -> tuple[Any, dict[str, int]]:
    """``rule``, except that every scorer prompt whose excerpt list starts with an odd-length first excerpt
    gets a malformed answer the first time it is asked. Returns the rule and its tally of malformed answers."""
    seen: set[str] = set()
    tally = {"malformed": 0}

    def answer(body: dict[str, Any]) -> tuple[str, list[float] | None]:
        user = body["messages"][-1]["content"]
        first = re.search(r"^Excerpt 1: (.*)$", user, re.MULTILINE)
        if first and len(first.group(1)) % 2 and user not in seen:
            seen.add(user)
            tally["malformed"] += 1
            return "Excerpt 1: yes. Excerpt 2: no.", None
        return rule(body)

    return answer, tally


def test_rerun_asks_malformed_scorer_answers_again_and_counts_this_run(
    tokens: tuple[str, dict[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule, tally = _flaky(rule_model)
    script = Script(rule=rule)
    settings = {"features": 6, "score": ["detection"], "min_count": 3, "concurrency": 1}
    runs, sent = [], []
    with standin_env(script, monkeypatch, KEY):
        for _ in range(3):
            before = script.requests
            runs.append(interpret.run(icfg(tokens[0], tmp_path / "out", **settings)).summaries[0])
            sent.append(script.requests - before)
    first, second, third = runs
    prompts, malformed = first["scorer_prompts"], tally["malformed"]
    assert 0 < malformed < prompts and sent[0] == first["requests_sent"] + prompts  # explainer + scorer requests
    assert (first["scorer_requests_sent"], first["scorer_from_cache"], first["scorer_malformed"]) == (
        prompts,
        0,
        malformed,
    )
    # the re-run asks exactly the malformed prompts again (now answered well) and serves the rest from the cache
    assert sent[1] == malformed and second["requests_sent"] == 0 and second["from_cache"] == first["features_asked"]
    assert (second["scorer_requests_sent"], second["scorer_from_cache"], second["scorer_malformed"]) == (
        malformed,
        prompts - malformed,
        0,
    )
    assert second["scorer_failed"] == second["scorer_not_sent"] == 0
    assert sent[2] == 0 and (third["scorer_requests_sent"], third["scorer_from_cache"]) == (0, prompts)
    verdicts = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    assert set(verdicts.status) == {"ok"} and verdicts.cached.all()


def test_a_scorer_that_never_says_active_has_undefined_precision(
    tokens: tuple[str, dict[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(body: dict[str, Any]) -> tuple[str, list[float] | None]:
        if "interpret features" in body["messages"][0]["content"]:
            return rule_model(body)
        n = len(re.findall(r"^Excerpt \d+: ", body["messages"][-1]["content"], re.MULTILINE))
        return json.dumps([0] * n), None

    with standin_env(Script(rule=never), monkeypatch, KEY):
        summary = interpret.run(
            icfg(tokens[0], tmp_path / "out", features=4, score=["detection"], min_count=3)
        ).summaries[0]
    entry = summary["scores"]["detection"]
    assert entry["features"] == 4 and entry["precision"] is None and entry["precision_undefined"] == 4
    assert entry["recall"] == 0 and entry["balanced_accuracy"] == 0.5
    features = pq.read_table(tmp_path / "out" / "features.parquet").to_pandas()
    scored = features[features.detection_n.notna()]
    assert len(scored) == 4 and scored.detection_precision.isna().all() and (scored.detection_recall == 0).all()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<td>n/a</td>" in html


def test_real_answers_of_a_small_local_model_parse_as_a_reader_reads_them() -> None:
    """Answers recorded from SmolLM2-135M behind llama-cpp-python's server (tests/fixtures/real_answers.json;
    each ``expected`` written by hand after reading the answer)."""
    recorded = json.loads((Path(__file__).parent / "fixtures" / "real_answers.json").read_text())
    assert len(recorded) >= 3 and {r["role"] for r in recorded} >= {"explainer", "detection"}
    for r in recorded:
        got = parse_answer(r["answer"]) if r["role"] == "explainer" else parse_verdicts(r["answer"], r["n"])
        assert got == r["expected"], (r["why"], got)
