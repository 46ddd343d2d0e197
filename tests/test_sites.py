"""Cache sites: the MLP's input and output stored beside the residual stream (transcoders read them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.extract import stage as extract
from pipeline.infra.errors import UserError
from pipeline.llm.hooks import run_to_sites
from pipeline.llm.model import find_blocks
from pipeline.llm.sites import parse_sites
from tests.support.caches import tiny_extract_config


def _model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_mlp_sites_are_what_the_mlp_reads_and_returns(fixture: str, request: pytest.FixtureRequest) -> None:
    """mlp_in / mlp_out equal the MLP's own input and output (a hook of the test's own on the MLP module), and
    the residual stream's step over block L is the attention path plus mlp_out."""
    model = _model(request.getfixturevalue(fixture))
    blocks = find_blocks(model)
    ids = torch.randint(1, 100, (2, 12))
    seen: dict[str, torch.Tensor] = {}
    mlp = blocks[1].mlp
    attn = blocks[1].self_attn if hasattr(blocks[1], "self_attn") else blocks[1].attn
    hooks = [
        mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0], mlp_out=out)),
        attn.register_forward_hook(lambda m, a, out: seen.update(attn=out[0] if isinstance(out, tuple) else out)),
    ]
    try:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        got = run_to_sites(model, blocks, ids, [1, 2], ("resid", "mlp_in", "mlp_out"))
    torch.testing.assert_close(got["mlp_in", 1], seen["mlp_in"])
    torch.testing.assert_close(got["mlp_out", 1], seen["mlp_out"])
    torch.testing.assert_close(got["resid", 1], hidden[1])
    step = hidden[2] - hidden[1]  # what block 1 adds: its attention output, then its MLP output
    torch.testing.assert_close(step, seen["attn"] + got["mlp_out", 1], atol=1e-5, rtol=1e-4)


def test_an_mlp_site_cache_streams_pairs_of_the_same_rows(tiny_llama: Path, tmp_path: Path) -> None:
    """A cache with --sites resid,mlp_in,mlp_out stores each site per layer under its own key, scaled so that
    E||x|| = sqrt(d), and streams (mlp_in, mlp_out) of one token side by side in every batch."""
    plain = ActivationCache.open(extract.run(tiny_extract_config(tiny_llama, tmp_path / "a", max_tokens=300)).folder)
    cfg = tiny_extract_config(tiny_llama, tmp_path / "b", max_tokens=300, sites="resid,mlp_in,mlp_out")
    cache = ActivationCache.open(extract.run(cfg).folder)
    assert cache.sites == ["resid", "mlp_in", "mlp_out"] and plain.sites == ["resid"]
    assert cache.key != plain.key and "sites" not in plain.manifest["spec"]
    assert cache.site_normalizer("mlp_out").method == "scale"
    rows = next(cache.split_rows("train", cache.layers, site="mlp_out"))[1]  # (n, L, D)
    norms = np.linalg.norm(rows.astype(np.float64), axis=-1).mean(0)  # (L,)
    np.testing.assert_allclose(norms, np.sqrt(cache.d_model), rtol=0.25)  # scale fitted on the first batch
    resid = next(cache.split_rows("train", cache.layers))[1]
    np.testing.assert_array_equal(resid, next(plain.split_rows("train", plain.layers))[1])  # resid unchanged
    layer = cache.layers[0]
    spec = StreamSpec([layer], batch_size=32, sites=("mlp_in", "mlp_out"))
    batch = next(ActivationStream(cache, spec).batches(1))  # (2, B, D)
    mlp_in, mlp_out = (
        np.concatenate([rows[:, 0] for _, rows in cache.split_rows("train", [layer], site=site)])  # (n, D)
        for site in ("mlp_in", "mlp_out")
    )
    for row_in, row_out in zip(batch[0], batch[1]):  # every served pair is one stored token's pair
        match = np.flatnonzero((mlp_in == row_in.astype(np.float32)).all(axis=1))
        assert len(match) and (mlp_out[match[0]] == row_out.astype(np.float32)).all()
    assert cache.require_valid() is None  # the MLP arrays carry per-layer checksums like act
    assert any(key.startswith("train/mlp_out[") for key in cache.shards[0]["checksums"])


def test_bad_sites_are_refused() -> None:
    assert parse_sites("mlp_out, resid ,mlp_in") == ["resid", "mlp_in", "mlp_out"]
    with pytest.raises(UserError, match="resid is always stored"):
        parse_sites("mlp_in,mlp_out")
    with pytest.raises(UserError, match="unknown: attn_out"):
        parse_sites("resid,attn_out")


def test_a_stream_of_a_site_the_cache_lacks_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    cache = ActivationCache.open(extract.run(tiny_extract_config(tiny_llama, tmp_path, max_tokens=200)).folder)
    with pytest.raises(UserError, match="not mlp_in"):
        ActivationStream(cache, StreamSpec(cache.layers, 16, sites=("mlp_in",)))
