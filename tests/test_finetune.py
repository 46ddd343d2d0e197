"""`sae-pipe finetune` on a tiny random Llama: the loss against a KL written out by hand, the KL it lowers on
held-out sequences, a parent left byte for byte as it was, training sequences rebuilt as packing made them,
and one clear error per bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.loss import Terms, batch_loss
from pipeline.finetune.plan import lr_factor
from pipeline.finetune.sequences import Specials, rebuilt, training_sequences
from pipeline.finetune.stage import run
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.subject import Live, go_live, load_subject
from tests.support.caches import tiny_extract_config


@pytest.fixture(scope="module")
def cache(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ft-cache")
    cfg = tiny_extract_config(tiny_llama, root, layers="1,2", max_tokens=2400, batch_size=8, heldout=0.25)
    return extract.run(cfg).folder.url


def train(cache: str, root: Path, **kw: object) -> Folder:
    base = {"cache": cache, "layer": 1, "latents": 128, "k": 8, "batch_size": 256, "max_tokens": 1024}
    return fit.run(FitConfig(**{**base, "out": str(root), "device": "cpu", "precision": "float32", **kw})).runs[0]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def parent(cache: str, tmp_path_factory: pytest.TempPathFactory) -> Folder:
    return train(cache, tmp_path_factory.mktemp("ft-saes"))


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")}


def one_batch(
    run: Folder, mse_weight: float = 0.0, b_dec_shift: float = 0.0
) -> tuple[Live, torch.Tensor, torch.Tensor, Terms]:
    """The run live in its model, the first three training sequences (3, T) and their real positions, and the
    KL loss of that batch, backpropagated (into the SAE only). ``b_dec_shift`` moves the SAE's output bias
    first, for a KL well above float32's noise where the tiny model hardly feels the SAE."""
    live = go_live(load_subject(run.url, torch.device("cpu")), "float32")
    live.model.requires_grad_(False)
    with torch.no_grad():
        live.subject.sae.b_dec += b_dec_shift
    seqs = training_sequences(live.subject.cache, Specials.of(live.tokenizer))
    tokens, mask = torch.from_numpy(seqs.tokens[:3]), torch.from_numpy(seqs.mask[:3])  # (3, T)
    terms = batch_loss(live, tokens, mask, "kl", mse_weight, replay=True)
    terms.total.backward()
    assert all(p.grad is None for p in live.model.parameters())
    return live, tokens, mask, terms


def test_the_loss_of_one_batch_is_the_kl_written_out(parent: Folder, tiny_llama: Path) -> None:
    live, tokens, mask, terms = one_batch(parent)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in live.subject.sae.parameters())

    # by hand: a plain forward, and one whose layer-1 input has its real rows standardized, reconstructed, undone
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    sae = live.subject.sae

    def splice(module: torch.nn.Module, args: tuple) -> tuple:
        h = args[0].clone()
        x = h[mask]
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + 1e-6
        h[mask] = sae.decode(sae.encode((x - mean) / std)) * std + mean
        return (h, *args[1:])

    with torch.no_grad():
        p = model(tokens).logits.log_softmax(-1)  # (3, T, V)
        handle = model.model.layers[1].register_forward_pre_hook(splice)
        try:
            q = model(tokens).logits.log_softmax(-1)
        finally:
            handle.remove()
    kl = (p.exp() * (p - q)).sum(-1)[mask].mean()  # sum_v p (log p - log q), mean over real positions
    assert float(terms.model) == pytest.approx(float(kl), rel=1e-4)
    assert float(kl) > 1e-3  # a k=8 SAE of a random model costs something


def test_finetuning_lowers_heldout_kl_into_a_new_run(parent: Folder, tmp_path: Path) -> None:
    before = tree(Path(parent.url))
    result = run(FinetuneConfig(run=parent.url, max_tokens=1200, lr=3e-3, device="cpu", cache_root=str(tmp_path)))
    assert tree(Path(parent.url)) == before  # the parent, byte for byte
    assert result.folder.parent.url == str(tmp_path / "finetune") and result.folder.name.startswith(parent.name)
    record = json.loads((Path(result.folder.url) / "cfg.json").read_text())
    assert record["finetune"]["parent"] == parent.name and record["finetune"]["loss"] == "kl"
    assert record["finetune"]["max_tokens"] == 1200 and result.tokens >= 1200
    cfg = EvaluateConfig(runs=[parent.url, result.folder.url], device="cpu", cache_root=str(tmp_path), metrics=["kl"])
    old, new = evaluate.run(cfg).metrics
    assert new["kl_per_token"] < 0.9 * old["kl_per_token"]  # 0.0082 -> 0.0070 when written
    logged = np.loadtxt(Path(result.folder.url) / "log.csv", delimiter=",", skiprows=1, usecols=5, ndmin=1)
    wanted = [3e-3 * lr_factor(i, len(logged), 0.1) for i in range(len(logged))]  # the schedule the stage used
    assert np.allclose(logged, wanted)


