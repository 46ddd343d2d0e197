"""benchmarks/archs.py's bookkeeping on hand-made tables: Pareto frontier, log-L0 interpolation, the bar, the
TopK family scored at a wider k, where a partial run's CSV and picture go."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import archs, archs_report
from benchmarks.archs import load_results, quality
from benchmarks.archs_report import at_l0, bar, pareto, wide_table
from pipeline.infra.files import Folder
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.folder import save_weights, write_cfg
from pipeline.sae.interface import SaeConfig
from tests.support.caches import synthetic_cache


def test_pareto_frontier_of_a_hand_made_table() -> None:
    points = [
        (16.0, 0.30),  # 0: front (lowest L0)
        (32.0, 0.20),  # 1: front
        (32.0, 0.25),  # 2: same L0, worse value than 1
        (40.0, 0.20),  # 3: same value as 1 at a higher L0
        (64.0, 0.12),  # 4: front
        (128.0, 0.13),  # 5: beaten by 4 on both
        (128.0, 0.08),  # 6: front
        (20.0, math.nan),  # 7: no KL measured: never on it
        (64.0, 0.12),  # 8: a tie with 4: neither beats the other
    ]
    assert pareto(points) == [0, 1, 4, 8, 6]


def test_at_l0_interpolates_in_log_l0() -> None:
    points = [(16.0, 0.4), (64.0, 0.2)]
    assert at_l0(points, 32.0) == pytest.approx(0.3)  # log 32 is halfway between log 16 and log 64
    assert at_l0(points, 64.0) == pytest.approx(0.2)
    assert at_l0(points, 8.0) is None and at_l0(points, 100.0) is None  # never extrapolated


def _run(name: str, pair: str, target: float | None, l0: float, fvu: float, tps: float, dead: float) -> dict[str, Any]:
    return {"name": name, "pair": pair, "target": target, "l0": l0, "fvu": fvu, "tokens_per_s": tps, "dead_share": dead}


def test_bar_against_interpolated_peer_runs() -> None:
    results = [
        _run("standard", "SAELens Standard", 32, 32.0, 0.29, 3000.0, 0.005),
        _run("SAELens Standard", "", None, 16.0, 0.4, 1000.0, 0.0),
        _run("SAELens Standard", "", None, 64.0, 0.2, 900.0, 0.0),
        _run("gated", "SAELens Gated", 32, 32.0, 0.31, 5000.0, 0.0),  # worse than the peer's 0.3
        _run("SAELens Gated", "", 32, 32.0, 0.30, 1000.0, 0.0),
        _run("standard", "SAELens Standard", 64, 64.0, 0.1, 1.0, 0.5),  # not at the bar's L0: ignored
    ]
    results += [_run("multi", "sparsify", 32, 32.0, 0.2, 9000.0, 0.0)]  # a peer run per target: timed at 32
    results += [_run("sparsify", "", t, t, 0.3, tps, 0.0) for t, tps in ((16, 9000.0), (32, 4500.0), (128, 1500.0))]
    standard, gated, multi = bar(results)
    assert standard["peer_fvu"] == pytest.approx(0.3) and standard["fvu_ok"]
    assert standard["speedup"] == pytest.approx(3000 / 950) and standard["pass"]
    assert not gated["fvu_ok"] and not gated["pass"] and gated["speedup"] == pytest.approx(5.0)
    assert multi["speedup"] == pytest.approx(2.0) and not multi["pass"]  # the mean of all three would say 1.8x


def test_bar_reads_each_peer_learning_rate_apart_and_takes_the_best() -> None:
    results = [
        _run("batchtopk", "SAELens BatchTopK", 32, 32.0, 0.12, 9000.0, 0.0),
        _run("SAELens BatchTopK", "", 32, 100.0, 2.0, 1800.0, 0.0),  # its default lr: never near L0 32
        _run("SAELens BatchTopK at lr 0.005", "", 32, 31.0, 0.13, 1500.0, 0.0),
        _run("SAELens BatchTopK at lr 0.005", "", 64, 64.0, 0.05, 1000.0, 0.0),
        _run("SAELens BatchTopKish", "", 32, 32.0, 0.01, 1.0, 0.0),  # another contender's name: not this peer's
        _run("gated", "SAELens Gated", 32, 32.0, 0.20, 6000.0, 0.0),
        _run("SAELens Gated", "", None, 16.0, 0.40, 1000.0, 0.0),  # default lr: 0.3 at L0 32
        _run("SAELens Gated", "", None, 64.0, 0.20, 1000.0, 0.0),
        _run("SAELens Gated at lr 0.01", "", None, 16.0, 0.30, 2000.0, 0.0),  # lr 0.01: 0.25 at L0 32, the best
        _run("SAELens Gated at lr 0.01", "", None, 64.0, 0.20, 2000.0, 0.0),
    ]
    batchtopk, gated = bar(results)
    # L0 32 lies between the lr-0.005 runs at 31 and 64 only: a mix with the default's L0-100 run would say 0.4
    assert batchtopk["peer"] == "SAELens BatchTopK at lr 0.005"
    assert batchtopk["peer_fvu"] == pytest.approx(0.13 + (0.05 - 0.13) * math.log(32 / 31) / math.log(64 / 31))
    assert batchtopk["speedup"] == pytest.approx(6.0) and batchtopk["pass"]
    assert [r.how for r in batchtopk["readings"]] == ["dominated", "at"]  # the default: L0 100, FVU 2.0
    assert gated["peer"] == "SAELens Gated at lr 0.01" and gated["peer_fvu"] == pytest.approx(0.25)
    assert gated["speedup"] == pytest.approx(3.0) and gated["pass"]


def test_a_peer_run_at_our_target_stands_in_only_near_our_l0() -> None:
    ours = _run("matryoshka", "SAELens Matryoshka BatchTopK", 32, 32.0, 0.13, 9000.0, 0.0)
    near = _run("SAELens Matryoshka BatchTopK", "", 32, 30.5, 0.14, 1000.0, 0.0)  # log(32 / 30.5) = 0.048
    (row,) = bar([ours, near])
    assert row["peer_fvu"] == pytest.approx(0.14) and row["pass"]
    far = _run("SAELens Matryoshka BatchTopK", "", 32, 28.0, 0.14, 1000.0, 0.0)  # log(32 / 28) = 0.13
    (row,) = bar([ours, far])
    assert row["peer_fvu"] is None and not row["pass"]
    elsewhere = _run("SAELens Matryoshka BatchTopK", "", 16, 31.0, 0.14, 1000.0, 0.0)  # trained for another L0
    (row,) = bar([ours, elsewhere])
    assert row["peer_fvu"] is None


def test_a_peer_setting_worse_at_a_higher_l0_is_dominated_and_one_never_near_is_unknown() -> None:
    ours = _run("jumprelu", "SAELens JumpReLU", 32, 31.6, 0.117, 16000.0, 0.001)
    dominated = _run("SAELens JumpReLU at lr 0.005", "", 32, 36.6, 0.188, 2000.0, 0.0)
    never_near = _run("SAELens JumpReLU", "", 64, 3969.0, 0.025, 1600.0, 0.0)  # fires every latent
    (row,) = bar([ours, dominated, never_near])
    assert [(r.how, r.fvu) for r in row["readings"]] == [("dominated", 0.188), ("none", None)]
    assert row["fvu_ok"] and row["pass"] and row["peer_fvu"] is None and row["speedup"] == pytest.approx(8.0)
    (row,) = bar([ours, never_near])  # nothing to compare with
    assert not row["fvu_ok"] and not row["pass"]
    below = _run("SAELens JumpReLU at lr 0.005", "", 32, 25.0, 0.150, 2000.0, 0.0)  # worse, but at a lower L0
    (row,) = bar([ours, below])
    assert row["readings"][0].how == "none" and not row["fvu_ok"]
    better = _run("SAELens JumpReLU at lr 0.005", "", 32, 36.6, 0.100, 2000.0, 0.0)  # lower FVU at a higher L0
    (row,) = bar([ours, better])
    assert row["readings"][0].how == "none" and not row["fvu_ok"]
    measured = _run("SAELens JumpReLU at lr 0.01", "", 32, 31.0, 0.110, 2000.0, 0.0)  # near our L0, lower
    (row,) = bar([ours, dominated, measured])
    assert row["peer_fvu"] == pytest.approx(0.110) and not row["fvu_ok"]


def test_a_peer_run_below_our_l0_is_read_against_ours_interpolated_at_its_l0() -> None:
    ours = [_run("batchtopk", "SAELens BatchTopK", t, t, fvu, 9000.0, 0.0) for t, fvu in ((16, 0.14), (32, 0.12))]
    peer = _run("SAELens BatchTopK at lr 0.005", "", 32, 25.2, 0.148, 1500.0, 0.0)  # its threshold lagged to 25.2
    (row,) = bar([*ours, peer])
    ((how, fvu, there),) = [(r.how, r.fvu, r.ours) for r in row["readings"]]
    assert how == "at its L0" and fvu == 0.148
    assert there == pytest.approx(0.14 - 0.02 * math.log(25.2 / 16) / math.log(2))  # 0.1269
    assert row["fvu_ok"] and row["speedup"] == pytest.approx(6.0)
    (row,) = bar([*ours, peer | {"fvu": 0.125}])  # the peer better than ours would be there
    assert not row["fvu_ok"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--peer-lr", "nan"], "'nan' is not a learning rate"),
        (["--peer-lr", "-0.001"], "'-0.001' is not a learning rate"),
        (["--peer-lr", "0.005", "--peer-dead-window", "-2"], "--peer-dead-window -2: give a number of steps >= 0"),
        (["--peer-dead-window", "2"], "--peer-dead-window needs --peer-lr"),  # its rows would pass for the defaults
        (["--seed", "-1", "--only", "topk"], "--seed -1: give a seed >= 0"),
        (["--seed", "2"], "--seed sets our fits' seeds only"),  # every contender, peers included
        (["--seed", "2", "--only", "topk,SAELens BatchTopK"], "(peers chosen: SAELens BatchTopK)"),
    ],
)
def test_bad_peer_settings_stop_before_anything_runs(
    options: list[str], says: str, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    scratch, cache = tmp_path / "scratch", tmp_path / "no-cache"  # broken, it fails on the cache instead of exiting 2
    monkeypatch.setattr("sys.argv", ["archs", *options, "--scratch", str(scratch), "--cache", str(cache)])
    with pytest.raises(SystemExit) as stop:
        archs.main()
    assert stop.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]
    assert not scratch.exists()


def test_ours_at_another_seed_run_apart_under_rows_of_their_own(tmp_path: Path) -> None:
    """--seed S hands fit's seeds to our child and names its rows and run folders apart from seed 0's."""
    paths = {"runs": tmp_path / "runs"}
    batchtopk = next(c for c in archs.CONTENDERS if c.name == "batchtopk")
    for seed in (0, 3):
        args = argparse.Namespace(cache="C", tokens=8192, seed=seed, peer_lr=0.0, peer_dead_window=0)
        cmd = archs.command(batchtopk, 32, paths, args)  # type: ignore[arg-type]
        assert cmd[cmd.index("--seed") + 1] == str(seed)
        assert cmd[cmd.index("--runs") + 1].endswith("ours-batchtopk-32" + ("-seed3" if seed else ""))
        assert archs.row_name(batchtopk, args) == ("batchtopk, seed 3" if seed else "batchtopk")


def test_our_child_trains_again_where_an_earlier_benchmark_left_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A second benchmark into the same scratch times a new fit, not the finished run it finds there (which fit
    keeps: its "training time" would be the cache's opening)."""
    cache = synthetic_cache(tmp_path / "cache", [4300], layers=(12,), d=16).url  # params.yaml's layer 12
    args = argparse.Namespace(cache=cache, runs=str(tmp_path / "runs"), arch="topk", k=4, seed=0, tokens=4096)
    first = archs.ours_child(args)
    capsys.readouterr()
    second = archs.ours_child(args)
    said = " ".join(capsys.readouterr().err.split())
    assert "already trained" not in said and f"trained {Path(first['folder']).name} in" in said
    assert second["folder"] == first["folder"] and second["steps"] == 1
    assert 0 < second["loop_s"] <= second["train_s"]  # this call's loop, inside this call's time


