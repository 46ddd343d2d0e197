"""Steering: edits inside the running model are exact (no-ops are no-ops), effective, and cleaned up."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cache.normalize import Normalizer
from pipeline.cli import app
from pipeline.extract import stage as extract
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.errors import UserError
from pipeline.live.edit import EditSpec, Mode, Site, edit_rows
from pipeline.live.routing import route_choice
from pipeline.live.splice import logits_with, site_edits
from pipeline.live.subject import load_llm, load_subject
from pipeline.llm.hooks import replace_input, replacing
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig
from pipeline.steer import stage as steer
from pipeline.steer.config import SteerConfig
from pipeline.steer.edits import Edit, Positions, parse_edit
from pipeline.steer.intervene import Target, routed_logits, steering
from tests.support.caches import tiny_extract_config
from tests.support.steer_by_hand import add_by_hand

CPU = torch.device("cpu")
SPECIAL = frozenset({0})  # the tiny tokenizer's one special token, <|endoftext|> (EOS = BOS = pad)


@pytest.fixture(scope="module")
def run(layer_runs: list[str]) -> str:
    """The layer-2 TopK run (128 latents, k 8) of a cache of layers 1 and 2 (conftest.py, shared, read only)."""
    return layer_runs[1]


@pytest.fixture(scope="module")
def loaded(run: str) -> tuple:
    subject = load_subject(run, CPU)
    model, blocks = load_llm(subject.cache, CPU)
    tokens = torch.tensor([[5, 17, 33, 80, 120, 7, 64, 200, 11, 3]])  # (1, T) ids of the tiny vocabulary
    return subject, model, blocks, tokens


def logits(model: torch.nn.Module, blocks: torch.nn.ModuleList, tokens: torch.Tensor, target: Target, mode: str):
    with steering(model, blocks, [target], mode, Positions(), tokens.shape[1]), torch.no_grad():
        return model(input_ids=tokens).logits


def target_for(subject, edits: list[Edit]) -> Target:  # noqa: ANN001
    return Target(subject.site(), edits, SPECIAL)


def edit_hidden(h: torch.Tensor, sae: TopKSAE, edits: list[Edit], mode: str) -> torch.Tensor:
    """The rows ``h`` (M, D) of layer 0's input after the edits (standardized as the cache was)."""
    target = Target(Site(0, sae, Normalizer("standardize"), "sae"), edits, SPECIAL)
    with torch.no_grad():
        return edit_rows(h, target.site, target.spec(mode))


def test_scale_one_is_exactly_the_clean_model(loaded: tuple) -> None:
    subject, model, blocks, tokens = loaded
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
    for latent in (0, 5, 77):
        torch.testing.assert_close(
            logits(model, blocks, tokens, target_for(subject, [Edit(latent, "scale", 1.0)]), "delta"),
            clean,
            atol=0,
            rtol=0,
        )


def test_ablating_an_inactive_latent_changes_nothing_there() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig("topk", 16, 64, 4, [0]))
    h = torch.randn(6, 16)
    code = sae.encode(Normalizer("standardize").normalize(h, 0)[0])
    inactive = next(i for i in range(64) if not bool((code.indices[0] == i).any()))
    out = edit_hidden(h, sae, [Edit(inactive, "scale", 0.0)], "delta")
    fired = (code.indices == inactive) & (code.acts > 0)  # (6, k)
    unchanged = ~fired.any(-1)
    assert bool(unchanged[0])
    torch.testing.assert_close(out[unchanged], h[unchanged], atol=0, rtol=0)


def test_ablating_every_active_latent_removes_the_decoded_code() -> None:
    """delta with scale 0 on all active latents = h - std * W_dec^T z (the SAE error and b_dec stay)."""
    torch.manual_seed(1)
    sae = TopKSAE(SaeConfig("topk", 16, 64, 4, [0]))
    norm = Normalizer("standardize")
    h = torch.randn(1, 16)
    x, (mean, std) = norm.normalize(h, 0)
    code = sae.encode(x)
    edits = [Edit(int(i), "scale", 0.0) for i, a in zip(code.indices[0], code.acts[0]) if a > 0]
    out = edit_hidden(h, sae, edits, "delta")
    decoded = (code.acts[0][:, None] * sae.W_dec[code.indices[0]]).sum(0)  # W_dec^T z, no bias
    torch.testing.assert_close(out, h - std * decoded)


