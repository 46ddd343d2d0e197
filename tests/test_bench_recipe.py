"""The recipe benchmark's count of latents silent on every training row (not only the held-out ones)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.recipe import silent_in_training
from pipeline.cache.reader import ActivationCache
from pipeline.fit.config import FitConfig
from pipeline.fit.stage import fit
from pipeline.sae.folder import load_sae, save_weights
from tests.support.caches import synthetic_cache


def test_a_latent_firing_only_on_the_last_training_row_is_not_silent(tmp_path: Path) -> None:
    """k - 1 latents fire everywhere (bias +1e4), one only on the last row of the last shard, the rest
    nowhere: silent share = 1 - k / N. Reading all but that row would count k - 1."""
    cache = synthetic_cache(tmp_path, [60, 50], layers=(12,), d=16)
    (run,) = fit(FitConfig(cache=cache.url, layer=12, latents=32, k=4, max_tokens=64, batch_size=32, out=str(tmp_path)))
    sae, _ = load_sae(run)
    store = ActivationCache.open(cache.url)
    last = torch.from_numpy(store.layer_rows(1, "train", 0)[-1])  # (D,)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1e4)
        sae.b_enc[:3] = 1e4  # always in the top k
        sae.W_enc[3] = last / last.norm()
        sae.b_enc[3] = -(last.norm() - 1e-3)  # above zero on rows nearly equal to the last one only
    save_weights(run, sae)
    assert silent_in_training(run.url, cache.url, layer=12) == 1 - 4 / 32
