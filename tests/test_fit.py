"""Stage two on synthetic caches with a known sparse dictionary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit import stage as fit
from pipeline.fit import stage as fit_module
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.plan import expand_sweep, parse_sweep
from pipeline.fit.train import make_member, train_step
from pipeline.infra.errors import UserError
from pipeline.sae.interface import SaeConfig
from tests.support.caches import synthetic_cache

CPU = torch.device("cpu")


def run_cfg(cache_dir: Path | str, root: Path, **kw: object) -> FitConfig:
    base = {
        "cache": str(cache_dir),
        "layer": 0,
        "latents": 128,
        "k": 4,
        "lr": 3e-3,
        "batch_size": 256,
        "out": str(root / "saes"),
        "device": "cpu",
        "log_every": 5,
        "checkpoint_every": 10,
        "pool_mb": 1,
        "precision": "float32",
    }
    return FitConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return synthetic_cache(tmp_path, [3000, 2500, 2800]).url


def weights(folder: object) -> dict[str, torch.Tensor]:
    return load_file(f"{folder.url}/sae.safetensors")  # type: ignore[attr-defined]


def test_loss_falls_and_fvu_ends_low(cache: str, tmp_path: Path) -> None:
    (run,) = fit.run(run_cfg(cache, tmp_path, epochs=4, lr=1e-2)).runs
    log = np.genfromtxt(f"{run.url}/log.csv", delimiter=",", names=True)
    assert log["nmse"][-1] < 0.3 * log["nmse"][0]
    assert log["fvu"][-1] < 0.1, log["fvu"][-1]  # 64 true atoms, 3 active per row, 128 latents with k=4
    cfg = run.read_json("cfg.json")
    assert cfg["status"] == "complete" and cfg["sae"]["layers"] == [0]
    assert not any(name.startswith("state") for name in run.list())


def test_decoder_rows_stay_unit_norm_every_step(cache: str, tmp_path: Path) -> None:
    from pipeline.infra.files import Folder

    settings = Training.of(FitConfig(lr=1e-2, schedule="constant", dead_tokens=50, k_aux=16))
    member = make_member(
        Folder.at(tmp_path / "m"), SaeConfig("topk", 32, 128, 4, [0]), settings, False, [0], torch.device("cpu")
    )
    stream = ActivationStream(ActivationCache.open(cache), StreamSpec([0], 128, pool_mb=1))
    for step, batch in enumerate(stream.batches(1)):
        train_step(member, torch.from_numpy(batch[0]).float(), 100)
        norms = member.model.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        if step == 30:
            break


def test_route_fit_on_multilayer_cache(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [1500, 1500], layers=(1, 2, 3), d=16)
    (run,) = fit.run(run_cfg(folder.url, tmp_path, arch="route", layer=None, latents=64, max_tokens=2048)).runs
    cfg = run.read_json("cfg.json")
    assert cfg["sae"]["arch"] == "route" and cfg["sae"]["layers"] == [1, 2, 3]
    assert "router.weight" in weights(run)


def test_sweep_member_equals_solo_run(cache: str, tmp_path: Path) -> None:
    runs = fit.run(run_cfg(cache, tmp_path / "sweep", max_tokens=4096, sweep={"k": [4, 8], "seed": [0, 1]})).runs
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    (solo,) = fit.run(run_cfg(cache, tmp_path / "solo", max_tokens=4096, k=8, seed=1)).runs
    member = next(
        r for r in runs if r.read_json("cfg.json")["sae"]["k"] == 8 and r.read_json("cfg.json")["training"]["seed"] == 1
    )
    for name, tensor in weights(solo).items():
        torch.testing.assert_close(weights(member)[name], tensor, atol=1e-6, rtol=1e-5)


def interrupted(cfg: FitConfig, monkeypatch: pytest.MonkeyPatch, steps: int = 24) -> None:
    """Run ``cfg`` and kill it after ``steps`` training steps (past the checkpoint at step 20 of run_cfg's)."""
    real_step, calls = fit_module.train_step, [0]

    def dying_step(*args: object, **kwargs: object) -> dict:
        calls[0] += 1
        if calls[0] > steps:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        fit.run(cfg)
    monkeypatch.setattr(fit_module, "train_step", real_step)


@pytest.mark.parametrize("optimizer", ["adam", "signum-sf"])  # signum-sf: the schedule-free state, y included
def test_resume_equals_uninterrupted(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    (whole,) = fit.run(run_cfg(cache, tmp_path / "a", max_tokens=8192, optimizer=optimizer)).runs
    interrupted(run_cfg(cache, tmp_path / "b", max_tokens=8192, optimizer=optimizer), monkeypatch)
    with pytest.raises(UserError, match="--resume"):
        fit.run(run_cfg(cache, tmp_path / "b", max_tokens=8192, optimizer=optimizer))
    (resumed,) = fit.run(run_cfg(cache, tmp_path / "b", max_tokens=8192, optimizer=optimizer, resume=True)).runs
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, atol=0, rtol=0)
    steps = np.genfromtxt(f"{resumed.url}/log.csv", delimiter=",", names=True)["step"]
    np.testing.assert_array_equal(steps, np.genfromtxt(f"{whole.url}/log.csv", delimiter=",", names=True)["step"])


def test_finished_run_is_kept_not_overwritten(cache: str, tmp_path: Path) -> None:
    (run,) = fit.run(run_cfg(cache, tmp_path, max_tokens=1024)).runs
    before = (Path(run.url) / "sae.safetensors").read_bytes()
    assert fit.run(run_cfg(cache, tmp_path, max_tokens=1024)).runs[0].url == run.url
    assert (Path(run.url) / "sae.safetensors").read_bytes() == before


def test_resume_with_other_settings_is_refused(cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_module, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fit.run(run_cfg(cache, tmp_path, max_tokens=4096))
    with pytest.raises(UserError, match=r"lr: saved 0\.003, now 0\.001"):
        fit.run(run_cfg(cache, tmp_path, max_tokens=4096, lr=1e-3, resume=True))


def test_sweeps_from_the_cli_and_from_params_are_typed() -> None:
    cli = FitConfig(sweep=parse_sweep(["k=32,64", "lr=1e-3", "optimizer=adam,signum"]))
    members = expand_sweep(cli)
    assert len(members) == 4 and {(m.k, m.lr, m.optimizer) for m in members} >= {(32, 0.001, "adam")}
    assert [m.k for m in expand_sweep(FitConfig(sweep={"k": 16}))] == [16]  # a scalar is a one-value sweep
    with pytest.raises(UserError, match="key one of arch, k, latents"):
        parse_sweep(["batch_size=1,2"])
    with pytest.raises(UserError, match="sweep k: 'x' is not a valid int"):
        expand_sweep(FitConfig(sweep={"k": ["x"]}))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cache": "/no/such/cache"}, "not an activation cache"),
        ({"layer": 7}, r"holds layers \[0, 1\]"),
        ({"k": 128}, "k=128 must be between"),
        ({"layer": None}, "pass --layer"),
        ({"optimizer": "sgd"}, "unknown optimizer"),
        ({"batch_size": 100_000}, "less than one batch"),
    ],
)
def test_bad_inputs(cache: str, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        fit.run(run_cfg(cache, tmp_path, **change))
    assert not (tmp_path / "saes").exists() or not list((tmp_path / "saes").glob("*/sae.safetensors"))


def test_route_on_single_layer_cache_is_refused(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [500], layers=(3,))
    with pytest.raises(UserError, match="RouteSAE needs a multi-layer cache"):
        fit.run(run_cfg(folder.url, tmp_path, arch="route", layer=None))


def test_corrupt_cache_is_refused(cache: str, tmp_path: Path) -> None:
    shard = Path(cache) / "shards" / "000001" / "train" / "act.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside layer 0 (layer-major layout, after the 128-byte .npy header)
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard 000001 train/act\[0\]: checksum mismatch"):
        fit.run(run_cfg(cache, tmp_path))
    assert shard.exists()
    (stopped,) = (tmp_path / "saes").iterdir()  # checked as streamed: the run stopped before its bad rows trained
    assert json.loads((stopped / "cfg.json").read_text())["status"] == "training"
    assert not (stopped / "sae.safetensors").exists()
    (run,) = fit.run(run_cfg(cache, tmp_path, layer=1, max_tokens=512)).runs  # layer 1 is intact and still usable
    assert run.read_json("cfg.json")["status"] == "complete"


def test_fit_checks_each_array_it_trains_on_once_and_makes_no_pass_of_its_own(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[tuple[int, str]] = []
    real_check = ActivationCache.check
    monkeypatch.setattr(ActivationCache, "check", lambda c, s, k, d: (checked.append((s, k)), real_check(c, s, k, d)))
    monkeypatch.setattr(ActivationCache, "verify", lambda *a: pytest.fail("a separate pass over the cache"))
    fit.run(run_cfg(cache, tmp_path, layer=1, epochs=2))
    assert sorted(checked) == [(s, "train/act[1]") for s in (0, 1, 2)]
    checked.clear()
    fit.run(run_cfg(cache, tmp_path, layer=0, verify=False))
    assert checked == []


def test_lr_schedule_warms_up_holds_and_decays() -> None:
    from pipeline.fit.optim import lr_factor

    assert [lr_factor(s, 100, "warmup-decay") for s in (0, 4, 5, 50, 79)] == [0.2, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, "warmup-decay") for s in (80, 90, 99)] == [1.0, 0.5, 0.05]
    assert [lr_factor(s, 100, "constant") for s in (0, 90, 99)] == [0.2, 1.0, 1.0]


def test_signum_steps_by_the_sign_of_its_momentum() -> None:
    from pipeline.fit.optim import Signum

    p = torch.nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=0.1, momentum=0.8)
    for grad in ([1.0, -2.0, 0.0], [-3.0, 1.0, 0.0]):  # momentum: (0.2, -0.4, 0) then (-0.44, -0.12, 0)
        p.grad = torch.tensor(grad)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, 0.2, 0.0]))


