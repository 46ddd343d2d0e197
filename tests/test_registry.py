"""Every registered architecture honours the one SAE interface the stages use, so a new architecture
is a module in pipeline/sae/ and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cache.normalize import Normalizer
from pipeline.circuit.methods import Lens
from pipeline.circuit.spliced import ablation_values, batches, single_layer
from pipeline.circuit.tasks import Pair
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.train import make_member, train_step
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.live.edit import Change, EditSpec, Mode, Site
from pipeline.live.logits import pushed_at_last
from pipeline.live.routing import Routing
from pipeline.live.splice import site_edits
from pipeline.llm.hooks import MlpOut, replacing
from pipeline.llm.model import find_blocks
from pipeline.sae.interface import REGISTRY, Latents, SaeConfig, build_sae, trainable_archs
from pipeline.steer.edits import Edit, Positions
from pipeline.steer.intervene import Target, steering

D, N = 8, 32


def random_sae(arch: str) -> torch.nn.Module:
    """An SAE of ``arch`` with every parameter random (thresholds, gates and biases included)."""
    routed = arch == "route"
    k = 0 if arch in ("relu", "jumprelu", "gated") else 4
    cfg = SaeConfig(arch, D, N, k, [1, 2] if routed else [1], skip=arch == "transcoder")
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if ("W_" not in name and "router" not in name) or name == "W_skip":  # the skip path starts at zero
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
    # the encoder's rows and bias: a firing latent's activation is its pre-activation (x - pre-bias) . row + bias
    rows, bias = sae.encoder_rows()  # (N, D), (N,)
    assert rows.shape == (N, D) and bias.shape == (N,) and not rows.requires_grad
    if arch not in ("gated", "route"):  # gated: the magnitude path's bias; route: the router's input
        pre = (x - sae.pre_bias) @ rows.T + bias  # (16, N)
        torch.testing.assert_close(dense[dense > 0], pre[dense > 0])


@pytest.mark.parametrize("arch", trainable_archs())
def test_every_trainable_arch_takes_a_training_step(arch: str, tmp_path: Path) -> None:
    layers = [1, 2] if arch == "route" else [1]
    sae_cfg = SaeConfig(arch, D, N, 4, layers)
    settings = Training.of(FitConfig(arch=arch, lr=1e-2, schedule="constant"), dead_tokens=10**9, k_aux=4)
    member = make_member(Folder.at(tmp_path), sae_cfg, settings, False, list(range(len(layers))), torch.device("cpu"))
    before = {k: v.clone() for k, v in member.model.state_dict().items()}
    blocks = len(layers) * len(REGISTRY[arch].sites)  # what one row holds: routed layers, or a transcoder's pair
    shape = (64, blocks, D) if REGISTRY[arch].multi_layer else (64, D)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    metrics = train_step(member, x, total_steps=10)
    assert 0 < metrics["nmse"] < 10
    moved = [k for k, v in member.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("W_enc" in k for k in moved) and any("W_dec" in k for k in moved)
    grouped = [id(p) for group in member.optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in member.model.parameters())  # each parameter trained, once


# --- inside the running model: the splice, a steering edit and a circuit mask, through pipeline/live only ---

SPECIAL = frozenset({0})  # the token no edit touches
TOKENS = torch.tensor([[5, 0, 17, 33, 9], [0, 44, 12, 0, 3]])  # (B, T) with special positions
MASK = TOKENS != 0  # (B, T) real positions, written out


C_IN, C_OUT = 2.0, 0.5  # a transcoder's MLP sites' scale factors: x = C_IN mlp_in, mlp_out = y / C_OUT


def live_site(arch: str) -> tuple[Site, Routing | None]:
    """A float32 random SAE of ``arch`` at layer 1, standardized (a transcoder: its MLP sites scaled), and
    (routed SAEs) a routing drawn at random."""
    sae = random_sae(arch).float()
    site = Site(sae.cfg.layers[0], sae, Normalizer("standardize"), arch)
    if sae.sites != ("resid",):
        scaled = (Normalizer("scale", scales={1: c}) for c in (C_IN, C_OUT))
        return Site(1, sae, next(scaled), arch, next(scaled)), None
    if not site.routed:
        return site, None
    gen = torch.Generator().manual_seed(4)
    choice = torch.randint(0, len(site.layers), TOKENS.shape, generator=gen)  # (B, T)
    return site, Routing(choice, 0.5 + torch.rand(TOKENS.shape, generator=gen))


def mlp_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A transcoder's block-1 MLP input and output (B, T, D) each, on the model's scale."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*TOKENS.shape, D, generator=gen), 3 * torch.randn(*TOKENS.shape, D, generator=gen) + 1


def mlp_code(site: Site, x_in: torch.Tensor) -> torch.Tensor:
    """A transcoder's dense code (B, T, N) of the MLP input rows ``x_in`` (B, T, D), by hand: C_IN x_in."""
    return site.sae.dense_code((C_IN * x_in).flatten(0, 1)).view(*x_in.shape[:2], N)


