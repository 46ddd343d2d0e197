"""Stage two on synthetic caches with a known sparse dictionary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import fit as fit_module
from pipeline.cache.backends import read_span
from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit.plan import expand_sweep, parse_sweep
from pipeline.fit.stage import FitConfig, fit
from pipeline.fit.train import MemberSettings, make_member, train_step
from pipeline.infra.errors import CorruptError, UserError
from pipeline.sae.route import RouteSAE
from pipeline.sae.topk import SaeConfig, TopKSAE
from tests.support.caches import synthetic_cache


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
    (run,) = fit(run_cfg(cache, tmp_path, epochs=4, lr=1e-2))
    log = np.genfromtxt(f"{run.url}/log.csv", delimiter=",", names=True)
    assert log["nmse"][-1] < 0.3 * log["nmse"][0]
    assert log["fvu"][-1] < 0.1, log["fvu"][-1]  # 64 true atoms, 3 active per row, 128 latents with k=4
    cfg = run.read_json("cfg.json")
    assert cfg["status"] == "complete" and cfg["sae"]["layers"] == [0]
    assert not any(name.startswith("state") for name in run.list())


def test_decoder_rows_stay_unit_norm_every_step(cache: str, tmp_path: Path) -> None:
    from pipeline.infra.files import Folder

    settings = MemberSettings(1e-2, "adam", (0.9, 0.999), "constant", 0, 50, 16, 1 / 32, False)
    member = make_member(
        Folder.at(tmp_path / "m"), SaeConfig("topk", 32, 128, 4, [0]), settings, [0], torch.device("cpu")
    )
    stream = ActivationStream(ActivationCache.open(cache), StreamSpec([0], 128, pool_mb=1))
    for step, batch in enumerate(stream.batches(1)):
        train_step(member, torch.from_numpy(batch[0]).float(), 100)
        norms = member.model.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        if step == 30:
            break
    assert float((member.since_fired >= 50).float().mean()) >= 0  # dead counters are maintained


@pytest.mark.parametrize("shards, batch", [([768, 768, 768], 400), ([100, 900, 50, 900], 128)])
def test_small_pool_never_overflows(tmp_path: Path, shards: list[int], batch: int) -> None:
    cache = ActivationCache.open(synthetic_cache(tmp_path, shards, layers=(0, 1), d=8))
    stream = ActivationStream(cache, StreamSpec([0, 1], batch, pool_mb=0.0001))  # the smallest pool allowed
    counts = Counter(tuple(r) for b in stream.batches(2) for r in b[0])
    assert sum(counts.values()) == (2 * sum(shards)) // batch * batch  # every whole batch of two epochs
    assert max(counts.values()) <= 2  # no row twice per epoch
    assert sum(c == 2 for c in counts.values()) >= sum(shards) - 2 * batch  # only the remainders miss out


@pytest.mark.parametrize("backend", ["zarr", "memmap"])
def test_direct_layer_reads_equal_the_library_decode(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    cache = ActivationCache.open(synthetic_cache(tmp_path, [300, 200], layers=(0, 3, 5), backend=backend))
    names = [
        (r["index"], f"{split}/act", pos) for r in cache.shards for split in ("train", "heldout") for pos in range(3)
    ]
    expected = [cache.read(*name) for name in names]  # zarr's own decode / the .npy memory map
    monkeypatch.setattr(zarr.Array, "get_basic_selection", lambda *a, **k: pytest.fail("zarr decoded a plain layer"))
    for name, want in zip(names, expected, strict=True):
        out = np.full_like(want, np.nan)
        cache.read_into(*name, out)
        np.testing.assert_array_equal(out, want)


def test_a_damaged_shard_index_is_not_read_directly(tmp_path: Path) -> None:
    cache = ActivationCache.open(synthetic_cache(tmp_path, [300], layers=(0, 3, 5), backend="zarr"))
    (shard_file,) = Path(cache.folder.root).rglob("train/act/c/0/0/0")
    damaged = bytearray(shard_file.read_bytes())
    damaged[-1] ^= 1  # the index checksum
    shard_file.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):  # zarr reads it instead, and says what is wrong
        cache.read_into(0, "train/act", 1, np.empty((300, 32), np.float16))


def test_a_short_file_is_reported_not_read_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptError, match="ends 28 bytes early"):
        read_span(path, 36, np.empty(92, np.uint8))


def test_stream_serves_each_training_row_once_and_never_heldout(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [700, 900, 500], layers=(0,), d=8)
    cache = ActivationCache.open(folder)
    train = {tuple(r) for s in cache.shards for r in cache.read(s["index"], "train/act", 0)}
    held = {tuple(r) for s in cache.shards for r in cache.read(s["index"], "heldout/act", 0)}
    stream = ActivationStream(cache, StreamSpec([0], 100, seed=3, pool_mb=0.01))
    served = [tuple(r) for b in stream.batches(1) for r in b[0]]
    assert len(served) == 2100 and len(set(served)) == len(served)
    assert set(served) <= train and not set(served) & held
    first = next(iter(stream.batches(1)))
    again = next(iter(ActivationStream(cache, StreamSpec([0], 100, seed=3, pool_mb=0.01)).batches(1)))
    np.testing.assert_array_equal(first, again)  # reproducible with a seed
    shards_in_first = {
        s["index"]
        for s in cache.shards
        for r in cache.read(s["index"], "train/act", 0)
        if tuple(r) in {tuple(x) for x in first[0]}
    }
    assert len(shards_in_first) > 1  # batches mix shards


@pytest.mark.parametrize("routing", ["hard", "soft"])
@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_routesae_shapes_and_gradients(routing: str, aggregate: str) -> None:
    torch.manual_seed(0)
    model = RouteSAE(SaeConfig("route", 16, 64, 4, [2, 3, 4], routing, aggregate))
    xs = torch.randn(10, 3, 16)
    out = model(xs)
    assert out.x.shape == out.x_hat.shape == (10, 16)
    assert out.layer_weights.shape == (10, 3) and torch.allclose(out.layer_weights.sum(-1), torch.ones(10))
    assert (out.layer_choice is None) == (routing == "soft")
    if routing == "hard":
        rows = torch.arange(10)
        expected = xs[rows, out.layer_choice] * out.layer_weights[rows, out.layer_choice][:, None]
        torch.testing.assert_close(out.x, expected)
    ((out.x_hat - out.x) ** 2).sum().backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    assert model.sae.W_enc.grad is not None and model.sae.W_dec.grad is not None


def test_topk_gradients_match_a_dense_reference() -> None:
    torch.manual_seed(0)
    model = TopKSAE(SaeConfig("topk", 16, 64, 4, [0])).double()
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_()
    x = torch.randn(20, 16, dtype=torch.double)
    ((model(x).x_hat - x) ** 2).sum().backward()
    sparse = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    vals, idx = pre.topk(4)
    x_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ model.W_dec + model.b_dec
    ((x_hat - x) ** 2).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(sparse[name], param.grad, msg=name)


def test_tangent_decoder_gradient_drops_the_radial_component() -> None:
    torch.manual_seed(1)
    model = TopKSAE(SaeConfig("topk", 16, 64, 4, [0]))
    x = torch.randn(20, 16)
    ((model(x).x_hat - x) ** 2).sum().backward()
    full = model.W_dec.grad.clone()
    model.zero_grad()
    model.tangent_decoder_grad = True
    ((model(x).x_hat - x) ** 2).sum().backward()
    radial = (full * model.W_dec).sum(1, keepdim=True) * model.W_dec  # rows have unit norm
    torch.testing.assert_close(model.W_dec.grad, full - radial)
    assert (model.W_dec.grad * model.W_dec).sum(1).abs().max() < 1e-5


def test_route_fit_on_multilayer_cache(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [1500, 1500], layers=(1, 2, 3), d=16)
    (run,) = fit(run_cfg(folder.url, tmp_path, arch="route", layer=None, latents=64, max_tokens=2048))
    cfg = run.read_json("cfg.json")
    assert cfg["sae"]["arch"] == "route" and cfg["sae"]["layers"] == [1, 2, 3]
    assert "router.weight" in weights(run)


def test_sweep_member_equals_solo_run(cache: str, tmp_path: Path) -> None:
    runs = fit(run_cfg(cache, tmp_path / "sweep", max_tokens=4096, sweep={"k": [4, 8], "seed": [0, 1]}))
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    (solo,) = fit(run_cfg(cache, tmp_path / "solo", max_tokens=4096, k=8, seed=1))
    member = next(
        r for r in runs if r.read_json("cfg.json")["sae"]["k"] == 8 and r.read_json("cfg.json")["training"]["seed"] == 1
    )
    for name, tensor in weights(solo).items():
        torch.testing.assert_close(weights(member)[name], tensor, atol=1e-6, rtol=1e-5)


def test_resume_equals_uninterrupted(cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (whole,) = fit(run_cfg(cache, tmp_path / "a", max_tokens=8192))
    real_step = fit_module.train_step
    calls = {"n": 0}

    def dying_step(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        fit(run_cfg(cache, tmp_path / "b", max_tokens=8192))
    monkeypatch.setattr(fit_module, "train_step", real_step)
    with pytest.raises(UserError, match="--resume"):
        fit(run_cfg(cache, tmp_path / "b", max_tokens=8192))
    (resumed,) = fit(run_cfg(cache, tmp_path / "b", max_tokens=8192, resume=True))
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, atol=0, rtol=0)
    steps = np.genfromtxt(f"{resumed.url}/log.csv", delimiter=",", names=True)["step"]
    np.testing.assert_array_equal(steps, np.genfromtxt(f"{whole.url}/log.csv", delimiter=",", names=True)["step"])


def test_finished_run_is_kept_not_overwritten(cache: str, tmp_path: Path) -> None:
    (run,) = fit(run_cfg(cache, tmp_path, max_tokens=1024))
    before = (Path(run.url) / "sae.safetensors").read_bytes()
    assert fit(run_cfg(cache, tmp_path, max_tokens=1024))[0].url == run.url
    assert (Path(run.url) / "sae.safetensors").read_bytes() == before


def test_resume_with_other_settings_is_refused(cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_module, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fit(run_cfg(cache, tmp_path, max_tokens=4096))
    with pytest.raises(UserError, match=r"lr: saved 0\.003, now 0\.001"):
        fit(run_cfg(cache, tmp_path, max_tokens=4096, lr=1e-3, resume=True))


def test_sweeps_from_the_cli_and_from_params_are_typed() -> None:
    cli = FitConfig(sweep=parse_sweep(["k=32,64", "lr=1e-3", "optimizer=adam,signum"]))
    members = expand_sweep(cli)
    assert len(members) == 4 and {(m.k, m.lr, m.optimizer) for m in members} >= {(32, 0.001, "adam")}
    assert [m.k for m in expand_sweep(FitConfig(sweep={"k": 16}))] == [16]  # a scalar is a one-value sweep
    with pytest.raises(UserError, match="key one of k, latents"):
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
        fit(run_cfg(cache, tmp_path, **change))
    assert not (tmp_path / "saes").exists() or not list((tmp_path / "saes").glob("*/sae.safetensors"))


def test_route_on_single_layer_cache_is_refused(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [500], layers=(3,))
    with pytest.raises(UserError, match="RouteSAE needs a multi-layer cache"):
        fit(run_cfg(folder.url, tmp_path, arch="route", layer=None))


def test_corrupt_cache_is_refused(cache: str, tmp_path: Path) -> None:
    shard = Path(cache) / "shards" / "000001" / "train" / "act.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside layer 0 (layer-major layout, after the 128-byte .npy header)
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard 000001 train/act\[0\]: checksum mismatch"):
        fit(run_cfg(cache, tmp_path))
    assert shard.exists()
    (run,) = fit(run_cfg(cache, tmp_path, layer=1, max_tokens=512))  # layer 1 is intact and still usable
    assert run.read_json("cfg.json")["status"] == "complete"