def test_pre_bias_starts_at_the_mean_for_topk_and_at_zero_for_route(tmp_path: Path) -> None:
    from pipeline.fit.train import init_pre_bias
    from pipeline.infra.files import Folder

    x = torch.randn(64, 3, 8) + 2.0
    settings = Training.of(FitConfig(lr=1e-3), dead_tokens=1000, k_aux=4)
    topk = make_member(Folder.at(tmp_path / "a"), SaeConfig("topk", 8, 32, 2, [0]), settings, False, [0], CPU)
    init_pre_bias(topk, x[:, 0])
    torch.testing.assert_close(topk.model.b_dec.detach(), x[:, 0].mean(0))
    route_cfg = SaeConfig("route", 8, 32, 2, [1, 2, 3])
    route = make_member(Folder.at(tmp_path / "b"), route_cfg, settings, False, [0, 1, 2], CPU)
    init_pre_bias(route, x)
    assert route.model.sae.b_dec.abs().max() == 0


def test_auxk_revives_latents_that_never_fire(tmp_path: Path) -> None:
    """Half the latents start too weak to make the top k; AuxK (with a threshold inside the run) revives them."""
    from pipeline.infra.files import Folder

    data = torch.from_numpy(
        np.load(synthetic_cache(tmp_path, [4096], layers=(0,)).local() / "shards/000000/train/act.npy")[0]
    ).float()

    def alive_after(aux_alpha: float) -> float:
        settings = Training.of(FitConfig(lr=3e-3, aux_alpha=aux_alpha, dead_tokens=512, revive=0), k_aux=16)
        member = make_member(
            Folder.at(tmp_path / str(aux_alpha)), SaeConfig("topk", 32, 128, 4, [0]), settings, False, [0], CPU
        )
        with torch.no_grad():
            member.model.b_enc[64:] = -0.4  # these latents never make the top k on their own
        for step in range(60):
            train_step(member, data[(step % 16) * 256 : (step % 16 + 1) * 256], 60)
        fired = member.model.encode(data).indices.unique()
        return float((fired >= 64).sum()) / 64

    assert alive_after(0.0) < 0.3  # measured: 0.19 of them ever fire without AuxK
    assert alive_after(1 / 32) > 0.9  # and all of them with it


