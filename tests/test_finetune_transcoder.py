"""`sae-pipe finetune` of a skip transcoder on a tiny random Llama: one batch's KL against the model run by hand
with the transcoder's prediction, written out from its weights, in place of block 1's MLP output (and its MSE
term against the MLP's own output), which a few steps on its gradient lower; the stage writes a fine-tuned
skip transcoder. (Held-out KL is no test here: zeroing this random model's MLP output costs a KL of ~1e-4.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.extract import stage as extract
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.loss import batch_loss
from pipeline.finetune.stage import run
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.files import Folder
from pipeline.sae.folder import load_sae
from tests.support.caches import tiny_extract_config
from tests.test_finetune import one_batch


@pytest.fixture(scope="module")
def parent(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Folder:
    root = tmp_path_factory.mktemp("ft-transcoder")
    cfg = tiny_extract_config(tiny_llama, root, layers="1", max_tokens=2400, heldout=0.25, sites="resid,mlp_in,mlp_out")
    cache = extract.run(cfg).folder.url
    settings = {"latents": 128, "k": 8, "batch_size": 256, "max_tokens": 1024, "precision": "float32"}
    config = FitConfig(
        cache=cache, arch="transcoder", skip=True, layer=1, out=str(root / "saes"), device="cpu", **settings
    )  # type: ignore[arg-type]
    return fit.run(config).runs[0]


def prediction(weights: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """z = TopK_k(ReLU(x W_enc^T + b_enc)), y = z W_dec + b_dec + x W_skip^T, for rows x (n, D)."""
    pre = (x @ weights["W_enc"].T + weights["b_enc"]).relu()  # (n, N)
    kept = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, kept.indices, kept.values)  # (n, N)
    return z @ weights["W_dec"] + weights["b_dec"] + x @ weights["W_skip"].T  # (n, D)


def test_the_loss_of_one_batch_is_the_kl_with_the_prediction_for_the_mlp_output(
    parent: Folder, tiny_llama: Path
) -> None:
    live, tokens, mask, terms = one_batch(parent, mse_weight=0.5, b_dec_shift=4.0)  # KL ~5e-3, not ~1e-4
    assert bool(live.subject.sae.W_skip.grad.abs().sum() > 0)  # the skip path trains too

    # by hand: block 1's MLP output at the real positions becomes the prediction from its input, on the model's scale
    sites = live.subject.cfg["cache"]["site_normalization"]
    c_in, c_out = (sites[s]["scales"]["1"] for s in ("mlp_in", "mlp_out"))  # x_n = c x
    weights = {name: value.detach() for name, value in live.subject.sae.state_dict().items()}
    k, seen = live.subject.sae.cfg.k, {}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def splice(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        seen["x"], seen["y"] = args[0][mask] * c_in, out[mask] * c_out  # (n, D) each, scaled as the cache scales
        new = out.clone()
        new[mask] = prediction(weights, seen["x"], k) / c_out
        return new

    with torch.no_grad():
        p = model(tokens).logits.log_softmax(-1)  # (3, T, V)
        handle = model.model.layers[1].mlp.register_forward_hook(splice)
        try:
            q = model(tokens).logits.log_softmax(-1)
        finally:
            handle.remove()
    kl = (p.exp() * (p - q)).sum(-1)[mask].mean()  # sum_v p (log p - log q), mean over real positions
    err = (seen["y"] - prediction(weights, seen["x"], k)).pow(2).sum(-1) / seen["y"].pow(2).sum(-1)  # (n,)
    assert float(terms.model) == pytest.approx(float(kl), rel=1e-4)
    assert float(terms.mse) == pytest.approx(float(err.mean()), rel=1e-4)
    assert float(kl) > 1e-3  # the shifted output bias costs the model something

    optimizer = torch.optim.Adam(live.subject.sae.parameters(), lr=1e-3)
    for _ in range(4):  # the gradient reaches the transcoder's weights with the sign that lowers the KL
        optimizer.zero_grad()
        batch_loss(live, tokens, mask, "kl", 0.0, replay=True).total.backward()
        optimizer.step()
    assert float(batch_loss(live, tokens, mask, "kl", 0.0, replay=True).model) < 0.97 * float(kl)


def test_finetune_writes_a_fine_tuned_skip_transcoder(parent: Folder, tmp_path: Path) -> None:
    result = run(FinetuneConfig(run=parent.url, max_tokens=300, lr=3e-3, device="cpu", cache_root=str(tmp_path)))
    old, _ = load_sae(parent.url)
    new, record = load_sae(result.folder.url)
    assert (
        record["sae"]["arch"] == "transcoder" and record["sae"]["skip"] and record["finetune"]["parent"] == parent.name
    )
    assert not torch.equal(old.W_skip, new.W_skip)  # the skip path was trained
