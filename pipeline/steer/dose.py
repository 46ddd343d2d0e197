"""Steering evaluation: for each feature and strength, what a `direction` edit achieves and what it costs.

Effect, on generations from neutral prompts (the edit applied at every position but special tokens):
  activation     the feature's mean activation on the generated tokens, read back by the *clean*
                 model and the SAE: does the steered text itself carry the feature?
  logprob_gain   on held-out cache text, the mean gain in log-probability of the feature's 10 most
                 promoted tokens (logit lens), steered minus unedited, nats
Cost:
  kl             on held-out cache text (no steering target there), the mean over real positions
                 of KL(p_unedited || p_steered), nats
  perplexity     the clean model's perplexity of the steered generations (fluency)
Strength 0 is the unedited model: its row is the baseline of every column. For a RouteSAE run the edit
lands at each token's routed layer and the activation is read from the routed code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.infra.console import progress_bar
from pipeline.live.edit import Mode
from pipeline.live.routing import clean_code
from pipeline.live.subject import Live
from pipeline.llm.divergence import ce_per_position, kl_sum, log_probs, reference
from pipeline.steer.edits import Edit, Positions
from pipeline.steer.generation import generate
from pipeline.steer.intervene import Target, routed_generate, routed_logits, steering

# Generations start here; none overlaps SCORE_PROMPT (pipeline/live/logits.py), where features are selected.
NEUTRAL_PROMPTS = ("The most important thing is", "Once upon a time,", "Here is what happened:")


class Setting(NamedTuple):
    """One point of the dose-response grid."""

    feature: int  # latent id
    strength: float  # direction strength, in units of the feature's largest activation


@dataclass
class Bench:
    """What one evaluation loads once and reuses for every setting."""

    live: Live  # the run inside its model
    prompts: list[Tensor]  # (1, T) token ids of each neutral prompt
    heldout: Tensor  # (S, T) held-out token ids
    mask: Tensor  # (S, T) positions whose token is real text (stored in the cache)
    promoted: dict[int, Tensor]  # latent -> (10,) its most promoted token ids
    a_max: dict[int, float]  # latent -> largest activation in the feature table
    mode: Mode
    unedited: dict[tuple[int, ...], Tensor] = field(default_factory=dict)  # prompt ids -> its unedited generation

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)  # "delta" from the config

    def target(self, setting: Setting) -> Target:
        edit = Edit(setting.feature, "direction", setting.strength)
        return Target(self.live.site, [edit], self.live.special, self.a_max)


@torch.no_grad()
def held_out_cost(bench: Bench, settings: list[Setting], batch_size: int) -> dict[Setting, tuple[float, float]]:
    """setting -> (mean KL per real position, mean log-prob gain of the feature's promoted tokens)."""
    sums = {s: [0.0, 0.0] for s in settings}
    positions = 0
    with progress_bar("steering cost (held-out text)", len(bench.heldout) * len(settings), "seq") as bar:
        for start in range(0, len(bench.heldout), batch_size):
            tokens = bench.heldout[start : start + batch_size]  # (B, T)
            mask = bench.mask[start : start + batch_size]  # (B, T)
            clean = log_probs(bench.live.model(input_ids=tokens).logits)  # (B, T, V)
            kept = reference(clean[mask])  # once per batch, shared by every setting's KL
            positions += int(mask.sum())
            for s in settings:
                if s.strength == 0 and bench.mode is Mode.DELTA:
                    continue  # adds exactly nothing: KL and gain are 0 without a forward
                steered = log_probs(steered_logits(bench, bench.target(s), tokens))  # (B, T, V)
                sums[s][0] += kl_sum(kept, steered[mask])
                ids = bench.promoted[s.feature]
                gain = steered[..., ids].logsumexp(-1) - clean[..., ids].logsumexp(-1)  # (B, T)
                sums[s][1] += float(gain[mask].sum())
            bar.advance(0, len(tokens) * len(settings))
    return {s: (kl / max(positions, 1), gain / max(positions, 1)) for s, (kl, gain) in sums.items()}


@torch.no_grad()
def generation_effect(bench: Bench, setting: Setting, max_new_tokens: int) -> tuple[float, float, list[str]]:
    """(mean feature activation on the generated tokens, clean perplexity of them, the generated texts)."""
    target = bench.target(setting)
    activation, nll, count, texts = 0.0, 0.0, 0, []
    for ids in bench.prompts:
        full = _generation(bench, target, ids, max_new_tokens, setting.strength)  # (1, T + n)
        new = slice(ids.shape[1], full.shape[1])
        texts.append(bench.live.tokenizer.decode(full[0, new], skip_special_tokens=True))
        latents = clean_code(bench.live.model, bench.live.blocks, bench.live.site, full)  # (T + n, k): re-read
        activation += float((latents.acts[new] * (latents.indices[new] == setting.feature)).sum())
        logits = bench.live.model(input_ids=full).logits  # (1, T + n, V)
        nll += float(ce_per_position(logits, full)[0, ids.shape[1] - 1 :].sum())  # predicting the new tokens
        count += full.shape[1] - ids.shape[1]
    return activation / max(count, 1), float(torch.tensor(nll / max(count, 1)).exp()), texts


def _generation(bench: Bench, target: Target, ids: Tensor, max_new_tokens: int, strength: float) -> Tensor:
    """The steered generation; strength 0 in delta mode is the unedited model, generated once per prompt."""
    if strength != 0 or bench.mode is not Mode.DELTA:
        return steered_generation(bench, target, ids, max_new_tokens)
    key = tuple(ids[0].tolist())
    if key not in bench.unedited:
        bench.unedited[key] = steered_generation(bench, target, ids, max_new_tokens)
    return bench.unedited[key]


def steered_logits(bench: Bench, target: Target, tokens: Tensor) -> Tensor:
    """Logits (B, T, V) with the target's edits at every position (at each token's routed layer when routed)."""
    model, blocks, everywhere = bench.live.model, bench.live.blocks, Positions("all")
    if target.site.routed:
        return routed_logits(model, blocks, target, bench.mode, everywhere, tokens, tokens.shape[1])
    with steering(model, blocks, [target], bench.mode, everywhere, tokens.shape[1]):
        return model(input_ids=tokens).logits


def steered_generation(bench: Bench, target: Target, ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy generation (1, T + n) with the edits at every position."""
    model, blocks, everywhere = bench.live.model, bench.live.blocks, Positions("all")
    if target.site.routed:
        return routed_generate(model, blocks, target, bench.mode, everywhere, ids, (max_new_tokens, False, 1.0, 0))
    with steering(model, blocks, [target], bench.mode, everywhere, ids.shape[1]):
        return generate(model, ids, max_new_tokens, sample=False, temperature=1.0, seed=0)
