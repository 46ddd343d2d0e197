"""What a feature does to the model's output, read two ways.

* Logit effects (the "logit lens" of a decoder direction): the tokens that ``d_i @ W_U`` promotes and
  suppresses most, W_U with the final norm's scale folded in (:func:`pipeline.llm.unembed.unembedding`).
  d_i is in the normalized units of what the SAE writes (for every architecture, no site factor applied): a
  transcoder's direction in the model is d_i / c_out, so its tokens are the same and its values c_out times
  the model's.
* Output score (Arad, Mueller & Belinkov 2025, "SAEs are good for steering - if you select the right
  features"): push the feature at the last position of a neutral prompt, where it writes (a transcoder: into
  its MLP's output), and look where its top-20 promoted tokens land in the next-token distribution,

      output_score = (1 - best_rank / |V|) * max_prob

  with best_rank the best (0 = most likely) rank of any of those tokens and max_prob the largest
  probability among them. 1 would mean a promoted token became certain; features that only read
  their input score near 0.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pipeline.live.edit import Site, moved
from pipeline.live.routing import route_choice
from pipeline.live.splice import Edits
from pipeline.llm.hooks import MlpOut, replacing

SCORE_TOKENS = 20  # promoted tokens an output score looks at (the published recipe's number)
SCORE_PROMPT = "I think that"  # the neutral prompt a feature is pushed at
SCORE_PUSH = 4.0  # push strength, in units of the feature's largest activation (1 without a feature table)


class LogitEffects(NamedTuple):
    """Per latent, the tokens its decoder direction pushes up and down most."""

    top_ids: Tensor  # (N, k) most promoted token ids, strongest first
    top_values: Tensor  # (N, k) their d_i @ W_U
    bottom_ids: Tensor  # (N, k) most suppressed token ids, strongest first
    bottom_values: Tensor  # (N, k) their d_i @ W_U (negative when suppressed)


@torch.no_grad()
def logit_effects(w_dec: Tensor, w_u: Tensor, k: int = 10, chunk: int = 256) -> LogitEffects:
    """Top and bottom ``k`` of ``w_dec @ w_u.T`` per row, computed ``chunk`` rows at a time (bounded memory)."""
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    w_u = w_u.float()
    for start in range(0, w_dec.shape[0], chunk):
        logits = w_dec[start : start + chunk].float() @ w_u.T  # (c, V)
        top = logits.topk(k, dim=-1)
        bottom = logits.topk(k, dim=-1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitEffects(*(torch.cat(column).cpu() for column in zip(*parts)))


def pushed_at_last(site: Site, step: Tensor) -> Edits:
    """The edit that adds ``step`` (b, D), in the normalized units the SAE writes, to the last token where the SAE
    writes: block ``site.layer``'s input for an SAE of the residual stream, block ``site.layer``'s MLP output for a
    transcoder, each scaled by its own site's normalization (:meth:`Site.written_norm`)."""
    norm = site.written_norm

    def add_at_last(h: Tensor) -> Tensor:  # (b, 1, D): the last token only
        out = h.clone()
        out[:, -1] = moved(h[:, -1], step, norm.normalize(h[:, -1], site.layer)[1][1])  # scale (b, 1) or ()
        return out

    if site.transcodes:
        return {MlpOut(site.layer): lambda x_in, out: add_at_last(out)}
    return {site.layer: add_at_last}


@torch.no_grad()
def output_scores(
    model: nn.Module,
    blocks: nn.ModuleList,
    prompt: Tensor,
    directions: Tensor,
    promoted: Tensor,
    push: Tensor,
    site: Site,
    batch: int = 128,
) -> Tensor:
    """Output score (F,) of F directions (F, D) pushed by ``push`` (F,) at the last token of ``prompt`` (T,).

    The push is in normalized units, where ``site`` writes (:func:`pushed_at_last`): the residual gets
    ``push * s * d`` with s the last token's own normalization scale (its std for `standardize`), the same
    convention as a `direction` edit; a transcoder's MLP output gets ``push * d / c_out``.
    ``promoted`` (F, n) holds each direction's promoted token ids. The prompt's prefix is run once and its
    KV cache shared: each batch only runs the pushed last token.
    """
    # transformers 5 names the KV cache `cache`, 4.x `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefix = None
    if len(prompt) > 1:
        out = model(input_ids=prompt[None, :-1], use_cache=True)
        prefix = out.get("cache", out.get("past_key_values"))
    scores = []
    for start in range(0, directions.shape[0], batch):
        rows = slice(start, start + batch)
        step = push[rows, None] * directions[rows].float()  # (b, D)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(step.shape[0])
        last = prompt[-1:].expand(step.shape[0], 1).to(directions.device)  # (b, 1)
        with replacing(blocks, pushed_at_last(site, step)):
            logits = model(input_ids=last, use_cache=cache is not None, **{cache_arg: cache}).logits[:, -1].float()
        probs = logits.softmax(-1)  # (b, V)
        chosen = probs.gather(1, promoted[rows].to(probs.device))  # (b, n)
        # rank of a token = how many tokens are strictly more likely (0 = the most likely token)
        ranks = (probs[:, None, :] > chosen[:, :, None]).sum(-1)  # (b, n)
        scores.append((1 - ranks.min(1).values / probs.shape[-1]) * chosen.max(1).values)
    return torch.cat(scores).cpu()


@torch.no_grad()
def feature_output_scores(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokenizer: Any,
    site: Site,
    w_u: Tensor,
    latents: list[int],
    a_max: dict[int, float],
) -> Tensor:
    """Output scores (F,) of ``latents``, each pushed by SCORE_PUSH x its largest activation (1 when
    unknown) at the last token of SCORE_PROMPT where ``site`` writes (a transcoder: its MLP's output); a
    routed SAE pushes at the layer that token is routed to, divided by its routing weight (its code lives
    in w * x)."""
    ids = torch.tensor(tokenizer(SCORE_PROMPT).input_ids, device=w_u.device)  # (T,)
    gain = 1.0
    if site.routed:
        choice, weight = route_choice(model, blocks, site, ids[None])  # (1, T), (1, T)
        site, gain = site._replace(layer=site.layers[int(choice[0, -1])]), 1 / float(weight[0, -1])
    directions = site.sae.directions(latents)  # (F, D)
    promoted = logit_effects(directions, w_u, SCORE_TOKENS).top_ids.to(w_u.device)  # (F, 20)
    push = torch.tensor([gain * SCORE_PUSH * a_max.get(i, 1.0) for i in latents], device=w_u.device)  # (F,)
    return output_scores(model, blocks, ids, directions, promoted, push, site)
