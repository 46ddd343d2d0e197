"""Transcoders: a TopK code of an MLP's input that reconstructs its output, trained from the cache's MLP sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.train import make_member, step_of, train_step
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.interpret.features import collect
from pipeline.live.edit import EditSpec, Mode, Site
from pipeline.live.logits import SCORE_PROMPT, SCORE_PUSH, SCORE_TOKENS, feature_output_scores
from pipeline.live.splice import logits_with, site_edits, zero_edits
from pipeline.llm.divergence import kl_sum, log_probs, reference
from pipeline.llm.hooks import replace_input
from pipeline.llm.model import find_blocks
from pipeline.llm.sites import SITES
from pipeline.llm.unembed import unembedding
from pipeline.sae.archs.topk import auxk_loss
from pipeline.sae.archs.transcoder import Transcoder
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import SaeConfig, Step
from tests.support.caches import tiny_extract_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def site_cache(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("sites")
    return extract.run(tiny_extract_config(tiny_llama, root, max_tokens=2000, sites="resid,mlp_in,mlp_out")).folder.url


def test_forward_is_the_transcoder_formula_written_out() -> None:
    """y_hat = W_dec^T TopK(ReLU(W_enc x_in + b_enc)) + b_dec + W_skip x_in: no pre-bias on the input, the target
    is the pair's second row, and the code is the input's."""
    torch.manual_seed(0)
    model = Transcoder(SaeConfig("transcoder", 6, 16, 3, [1], skip=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    pair = torch.randn(5, 2, 6)  # (B, 2, D): mlp_in, mlp_out
    out = model(pair)
    x_in = pair[:, 0]
    pre = (x_in @ model.W_enc.T + model.b_enc).relu()  # (B, N)
    top = pre.topk(3, dim=1)
    code = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    expected = code @ model.W_dec + model.b_dec + x_in @ model.W_skip.T  # (B, D)
    torch.testing.assert_close(out.x_hat, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x, pair[:, 1])
    torch.testing.assert_close(out.encoded, x_in)


def outlier_pairs(generator: torch.Generator, b: int, encoder: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """(b, 2, D) pairs of a sparse MLP: its output sums the ``atoms`` of the 3 ``encoder`` rows its input reads
    most, and its input then gets a large channel of the same sign on every token, as a pre-MLP norm's outlier
    weight gives SmolLM2's MLP inputs (channel 247 at -12, a spread of 2)."""
    d = encoder.shape[1]
    x_in = torch.randn(b, d, generator=generator)  # (b, D)
    pre = x_in @ encoder.T / d**0.5  # (b, atoms)
    top = pre.topk(3, dim=1)
    y = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ atoms / d**0.5  # (b, D)
    x_in[:, 0] += 20.0
    return torch.stack([x_in, y], dim=1)