def test_replace_without_edits_is_the_splice(loaded: tuple) -> None:
    subject, model, blocks, tokens = loaded
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        spliced = logits_with(model, blocks, tokens, site_edits(subject.site(), mask, EditSpec(Mode.REPLACE)))
    torch.testing.assert_close(
        logits(model, blocks, tokens, target_for(subject, [Edit(0, "scale", 1.0)]), "replace"), spliced
    )


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_an_edit_changes_the_next_token_distribution(loaded: tuple, mode: str) -> None:
    subject, model, blocks, tokens = loaded
    with torch.no_grad():
        before = torch.log_softmax(
            logits(model, blocks, tokens, target_for(subject, [Edit(3, "add", 0.0)]), mode)[0, -1], -1
        )
        after = torch.log_softmax(
            logits(model, blocks, tokens, target_for(subject, [Edit(3, "add", 20.0)]), mode)[0, -1], -1
        )
    kl = float((before.exp() * (before - after)).sum())
    assert kl > 1e-3, kl


def test_positions_limit_where_the_edit_lands(loaded: tuple) -> None:
    subject, model, blocks, tokens = loaded
    target = target_for(subject, [Edit(3, "add", 20.0)])
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
        with steering(model, blocks, [target], "delta", Positions("indices", (6,)), tokens.shape[1]):
            edited = model(input_ids=tokens).logits
    torch.testing.assert_close(edited[:, :6], clean[:, :6], atol=0, rtol=0)  # causal: nothing before 6 moves
    assert not torch.allclose(edited[:, 6:], clean[:, 6:])


def test_special_token_positions_are_never_edited(loaded: tuple) -> None:
    """<|endoftext|> (id 0: EOS, BOS and pad of the tiny tokenizer) inside a batch keeps its clean residual; every
    other position gets the edit. Special positions are attention sinks the SAE never saw (the cache skips them)."""
    subject, model, blocks, _ = loaded
    tokens = torch.tensor([[5, 17, 0, 33, 80, 0, 120, 7], [0, 44, 12, 90, 3, 61, 0, 8]])  # (2, T)
    latent, value = 9, 3.0
    real = [(b, t, value) for b in range(2) for t in range(tokens.shape[1]) if tokens[b, t] != 0]
    with replace_input(blocks[2], add_by_hand(real, latent, subject.sae, subject.normalizer.eps)):
        with torch.no_grad():
            expected = model(input_ids=tokens).logits
    got = logits(model, blocks, tokens, target_for(subject, [Edit(latent, "direction", value)]), "delta")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_after_an_exception(loaded: tuple) -> None:
    subject, model, blocks, tokens = loaded
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, blocks, [target_for(subject, [Edit(3, "add", 20.0)])], "delta", Positions(), 10):
            raise RuntimeError("boom")
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)
    assert not model.get_input_embeddings()._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize(
    "text, message",
    [
        ("500=scale:0", "out of range; this SAE has 0..127"),
        ("5=boost:2", "unknown edit kind 'boost'"),
        ("5=scale:nan", "must be a finite number"),
        ("5=add:inf", "must be a finite number"),
        ("five", "cannot read --feature"),
    ],
)
def test_bad_edits_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_edit(text, 128)


def test_cli_generates_side_by_side_and_is_reproducible(run: str) -> None:
    args = ["steer", run, "--feature", "3=add:30", "--prompt", "The function returns", "--max-new-tokens", "6"]
    first = CliRunner().invoke(app, [*args, "--json", "--sample", "--seed", "4"])
    again = CliRunner().invoke(app, [*args, "--json", "--sample", "--seed", "4"])
    assert first.exit_code == 0, first.output
    record = json.loads(first.stdout.strip().splitlines()[-1])
    assert record["prompt"] == "The function returns" and record["edits"] == ["3=add:30"]
    assert record["edited"] != record["unedited"]
    assert first.stdout == again.stdout


def test_prompt_longer_than_the_model_is_refused(run: str) -> None:
    cfg = SteerConfig(run=run, features=["3=scale:0"], prompts=["word " * 600], device="cpu", max_new_tokens=4)
    with pytest.raises(UserError, match="longer than the model's 512 positions"):
        steer.run(cfg)