def test_train_decoder_moves_the_decoder_and_leaves_the_encoder(parent: Folder, tmp_path: Path) -> None:
    """--train decoder: W_dec and b_dec move; W_enc and b_enc stay the parent's, bit for bit."""
    cfg = FinetuneConfig(run=parent.url, max_tokens=600, lr=3e-3, train="decoder", device="cpu", out=str(tmp_path))
    result = run(cfg)
    old, new = (load_file(Path(folder.url) / "sae.safetensors") for folder in (parent, result.folder))
    assert sorted(name for name in old if torch.equal(old[name], new[name])) == ["W_enc", "b_enc"]
    assert json.loads((tmp_path / "cfg.json").read_text())["finetune"]["train"] == "decoder"


def test_learning_rate_rises_then_decays_to_zero() -> None:
    """10 steps, warm-up 0.3: a rise over 3 steps (1/3, 2/3, 1), times the decay 1 - step / 10."""
    factors = [lr_factor(i, 10, 0.3) for i in range(10)]
    assert np.allclose(factors, [1 / 3, 2 / 3 * 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert np.allclose([lr_factor(i, 4, 0.0) for i in range(4)], [1.0, 0.75, 0.5, 0.25])  # no warm-up


def test_training_sequences_come_back_as_packing_made_them() -> None:
    """Documents [BOS text EOS] (one empty) packed into rows of 6; the rows keep text only."""
    bos, eos = 1, 2
    docs = [[10, 11, 12], [13], [], [14, 15, 16, 17, 18], [19, 20]]
    stream = np.concatenate([[bos, *d, eos] for d in docs])  # 20 tokens
    packed = stream[:18].reshape(3, 6)  # the tail is dropped
    keep = packed >= 10
    rows = np.nonzero(keep)
    found = rebuilt(packed[keep], rows[1].astype(np.uint16), 6, Specials(eos, bos))
    upto = np.array([[t <= np.flatnonzero(k).max() for t in range(6)] for k in keep])
    assert np.array_equal(found.mask, keep)
    assert np.array_equal(np.where(upto, found.tokens, -1), np.where(upto, packed, -1))
    without_bos = np.concatenate([[*d, eos] for d in docs])[:12].reshape(2, 6)
    keep = without_bos >= 10
    found = rebuilt(without_bos[keep], np.nonzero(keep)[1].astype(np.uint16), 6, Specials(eos, None))
    upto = np.array([[t <= np.flatnonzero(k).max() for t in range(6)] for k in keep])
    assert np.array_equal(np.where(upto, found.tokens, -1), np.where(upto, without_bos, -1))


def test_bad_inputs_give_one_clear_error(cache: str, parent: Folder, tmp_path: Path) -> None:
    route = train(cache, tmp_path / "route", arch="route", layer=None, route_layers="1,2")
    with pytest.raises(UserError, match="not RouteSAE"):
        run(FinetuneConfig(run=route.url, device="cpu", cache_root=str(tmp_path)))
    with pytest.raises(UserError, match="not an SAE run folder"):
        run(FinetuneConfig(run=str(tmp_path), device="cpu", cache_root=str(tmp_path)))
    with pytest.raises(UserError, match="--max-tokens"):
        FinetuneConfig(run=parent.url, max_tokens=0)
    with pytest.raises(UserError, match="--warmup"):
        FinetuneConfig(run=parent.url, warmup=1.0)
    with pytest.raises(UserError, match="--train 'encoder': use all or decoder"):
        FinetuneConfig(run=parent.url, train="encoder")
    with pytest.raises(UserError, match="parent is never written"):
        run(FinetuneConfig(run=parent.url, out=parent.url, device="cpu"))