def _topk_run(folder: Path, w: np.ndarray, b_dec: np.ndarray, k: int) -> str:
    """A complete TopK run folder with encoder W_enc = w (N, D), decoder rows w normalized, zero b_enc."""
    sae = TopKSAE(SaeConfig("topk", w.shape[1], w.shape[0], k, [0]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w))
        sae.W_dec.copy_(torch.from_numpy(w / np.linalg.norm(w, axis=1, keepdims=True)))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.from_numpy(b_dec))
    run = Folder.at(folder)
    write_cfg(run, {"sae": asdict(sae.cfg), "status": "complete"})
    save_weights(run, sae)
    return run.url


def _topk_numpy(x: np.ndarray, w: np.ndarray, b_dec: np.ndarray, k: int) -> tuple[float, float]:
    """FVU (centered) and L0 of a TopK code at k, written out in numpy."""
    pre = np.maximum((x - b_dec) @ w.T, 0)  # (R, N)
    code = np.where(pre >= -np.sort(-pre, axis=1)[:, k - 1 : k], pre, 0)  # the k largest per row (no ties here)
    x_hat = code @ (w / np.linalg.norm(w, axis=1, keepdims=True)) + b_dec
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return float(fvu), float((code > 0).sum(1).mean())


def test_quality_scores_a_topk_run_at_another_k(tmp_path: Path) -> None:
    """The held-out scoring at k=1 (the run's own) and at k=3 (what multi-TopK also trains) matches a numpy
    TopK; the two differ, so the wider score is not the run's own code again (random weights: not better)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 5)).astype(np.float32)  # (N, D)
    b_dec = rng.normal(size=5).astype(np.float32) * 0.1
    x = rng.normal(size=(40, 5)).astype(np.float32)
    run = _topk_run(tmp_path / "run", w, b_dec, k=1)
    own, wide = quality(x, run), quality(x, run, k=3)
    for scores, k in ((own, 1), (wide, 3)):
        fvu, l0 = _topk_numpy(x, w, b_dec, k)
        assert scores["fvu"] == pytest.approx(fvu, rel=1e-4) and scores["l0"] == pytest.approx(l0)
    assert abs(wide["fvu"] - own["fvu"]) > 0.05 and wide["l0"] > own["l0"]


def test_wide_table_lists_the_runs_scored_at_4k() -> None:
    plain = _run("jumprelu", "", 32, 30.0, 0.2, 1.0, 0.0)
    ours = _run("topk multi-topk", "", 32, 32.0, 0.12, 1.0, 0.0) | {"wide": {"k": 128, "fvu": 0.07, "l0": 127.5}}
    ours["wide"]["dead_share"] = 0.0
    peer = _run("sparsify multi-TopK", "", 32, 32.0, 0.13, 1.0, 0.0) | {"own_fvu": 0.131, "own_fvu_wide": 0.081}
    peer["wide"] = {"k": 128, "fvu": 0.08, "l0": 128.0, "dead_share": 0.25}
    head, _, *rows = wide_table([plain, ours, peer])
    assert "4k" in head and len(rows) == 2
    assert rows[0] == "| topk multi-topk | 32 | 0.1200 | 32.0 | 128 | 0.0700 | 127.5 | 0.00% | - |"
    assert rows[1] == "| sparsify multi-TopK | 32 | 0.1300 | 32.0 | 128 | 0.0800 | 128.0 | 25.00% | 0.1310 / 0.0810 |"


def test_a_run_without_write_keeps_csv_and_picture_in_its_scratch(tmp_path: Path, monkeypatch: Any) -> None:
    """A partial run (--only) must not overwrite the published archs.csv / archs.png beside RESULTS.md."""
    published = tmp_path / "published"
    published.mkdir()
    monkeypatch.setattr(archs_report, "HERE", published)
    monkeypatch.setattr(archs_report, "picture", lambda results, path: path.write_bytes(b""))  # matplotlib: seconds
    result = _run("topk", "", 32, 32.0, 0.12, 1000.0, 0.0) | {"library": "sae-pipe", "tokens": 4096}
    result |= {"dense_latents": 0, "peak_rss_mb": 100.0, "load_after": "0.5", "kl_per_token": 0.1}
    args = argparse.Namespace(write=False, scratch=str(tmp_path / "scratch"), latents=8, kl_tokens=0)
    (tmp_path / "scratch").mkdir()
    archs_report.publish_all([result], args, "cache-key")
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["archs.csv", "archs.png"]
    assert not list(published.iterdir())


def test_results_of_runs_made_apart_are_published_together(tmp_path: Path) -> None:
    """--results: the rows of two results.jsonl files (one with a blank last line), file after file; a later row
    of one contender at one setting replaces the earlier in its place, other settings stay."""
    a = ['{"name": "topk", "setting": {"k": 32}, "fvu": 0.2}', '{"name": "topk", "setting": {"k": 64}, "fvu": 0.15}']
    (tmp_path / "a.jsonl").write_text("\n".join([*a, '{"name": "topk multi-topk"}']) + "\n")
    (tmp_path / "b.jsonl").write_text(
        '{"name": "sparsify multi-TopK"}\n{"name": "topk", "setting": {"k": 32}, "fvu": 0.1}\n\n'
    )
    rows = load_results([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [(r["name"], r.get("fvu")) for r in rows] == [
        ("topk", 0.1),
        ("topk", 0.15),
        ("topk multi-topk", None),
        ("sparsify multi-TopK", None),
    ]


def test_the_picture_is_drawn_when_kl_was_not_measured(tmp_path: Path) -> None:
    """--kl-tokens -1 leaves every run without KL: the FVU panel is drawn and the KL panel says so (was: matplotlib
    refused to lay out a log axis of no data, after the whole benchmark had run)."""
    runs = [_run("topk", "topk", 32, 32.0, 0.15, 5000.0, 0.01), _run("peer", "topk", 32, 32.0, 0.16, 2500.0, 0.05)]
    archs_report.picture([{**r, "library": "sae-pipe"} for r in runs], tmp_path / "archs.png")
    assert (tmp_path / "archs.png").stat().st_size > 1000


def test_the_picture_keeps_its_l0_axis_near_the_targets(tmp_path: Path, monkeypatch: Any) -> None:
    """A peer run at L0 0.3 (its penalty all but silenced it) does not stretch the axis over two decades: the L0
    axis spans half the smallest target to twice the largest, the FVU axis the runs inside it, and the picture
    says how many runs it leaves out."""
    import matplotlib.axes
    import matplotlib.figure

    runs = [_run("topk", "topk", t, t * 1.02, 0.3 / t**0.5, 5000.0, 0.0) for t in (16, 128)]
    runs.append(_run("peer", "standard", 32, 0.3, 2.1, 1000.0, 0.6))
    titles: list[str] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, text, **_: titles.append(text))
    limits: list[tuple[float, ...]] = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig: Any, *args: Any, **kwargs: Any) -> None:
        limits.extend((*ax.get_xlim(), *ax.get_ylim()) for ax in fig.axes[:1])
        real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    archs_report.picture([{**r, "library": "sae-pipe"} for r in runs], tmp_path / "archs.png")
    assert limits[0][:2] == pytest.approx((8, 256))
    assert limits[0][3] < 0.1  # the FVU axis ends near the runs inside (0.075), not at the peer's 2.1
    assert titles == ["1 run(s) at L0 outside 8-256: in the table"]


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu", "gated"])
def test_fit_steps_times_the_architecture_it_is_asked_for(arch: str, tmp_path: Path) -> None:
    """benchmarks.fit_steps --arch builds and trains that architecture (its FVU falls over the timed steps)."""
    from benchmarks import fit_steps

    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((64, 32)).astype(np.float32)  # (atoms, D)
    rows = rng.exponential(1.0, (4096, 64)).astype(np.float32) * (rng.random((4096, 64)) < 0.05) @ atoms  # (R, D)
    np.save(tmp_path / "rows.npy", rows)
    args = argparse.Namespace(
        data=str(tmp_path / "rows.npy"), arch=arch, num_latents=128, k=4, batch_size=512, steps=12, warmup=1,
        precision="float32", device="cpu", scratch=str(tmp_path / "run"), multi_topk=False,
    )  # fmt: skip
    result = fit_steps.run(args)
    assert result["arch"] == arch
    assert result["fvu_curve"][-1] < 0.9 * result["fvu_curve"][0]


def test_batch_form_scores_the_batch_top_k_code(tmp_path: Path) -> None:
    """benchmarks.batch_form against a numpy batch top-k; latent 0 fires on most rows, so a padded slot
    (latent id 0, value 0) must not wipe its activation."""
    from benchmarks.batch_form import batch_form

    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 5)).astype(np.float32)  # (N, D)
    w[0] = 3 * np.abs(w[0])
    x = (np.abs(rng.normal(size=(40, 5))) * rng.uniform(0.2, 3.0, (40, 1))).astype(np.float32)  # unlike norms
    run = _topk_run(tmp_path / "run", w, np.zeros(5, np.float32), k=2)
    fvu, l0 = batch_form(run, x, 2, 20)
    pre = np.maximum(x @ w.T, 0)  # (R, N)
    code = np.zeros_like(pre)
    for i in (0, 20):  # each batch of 20 rows keeps its 40 largest entries
        flat = pre[i : i + 20].flatten()
        top = np.argsort(-flat, kind="stable")[:40]
        code[i : i + 20].flat[top] = flat[top]
    x_hat = code @ (w / np.linalg.norm(w, axis=1, keepdims=True))
    assert (code[:, 0] > 0).mean() > 0.5 and len(set((code > 0).sum(1))) > 1  # the case the test is about
    assert fvu == pytest.approx(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    assert l0 == pytest.approx((code > 0).sum(1).mean())


def test_the_table_shows_each_rows_own_thread_count() -> None:
    """A row's speed is read with the threads its contender ran on (a run that did not record them: -)."""
    ran = _run("topk", "", 32, 32.0, 0.12, 1000.0, 0.0) | {"tokens": 4096, "dense_latents": 0, "peak_rss_mb": 100.0}
    rows = [ran | {"load_after": "0.5", "threads": 1}, ran | {"load_after": "0.5"}]
    head, _, *lines = archs_report.table(rows)
    column = [c.strip() for c in head.split("|")].index("threads")
    assert [[c.strip() for c in line.split("|")][column] for line in lines] == ["1", "-"]