def by_hand(h: torch.Tensor, layer: int, site: Site, routing: Routing | None) -> tuple:
    """Per token of ``h`` (B, T, D) at ``layer``: whether it is edited there, its standardized x, std and weight."""
    mean, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True) + 1e-6  # (B, T, 1) Bessel std + eps
    here, w = MASK.clone(), torch.ones(TOKENS.shape)
    if routing is not None:
        here &= routing.choice == site.layers.index(layer)
        w = routing.weight
    return here, (h - mean) / std, mean, std, w[..., None]


def unchanged(code: torch.Tensor | Latents) -> Change:
    """z' = z: a change of zeros (on one latent of a sparse code, on all of a dense one)."""
    if isinstance(code, Latents):
        return Change(torch.zeros(len(code.acts), 1), torch.tensor([3]))
    return Change(torch.zeros_like(code))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_an_unchanged_code_is_the_identity_in_delta_and_the_reconstruction_in_replace(arch: str, dense: bool) -> None:
    """delta: h exactly (the SAE's error passes through); replace: the SAE's reconstruction de-standardized,
    divided by the routing weight for a routed SAE, at real positions (routed: at the token's layer) only."""
    site, routing = live_site(arch)
    delta = site_edits(site, MASK, EditSpec(Mode.DELTA, unchanged, dense), routing)
    replace = site_edits(site, MASK, EditSpec(Mode.REPLACE, unchanged, dense), routing)
    if site.transcodes:  # the MLP's output: kept (delta), or the prediction from its input mapped back (replace)
        assert set(delta) == set(replace) == {MlpOut(1)}
        x_in, out = mlp_rows(0)
        assert torch.equal(delta[MlpOut(1)](x_in, out), out)
        x = C_IN * x_in[MASK]  # (M, D)
        expected = out.clone()
        expected[MASK] = site.sae.output(x, site.sae.encode(x)) / C_OUT
        torch.testing.assert_close(replace[MlpOut(1)](x_in, out), expected, atol=1e-5, rtol=1e-5)
        return
    assert set(delta) == set(replace) == set(site.layers)
    for layer in site.layers:
        h = 3 * torch.randn(*TOKENS.shape, D, generator=torch.Generator().manual_seed(layer)) + 1  # (B, T, D)
        assert torch.equal(delta[layer](h), h)
        here, x, mean, std, w = by_hand(h, layer, site, routing)
        x_hat = site.sae.decode(site.sae.encode((x * w)[here])) / w[here]  # (M, D)
        expected = h.clone()
        expected[here] = x_hat * std[here] + mean[here]
        torch.testing.assert_close(replace[layer](h), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_arch_steers_by_hand(arch: str) -> None:
    """A direction edit adds value * a_max * std * d_i / w and a set edit (value - z_i) * std * d_i / w at the real
    positions (routed: at each token's layer), in delta mode; d_i the latent's write direction (a transcoder: into
    its MLP's output, divided by C_OUT). `steering` (one generation's hooks) edits the model as these edits do."""
    site, routing = live_site(arch)
    latent, value, a_max = 3, 2.0, 1.5
    for kind in ("direction", "set"):
        target = Target(site, [Edit(latent, kind, value)], SPECIAL, {latent: a_max})
        edits = site_edits(site, MASK, target.spec("delta"), routing)
        if not site.routed:
            steered_as(target)
        if site.transcodes:
            x_in, out = mlp_rows(1)
            step = value * a_max if kind == "direction" else value - mlp_code(site, x_in)[..., latent, None]
            expected = torch.where(MASK[..., None], out + step / C_OUT * site.sae.directions([latent])[0], out)
            torch.testing.assert_close(edits[MlpOut(1)](x_in, out), expected, atol=1e-5, rtol=1e-5)
            continue
        for layer in site.layers:
            h = torch.randn(*TOKENS.shape, D, generator=torch.Generator().manual_seed(layer))  # (B, T, D)
            here, x, _, std, w = by_hand(h, layer, site, routing)
            old = site.sae.dense_code((x * w).flatten(0, 1))[:, latent].view(TOKENS.shape)[..., None]  # (B, T, 1)
            step = value * a_max if kind == "direction" else value - old  # (B, T, 1) or ()
            expected = torch.where(here[..., None], h + step * std / w * site.sae.directions([latent])[0], h)
            torch.testing.assert_close(edits[layer](h), expected, atol=1e-5, rtol=1e-5)


def steered_as(target: Target) -> None:
    """In either mode, the logits of a forward under `steering` (every position but the special ones) are the
    logits under the site's edits, and differ from the clean model's."""
    model, blocks = tiny_model()
    with torch.no_grad():
        clean = model(input_ids=TOKENS).logits
        for mode in ("delta", "replace"):
            with replacing(blocks, site_edits(target.site, MASK, target.spec(mode))):
                expected = model(input_ids=TOKENS).logits
            with steering(model, blocks, [target], mode, Positions(), TOKENS.shape[1]) as tally:
                steered = model(input_ids=TOKENS).logits
            torch.testing.assert_close(steered, expected)
            assert tally.positions == int(MASK.sum()) and not torch.allclose(steered, clean)


def tiny_model() -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """A random 3-block Llama of width D (no file, a few milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=D, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model, find_blocks(model)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_single_layer_arch_takes_a_circuit_mask(arch: str) -> None:
    """Every latent kept is the clean model; every latent zero-ablated is h - std * W^T z at the real positions
    (the error kept; a transcoder: its MLP's output minus W^T z / C_OUT), by hand; the mask has a gradient. A routed
    SAE is refused with one clear error."""
    site, _ = live_site(arch)
    if site.routed:
        with pytest.raises(UserError, match="circuits are found over single-layer runs"):
            single_layer(site)
        return
    model, blocks = tiny_model()
    pairs = [Pair([5, 0, 17, 33], [5, 0, 17, 40], 7, 9), Pair([0, 44, 12, 3], [0, 44, 12, 8], 7, 9)]
    (batch,) = batches(pairs, 2, set(SPECIAL), torch.device("cpu"))
    lens = Lens(model, blocks, [single_layer(site)], ablation_values(model, blocks, [site], [batch], "zero"))

    def zero_ablated(h: torch.Tensor) -> torch.Tensor:
        std = h.std(-1, keepdim=True) + 1e-6
        z = site.sae.dense_code(((h - h.mean(-1, keepdim=True)) / std).flatten(0, 1))  # (B * T, N)
        return torch.where(batch.real[..., None], h - std * (z @ site.sae.directions()).view(h.shape), h)

    def zero_ablated_mlp(x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # a transcoder: its MLP's output
        written = mlp_code(site, x_in) @ site.sae.directions() / C_OUT  # (B, T, D)
        return torch.where(batch.real[..., None], out - written, out)

    ablation = {MlpOut(site.layer): zero_ablated_mlp} if site.transcodes else {site.layer: zero_ablated}
    with torch.no_grad():
        clean = model(input_ids=batch.clean).logits[:, -1]
        with replacing(blocks, ablation):
            ablated = model(input_ids=batch.clean).logits[:, -1]
    keep = [torch.ones(N, requires_grad=True)]
    ld = lens.ld(batch, keep)
    torch.testing.assert_close(ld, clean[:, 7] - clean[:, 9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens.ld(batch, [torch.zeros(N)]), ablated[:, 7] - ablated[:, 9], atol=1e-5, rtol=1e-4)
    (grad,) = torch.autograd.grad(ld.sum(), keep)
    assert bool(grad.abs().gt(0).any())


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_arch_pushes_its_output_score_where_it_writes(arch: str) -> None:
    """An output score's push (pipeline.live.logits) of step (b, D) lands on the last token only: block L's input
    plus step x that token's std (+ eps) for an SAE of the residual stream, its MLP's output plus step / C_OUT for a
    transcoder."""
    site, _ = live_site(arch)
    d = site.sae.directions([3])[0]  # (D,)
    step = torch.stack([2.0 * d, -d])  # (2, D): two pushes in one batch
    ((where, edit),) = pushed_at_last(site, step).items()
    h = 3 * torch.randn(2, 4, D, generator=torch.Generator().manual_seed(5)) + 1  # (b, T, D)
    if site.transcodes:
        assert where == MlpOut(1)
        got, expected = edit(torch.randn(2, 4, D), h), h[:, -1] + step / C_OUT
    else:
        assert where == site.layer
        got, expected = edit(h), h[:, -1] + step * (h[:, -1].std(-1, keepdim=True) + 1e-6)
    assert torch.equal(got[:, :-1], h[:, :-1])
    torch.testing.assert_close(got[:, -1], expected, atol=1e-5, rtol=1e-5)