def test_revive_brings_back_latents_auxk_cannot_reach(tmp_path: Path) -> None:
    """Latents negative on every token get no gradient from the loss nor from AuxK (it reads ReLU'd
    pre-activations); the bias rise brings them back."""
    from pipeline.infra.files import Folder

    data = torch.from_numpy(
        np.load(synthetic_cache(tmp_path, [4096], layers=(0,)).local() / "shards/000000/train/act.npy")[0]
    ).float()

    def alive_after(revive: float) -> float:
        settings = Training.of(FitConfig(lr=3e-3, dead_tokens=512, revive=revive), k_aux=16)
        member = make_member(
            Folder.at(tmp_path / str(revive)), SaeConfig("topk", 32, 128, 4, [0]), settings, False, [0], CPU
        )
        with torch.no_grad():  # latents 64.. start below zero on every token, by 0.5 at their best one
            best = (data - member.model.b_dec) @ member.model.W_enc[64:].T  # (tokens, 64)
            member.model.b_enc[64:] = -best.amax(0) - 0.5
        for step in range(60):
            train_step(member, data[(step % 16) * 256 : (step % 16 + 1) * 256], 60)
        latents = member.model.encode(data)
        fired = latents.indices[latents.acts > 0].unique()
        return float((fired >= 64).sum()) / 64

    assert alive_after(0.0) == 0.0
    assert alive_after(0.05) > 0.9


