"""Export to the SAELens and sparsify layouts, and back into our own model with identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from pipeline.interop.export import export_run
from pipeline.interop.importing import read_checkpoint
from pipeline.sae.folder import load_sae
from tests.support.caches import synthetic_cache


def trained(tmp_path: Path, method: str, arch: str = "topk") -> str:
    normalization = {"method": method, "eps": 1e-6, "scales": {"0": 0.5, "1": 2.0} if method == "scale" else {}}
    cache = synthetic_cache(tmp_path / method, [1200], layers=(0, 1), d=16, normalization=normalization)
    cfg = FitConfig(
        cache=cache.url,
        arch=arch,
        layer=1 if arch == "topk" else None,
        latents=64,
        k=4,
        batch_size=128,
        out=str(tmp_path / method / "saes"),
        device="cpu",
        precision="float32",
    )
    return fit.run(cfg).runs[0].url


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("method", ["none", "standardize", "scale"])
def test_export_loads_back_with_identical_outputs(tmp_path: Path, fmt: str, method: str) -> None:
    run = trained(tmp_path, method)
    folder = export_run(run, fmt, str(tmp_path / "export"))
    ours, _ = load_sae(run)
    foreign = read_checkpoint(Path(folder.url))  # the files as `sae-pipe import` reads them
    theirs, normalization = foreign.module(), foreign.normalization.method
    x = torch.randn(50, 16)
    with torch.no_grad():
        if method == "scale":  # the cache stored 2.0 * x for layer 1; the export takes raw x
            expected = ours(2.0 * x).x_hat / 2.0
        else:
            expected = ours(x).x_hat
        torch.testing.assert_close(theirs(x).x_hat, expected, atol=1e-5, rtol=1e-5)
    assert normalization == ("standardize" if method == "standardize" else "none")
    cfg = json.loads((Path(folder.url) / "cfg.json").read_text())
    if fmt == "saelens":
        assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
        assert cfg["normalize_activations"] == ("layer_norm" if method == "standardize" else "none")
    else:
        assert Path(folder.url).name == "layers.0"  # sparsify hooks block outputs: input of block 1
        note = (Path(folder.url).parent / "NOTE.md").read_text()
        assert ("cannot represent" in note) == (method == "standardize")


def test_export_refuses_routesae_and_nonempty_folders(tmp_path: Path) -> None:
    run = trained(tmp_path, "none", arch="route")
    with pytest.raises(UserError, match="RouteSAEs cannot be exported"):
        export_run(run, "saelens", str(tmp_path / "x"))
    topk = trained(tmp_path / "b", "none")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_run(topk, "sparsify", str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown export format"):
        export_run(topk, "onnx", str(tmp_path / "y"))