def test_start_centres_the_code_and_zeroes_the_decoder() -> None:
    """An MLP input with one large channel of the same sign on every token (a pre-MLP norm weight's outlier):
    after ``start`` each latent's pre-activation has mean zero over the first batch, b_dec is the mean output,
    the batch's top-k codes spread over the dictionary instead of the few latents the offset favours, and the
    decoder is zero, so the first step's encoder gradient is zero and the output is b_dec."""
    torch.manual_seed(0)
    model = Transcoder(SaeConfig("transcoder", 16, 64, 4, [1]))
    x_in = torch.randn(512, 16)
    x_in[:, 0] += 40.0  # (B, D): the shared outlier channel
    pair = torch.stack([x_in, torch.randn(512, 16) + 3.0], dim=1)  # (B, 2, D)
    uncentred = model.encode(x_in).indices.unique().numel()
    model.start(pair, Step(0, 0.0, torch.zeros(64, dtype=torch.bool), False, lambda t: t))
    pre = x_in @ model.W_enc.detach().T + model.b_enc.detach()  # (B, N)
    torch.testing.assert_close(pre.mean(dim=0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.b_dec.detach(), pair[:, 1].mean(dim=0))
    centred = model.encode(x_in).indices.unique().numel()
    assert uncentred <= 40 and centred >= 60, (uncentred, centred)
    assert not model.W_dec.detach().any()
    model(pair).x_hat.pow(2).sum().backward()
    assert not model.W_enc.grad.any() and model.W_dec.grad.any()  # type: ignore[union-attr]


def test_auxk_gives_a_transcoders_free_decoder_rows_their_whole_gradient() -> None:
    """AuxK's gradient on the dead latents' decoder rows of a transcoder is the whole gradient of a dense top-k of
    the dead latents written out here: its rows are free (was: made tangent, as if they were unit rows)."""
    torch.manual_seed(1)
    model = Transcoder(SaeConfig("transcoder", 8, 32, 2, [1]))
    model.prepare_training(Training.of(FitConfig(arch="transcoder"), lr=1e-3, k_aux=4, dead_tokens=1))
    with torch.no_grad():
        model.W_dec.copy_(0.3 * torch.randn(32, 8))  # free rows, not unit
    pair = torch.randn(64, 2, 8)  # (B, 2, D)
    dead = torch.arange(32) >= 16  # (N,) the last 16 latents dead
    out = model.train()(pair)
    aux = auxk_loss(model, out, Step(5, 0.0, dead, False, lambda t: t), k_aux=4)
    aux.backward()
    w_enc, b_enc, w_dec = (p.detach()[dead] for p in (model.W_enc, model.b_enc, model.W_dec))
    leaf = w_dec.clone().requires_grad_()
    pre = (pair[:, 0] @ w_enc.T + b_enc).relu()  # (B, 16) the dead latents' code, no pre-bias
    top = pre.topk(4, dim=1)
    guess = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ leaf  # (B, D)
    residual = (out.x - out.x_hat).detach()
    (((guess - residual) ** 2).sum() / (residual - residual.mean(0)).pow(2).sum()).backward()
    assert model.W_dec.grad is not None
    torch.testing.assert_close(model.W_dec.grad.to_dense()[dead], leaf.grad, atol=1e-6, rtol=1e-4)


def test_latents_of_a_transcoder_read_from_an_outlier_input_stay_alive(tmp_path: Path) -> None:
    """fit's own steps on a sparse MLP (64 atoms, 3 per token) whose input has an outlier channel: from a
    zero, free decoder the encoder is not pushed down before the rows have grown, so most latents keep
    firing and the output is learnt. With unit decoder rows pointed at the first batch's outputs (the start
    before) 76 % of the latents were dead by the end and the FVU 0.53; this start: 45 % and 0.28."""
    generator = torch.Generator().manual_seed(0)
    encoder, atoms = torch.randn(64, 32, generator=generator), torch.randn(64, 32, generator=generator)
    settings = Training.of(FitConfig(arch="transcoder", lr=1e-2), dead_tokens=1024, k_aux=16)  # fit's schedule
    member = make_member(Folder.at(tmp_path), SaeConfig("transcoder", 32, 128, 4, [0]), settings, False, [0], CPU)
    member.model.start(outlier_pairs(generator, 256, encoder, atoms), step_of(member, 1))
    for _ in range(200):
        metrics = train_step(member, outlier_pairs(generator, 256, encoder, atoms), 200)
    assert metrics["dead_share"] < 0.6 and metrics["fvu"] < 0.4, metrics


def test_fit_trains_a_skip_transcoder_from_the_mlp_sites(site_cache: str, tmp_path: Path) -> None:
    base = {"cache": site_cache, "layer": 1, "latents": 128, "k": 8, "batch_size": 128, "epochs": 3}
    common = {**base, "out": str(tmp_path), "device": "cpu", "log_every": 2, "pool_mb": 1, "precision": "float32"}
    (run,) = fit.run(FitConfig(arch="transcoder", skip=True, lr=3e-3, **common)).runs  # type: ignore[arg-type]
    cfg = run.read_json("cfg.json")
    assert "transcoder-skip" in run.name and cfg["sae"]["skip"] is True
    assert cfg["cache"]["site_normalization"]["mlp_out"]["method"] == "scale"  # how to map y_hat back
    log = np.genfromtxt(f"{run.url}/log.csv", delimiter=",", names=True)
    assert log["fvu"][0] > 0.9 and log["fvu"][-1] < 0.7, (log["fvu"][0], log["fvu"][-1])  # 1: the mean output
    model, _ = load_sae(run)  # on held-out pairs read from the cache by site: it predicts mlp_out from mlp_in
    cache = ActivationCache.open(site_cache)
    x_in, y = (np.concatenate([r[:, 0] for _, r in cache.split_rows("heldout", [1], site=s)]) for s in SITES[1:])
    with torch.no_grad():
        y_hat = model(torch.from_numpy(np.stack([x_in, y], 1))).x_hat.numpy()  # (n, D)
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu < 0.9, fvu  # a random tiny MLP in 45 steps; predicting mlp_in instead scores above 1
    (metrics,) = evaluate.run(EvaluateConfig(runs=[run.url], out=str(tmp_path / "eval"), device="cpu")).metrics
    assert metrics["fvu"] == pytest.approx(float(fvu), rel=1e-3)  # of the MLP's output, on the same pairs
    assert 0 < metrics["kl_per_token"] < metrics["kl_zero_per_token"]  # the baseline: the MLP ablated
    with torch.no_grad():  # interpret's tables encode the MLP's input rows, as evaluate does
        acts = collect(model, [1], cache, 0, 64, None, None)
    assert acts.n_rows == len(x_in) and len(acts.latent) == pytest.approx(metrics["l0"] * len(x_in))


def test_a_cache_without_mlp_sites_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    cache = extract.run(tiny_extract_config(tiny_llama, tmp_path, max_tokens=200)).folder.url
    with pytest.raises(UserError, match="extract it with --sites resid,mlp_in,mlp_out"):
        fit.run(
            FitConfig(cache=cache, arch="transcoder", layer=1, latents=64, k=4, out=str(tmp_path / "o"), device="cpu")
        )
    with pytest.raises(UserError, match="--skip adds a skip path to a transcoder"):
        fit.run(FitConfig(cache=cache, arch="topk", skip=True, layer=1, latents=64, k=4, out=str(tmp_path / "o")))


def _linear_mlp_model(folder: Path) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.Tensor]:
    """The tiny Llama with block 1's MLP replaced by a linear map A (D, D): a map a transcoder can match exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = find_blocks(model)
    linear = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3)
    blocks[1].mlp = linear
    return model, blocks, linear.weight.detach().clone()


def test_a_transcoder_equal_to_its_mlp_splices_in_with_kl_zero(tiny_llama: Path) -> None:
    """A skip transcoder whose skip path is the (linear) MLP, scaled between the sites' normalizations, spliced
    at the MLP's output changes nothing (KL ~ 0); a wrong map, or the MLP ablated, does; special tokens stay."""
    model, blocks, a = _linear_mlp_model(tiny_llama)
    s_in, s_out = 2.0, 0.5  # the sites' `scale` factors: x_n = s_in x_in, y = y_n / s_out
    sae = Transcoder(SaeConfig("transcoder", 64, 32, 4, [1], skip=True)).eval()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_skip.copy_(a * s_out / s_in)  # type: ignore[union-attr]
    site = Site(1, sae, Normalizer("scale", scales={1: s_in}), "t", Normalizer("scale", scales={1: s_out}))
    tokens = torch.randint(8, 100, (2, 10))
    tokens[:, 3] = 7  # a special token (not the pad id, whose embedding is zero): never edited
    mask = tokens != 7
    spec = EditSpec(Mode.REPLACE)
    with torch.no_grad():
        clean_logits = logits_with(model, blocks, tokens, {})[mask]  # (n, V)
        exact_logits = logits_with(model, blocks, tokens, site_edits(site, mask, spec))[mask]
        sae.W_skip.mul_(1.5)  # type: ignore[union-attr]
        wrong_logits = logits_with(model, blocks, tokens, site_edits(site, mask, spec))[mask]
        clean = reference(log_probs(clean_logits))
        kl_exact, kl_wrong = (kl_sum(clean, log_probs(x)) for x in (exact_logits, wrong_logits))
        torch.testing.assert_close(exact_logits, clean_logits, atol=1e-5, rtol=1e-5)
        assert (wrong_logits - clean_logits).abs().max() > 1e-3
        assert kl_exact < 1e-3 * kl_wrong, (kl_exact, kl_wrong)  # the random tiny model's KLs are small anyway
        received: list[torch.Tensor] = []
        hook = blocks[2].register_forward_pre_hook(
            lambda m, args, kw: received.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
        )
        try:
            logits_with(model, blocks, tokens, zero_edits(site, mask))
            logits_with(model, blocks, tokens, {})
        finally:
            hook.remove()
    ablated_in, clean_in = received  # block 2's input: block 1's residual + attention + its MLP's (ablated) output
    torch.testing.assert_close(ablated_in[~mask], clean_in[~mask])  # the special position kept its MLP output
    assert not torch.allclose(ablated_in[mask], clean_in[mask])