def test_dead_threshold_follows_the_dictionary_not_the_run(tmp_path: Path) -> None:
    """auto: 64 intervals of a latent at the mean firing rate (latents / k tokens each); explicit wins."""
    from pipeline.fit.plan import plan_run

    cache = ActivationCache.open(synthetic_cache(tmp_path, [1500, 1500]).url)

    def threshold(**kw: object) -> int:
        return plan_run(run_cfg(cache.folder.url, tmp_path, **kw), cache).training.dead_tokens

    assert threshold(latents=128, k=4) == 2048
    assert threshold(latents=512, k=4) == 8192
    assert threshold(latents=512, k=16) == 2048
    assert threshold(latents=512, k=16, epochs=8) == 2048  # a longer run, the same threshold
    assert threshold(latents=512, k=16, dead_tokens=300) == 300


def test_automatic_lr_is_the_measured_best_at_each_dictionary_size_and_run_length(tmp_path: Path) -> None:
    """lr 0 resolves to what the sweeps on SmolLM2 chose (RESULTS.md 07:35, 2026-12-02): 1.2e-2 at 1024
    latents, 2e-3 at 16384, and no lower at 32768, where 1.4e-3 left 23.5 % of latents untrained, all at
    0.8M tokens or fewer; 3.3e-3 at 4096 latents for 4M tokens, where 4.9e-3 left 1.6 % silent. The run
    length counts epochs and the max_tokens cap; smaller batches scale it by sqrt(batch / 4096) (1e-3 and
    5e-4 at 16384 latents, batches 1024 and 256: FVU 0.104 against 0.111, RESULTS.md 2026-12-02 05:20);
    explicit lr wins."""
    from pipeline.fit.plan import plan_run

    cache = ActivationCache.open(synthetic_cache(tmp_path, [600, 600]).url)

    def lr(**kw: object) -> float:
        return plan_run(run_cfg(cache.folder.url, tmp_path, **{"lr": 0.0, "batch_size": 4096, **kw}), cache).training.lr

    assert lr(latents=1024) == pytest.approx(1.2e-2, rel=0.02)
    assert lr(latents=16384) == pytest.approx(2e-3)
    assert lr(latents=32768) == pytest.approx(2e-3)
    assert lr(latents=4096) == pytest.approx(4.9e-3, rel=0.02)
    assert lr(latents=1024, lr=3e-4) == 3e-4
    epochs_for_4m = -(-4_000_000 // cache.rows("train"))
    assert lr(latents=4096, epochs=epochs_for_4m) == pytest.approx(3.3e-3, rel=0.02)
    assert lr(latents=4096, epochs=epochs_for_4m, max_tokens=400_000) == pytest.approx(4.9e-3, rel=0.02)
    assert lr(latents=16384, batch_size=1024) == pytest.approx(1e-3)  # Adam's square-root batch rule
    assert lr(latents=16384, batch_size=256) == pytest.approx(5e-4)
    assert lr(latents=16384, batch_size=16384) == pytest.approx(2e-3)  # not raised past the measured batch
    assert lr(latents=16384, optimizer="signum") == pytest.approx(5e-3)  # Signum keeps its sqrt rule


def test_a_budget_beyond_the_data_trains_the_epochs_asked_for_and_says_so(
    cache: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--max-tokens past the data never repeats it unasked: one epoch by default, --epochs N at most,
    each time with a message; within the epochs the budget caps the run, silently."""
    rows = ActivationCache.open(cache).rows("train")

    def steps_and_message(**kw: object) -> tuple[int, str]:
        (run,) = fit.run(run_cfg(cache, tmp_path, checkpoint_every=0, **kw)).runs
        return run.read_json("cfg.json")["steps"], " ".join(capsys.readouterr().err.split())

    steps, said = steps_and_message(max_tokens=3 * rows)
    assert steps == rows // 256
    assert f"1 epoch over the training split's {rows:,} rows are fewer than --max-tokens {3 * rows:,}" in said
    steps, said = steps_and_message(max_tokens=4 * rows, epochs=3)
    assert steps == 3 * rows // 256 and "training 3 epochs (pass a larger --epochs" in said
    steps, said = steps_and_message(max_tokens=3 * rows, epochs=4)
    assert steps == 3 * rows // 256 and "fewer than --max-tokens" not in said


def test_auxk_settings_reach_the_run_from_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    cache = synthetic_cache(tmp_path, [600, 600]).url
    args = ["fit", "--cache", cache, "--layer", "0", "--latents", "32", "--k", "4", "--max-tokens", "256"]
    args += ["--batch-size", "128", "--out", str(tmp_path / "saes"), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--k-aux", "8", "--aux-alpha", "0.25", "--dead-tokens", "300"])
    assert result.exit_code == 0, result.output
    training = json.loads((Path(result.output.split()[-1]) / "cfg.json").read_text())["training"]
    assert (training["k_aux"], training["aux_alpha"], training["dead_tokens"]) == (8, 0.25, 300)


def test_route_log_records_shares_and_entropy(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [1500, 1500], layers=(1, 2, 3), d=16)
    (run,) = fit.run(run_cfg(folder.url, tmp_path, arch="route", layer=None, latents=64, max_tokens=2048)).runs
    log = np.genfromtxt(f"{run.url}/log.csv", delimiter=",", names=True)
    shares = np.stack([log["share_L1"], log["share_L2"], log["share_L3"]], axis=1)  # (rows, 3)
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-5)
    entropy = -(shares * np.log(np.clip(shares, 1e-12, None))).sum(1)
    np.testing.assert_allclose(log["route_entropy"], entropy, atol=1e-5)


def test_too_few_routed_layers_are_refused(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [500], layers=(0, 3, 7), d=16)  # an 8-layer model routes over 2..6
    with pytest.raises(UserError, match=r"routes over layers 2\.\.6 .* holds \[0, 3, 7\]"):
        fit.run(run_cfg(folder.url, tmp_path, arch="route", layer=None))
    (run,) = fit.run(run_cfg(folder.url, tmp_path, arch="route", layer=None, route_layers="0,7", max_tokens=512)).runs
    assert run.read_json("cfg.json")["sae"]["layers"] == [0, 7]


def test_balance_loss_is_one_when_even_and_pulls_towards_even() -> None:
    from pipeline.sae.archs.route import balance_loss

    assert float(balance_loss(torch.full((8, 4), 0.25))) == pytest.approx(1.0)
    assert float(balance_loss(torch.eye(4)[[2] * 8])) == pytest.approx(4.0)  # every token to one layer
    weights = torch.tensor([[0.7, 0.2, 0.1]] * 5, requires_grad=True)
    balance_loss(weights).backward()
    assert weights.grad[0, 0] > weights.grad[0, 1] > weights.grad[0, 2]  # descent moves mass off the top layer


def test_one_explicit_lr_across_dictionary_sizes_is_pointed_out(tmp_path: Path) -> None:
    """A sweep over latents at one --lr gets a note naming each size's automatic rate (Adam: 2e-3 x
    (16384 / latents) ** 0.65 x sqrt(256 / 4096) for batches of 256: 0.0117 at 128 latents, 0.00193 at
    2048); none where lr is swept, automatic, or every member's automatic rate is the same (a k sweep)."""
    from pipeline.fit.plan import fixed_lr_note, plan_run

    cache = ActivationCache.open(synthetic_cache(tmp_path, [1500, 1500]).url)

    def note(sweep: dict[str, object], **kw: object) -> str | None:
        cfg = run_cfg(cache.folder.url, tmp_path, sweep=sweep, **kw)
        return fixed_lr_note(cfg.sweep, [plan_run(m, cache) for m in expand_sweep(cfg)], cache.rows("train"))

    message = note({"latents": [128, 2048]})
    assert message is not None
    assert "--lr 0.003 holds for every member" in message
    assert "0.012 at 128 latents (adam)" in message and "0.0019 at 2048 latents (adam)" in message
    assert note({"latents": [128, 2048], "lr": [1e-3, 3e-3]}) is None
    assert note({"latents": [128, 2048]}, lr=0.0) is None
    assert note({"k": [4, 8]}) is None


def test_fit_names_its_closing_numbers_as_the_last_training_batchs(
    cache: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The line a fit ends with shows log.csv's last row (cfg.json's result repeats it) and says so: read as
    held-out quality, a training batch's FVU flatters the run."""
    (run,) = fit.run(run_cfg(cache, tmp_path, max_tokens=2560)).runs
    said = " ".join(capsys.readouterr().err.split())
    last = run.read_json("cfg.json")["result"]
    rows = (run.local() / "log.csv").read_text().splitlines()
    logged = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert f"last training batch: nmse {last['nmse']}, fvu {last['fvu']}, l0 {last['l0']}" in said
    assert float(logged["step"]) == 10 and last["fvu"] == float(logged["fvu"])  # 2560 tokens: the 10th, last step