@pytest.fixture(scope="module")
def route(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("steer-route")
    cache = extract.run(tiny_extract_config(tiny_llama, root)).folder
    cfg = FitConfig(cache=cache.url, arch="route", latents=128, k=8, batch_size=256, out=str(root / "s"), device="cpu")
    subject = load_subject(fit.run(cfg).runs[0].url, CPU)
    model, blocks = load_llm(subject.cache, CPU)
    return subject, model, blocks


def test_route_edit_lands_at_the_routed_layer_only(route: tuple) -> None:
    """A direction edit at the last token equals adding value / w * std * d_i at that token's routed layer."""
    subject, model, blocks = route
    router, tokens, latent, value = subject.sae, torch.tensor([[5, 17, 33, 80, 120, 7, 64, 200]]), 9, 3.0
    target = Target(subject.site(), [Edit(latent, "direction", value)], SPECIAL)
    got = routed_logits(model, blocks, target, "delta", Positions("last"), tokens, tokens.shape[1])
    choice, weight = route_choice(model, blocks, subject.site(), tokens)
    layer, w = router.cfg.layers[int(choice[0, -1])], float(weight[0, -1])

    def add(h: torch.Tensor) -> torch.Tensor:  # written out by hand: the residual of the last token only
        out = h.clone()
        std = h[0, -1].float().std() + subject.normalizer.eps
        out[0, -1] += value / w * std * router.sae.W_dec[latent]
        return out

    with replace_input(blocks[layer], add), torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
    torch.testing.assert_close(got[0, :-1], clean[0, :-1], atol=1e-5, rtol=1e-5)  # earlier positions untouched
    assert (got[0, -1] - clean[0, -1]).abs().max() > 1e-3  # the edit does something


def test_routed_edits_skip_special_tokens(route: tuple) -> None:
    """A RouteSAE edit lands at each real token's routed layer (divided by its weight), never on <|endoftext|>."""
    subject, model, blocks = route
    router, latent, value = subject.sae, 9, 3.0
    tokens = torch.tensor([[0, 5, 17, 0, 33, 80, 120]])  # (1, T)
    edit = [Edit(latent, "direction", value)]
    target = Target(subject.site(), edit, SPECIAL)
    got = routed_logits(model, blocks, target, "delta", Positions(), tokens, tokens.shape[1])
    choice, weight = route_choice(model, blocks, subject.site(), tokens)
    hooks = {}
    for i, layer in enumerate(router.cfg.layers):
        rows = [(0, t, value / float(weight[0, t])) for t in range(7) if tokens[0, t] != 0 and choice[0, t] == i]
        hooks[layer] = add_by_hand(rows, latent, router.sae, subject.normalizer.eps)
    with replacing(blocks, hooks), torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_routed_hooks_are_gone_after_an_exception(route: tuple) -> None:
    subject, model, blocks = route
    target = Target(subject.site(), [Edit(3, "scale", 0.0)], SPECIAL)

    def boom(module, args, output):  # noqa: ANN001, ANN202 - raises after the routed hooks are in place
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            routed_logits(model, blocks, target, "delta", Positions(), torch.tensor([[5, 17, 33]]), 3)
    finally:
        handle.remove()
    assert all(len(block._forward_pre_hooks) == 0 for block in blocks)


def test_route_runs_steer_from_the_cli(route: tuple) -> None:
    subject = route[0]
    args = ["steer", subject.folder.url, "--feature", "3=direction:50", "--prompt", "the cat", "--max-new-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["layers"] == subject.layers and record["unedited"] != record["edited"]


def test_route_dose_response(route: tuple, tmp_path: Path) -> None:
    cfg = SteerConfig(
        run=route[0].folder.url,
        evaluate=True,
        eval_features=[3],
        strengths=[0.0, 16.0],
        heldout_tokens=32,
        max_new_tokens=3,
        prompts=["the cat"],
        out=str(tmp_path),
        device="cpu",
    )
    zero, strong = csv.DictReader((steer.run(cfg).folder.local() / "steering.csv").open())
    assert float(zero["kl"]) == 0 and float(zero["logprob_gain"]) == 0
    assert float(strong["kl"]) > 0 and float(strong["logprob_gain"]) > 0
