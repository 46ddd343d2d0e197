"""Every registered architecture honours the one SAE interface the stages use, so a new architecture
is a module in pipeline/sae/ and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.fit.config import FitConfig, Training
from pipeline.fit.train import make_member, train_step
from pipeline.infra.files import Folder
from pipeline.sae.interface import REGISTRY, Latents, SaeConfig, build_sae, trainable_archs

D, N = 8, 32


def random_sae(arch: str) -> torch.nn.Module:
    """An SAE of ``arch`` with every parameter random (thresholds, gates and biases included)."""
    routed = arch == "route"
    cfg = SaeConfig(arch, D, N, 0 if arch in ("relu", "jumprelu", "gated") else 4, [1, 2] if routed else [1])
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "W_" not in name and "router" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return sae.double()


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_arch_encodes_decodes_and_writes_consistently(arch: str) -> None:
    sae = random_sae(arch)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    latents = sae.encode(x)
    dense = sae.dense_code(x)  # (16, N)
    assert dense.shape == (16, N) and bool((dense > 0).any())
    # the sparse code and the dense code are one code
    from_sparse = torch.zeros_like(dense).scatter_add(-1, latents.indices, latents.acts)
    torch.testing.assert_close(from_sparse, dense)
    # decoding = the decoder's linear part on the code + the reconstruction of an empty code
    empty = sae.decode(Latents(torch.zeros(16, 1, dtype=x.dtype), torch.zeros(16, 1, dtype=torch.long)))
    torch.testing.assert_close(sae.decode(latents), sae.write(dense) + empty)
    # write directions are what one unit of a latent adds
    torch.testing.assert_close(sae.directions([3, 5]), sae.write(torch.eye(N, dtype=x.dtype)[[3, 5]]))
    assert sae.device == torch.device("cpu")


@pytest.mark.parametrize("arch", trainable_archs())
def test_every_trainable_arch_takes_a_training_step(arch: str, tmp_path: Path) -> None:
    layers = [1, 2] if arch == "route" else [1]
    sae_cfg = SaeConfig(arch, D, N, 4, layers)
    settings = Training.of(FitConfig(arch=arch, lr=1e-2, schedule="constant"), dead_tokens=10**9, k_aux=4)
    member = make_member(Folder.at(tmp_path), sae_cfg, settings, False, list(range(len(layers))), torch.device("cpu"))
    before = {k: v.clone() for k, v in member.model.state_dict().items()}
    x = torch.randn(64, *([len(layers)] if arch == "route" else []), D, generator=torch.Generator().manual_seed(3))
    metrics = train_step(member, x, total_steps=10)
    assert 0 < metrics["nmse"] < 10
    moved = [k for k, v in member.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("W_enc" in k for k in moved) and any("W_dec" in k for k in moved)