def test_a_transcoder_latent_is_pushed_into_its_mlp_output_for_its_output_score(tiny_llama: Path) -> None:
    """feature_output_scores pushes a transcoder latent i by SCORE_PUSH x a_max x W_dec[i] / c_out into block 1's
    MLP output at the prompt's last token (scored by hand from a whole forward with a hook on the MLP); a push
    into block 1's input on the residual's scale (what the old code did) gives other scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    blocks = find_blocks(model)
    torch.manual_seed(0)
    sae = Transcoder(SaeConfig("transcoder", 64, 16, 4, [1])).eval()
    c_out = 0.25  # the mlp_out site's `scale` factor: the model's output is y_n / c_out
    site = Site(1, sae, Normalizer("scale", scales={1: 2.0}), "t", Normalizer("scale", scales={1: c_out}))
    latents, a_max = [2, 5, 11], {2: 1.5, 5: 3.0}  # latent 11 has no largest activation: pushed by SCORE_PUSH
    w_u = unembedding(model)  # (V, D)
    ids = torch.tensor(tokenizer(SCORE_PROMPT).input_ids)  # (T,)

    def by_hand(latent: int, into_mlp: bool) -> float:
        d = sae.W_dec[latent].detach()  # (D,)
        step = SCORE_PUSH * a_max.get(latent, 1.0) * d  # (D,) in normalized units

        def add(h: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
            h = h.clone()
            h[0, -1] += step * scale
            return h

        if into_mlp:
            handle = blocks[1].mlp.register_forward_hook(lambda m, args, out: add(out, 1 / c_out))
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, -1]  # (V,)
            handle.remove()
        else:  # the residual stream standardized per token: the last token's std (Bessel) + eps
            with torch.no_grad(), replace_input(blocks[1], lambda h: add(h, h[0, -1].std() + 1e-6)):
                logits = model(input_ids=ids[None]).logits[0, -1]  # (V,)
        probs = logits.softmax(-1)  # (V,)
        chosen = probs[(d @ w_u.T).topk(SCORE_TOKENS).indices]  # (20,)
        best = min(int((probs > p).sum()) for p in chosen)
        return (1 - best / len(probs)) * float(chosen.max())

    got = feature_output_scores(model, blocks, tokenizer, site, w_u, latents, a_max)
    into_mlp = [by_hand(i, True) for i in latents]
    into_block = [by_hand(i, False) for i in latents]
    assert got.tolist() == pytest.approx(into_mlp, rel=1e-4)
    assert into_block != pytest.approx(into_mlp, rel=0.1), (into_mlp, into_block)  # the tiny model's scores are ~1/V
