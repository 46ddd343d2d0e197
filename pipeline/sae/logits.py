"""What a feature does to the model's output, read two ways.

* Logit effects (the "logit lens" of a decoder direction): the tokens that ``d_i @ W_U`` promotes and
  suppresses most, W_U with the final norm's scale folded in (:func:`pipeline.llm.unembed.unembedding`).
* Output score (Arad, Mueller & Belinkov 2025, "SAEs are good for steering - if you select the right
  features"): push the feature at the last position of a neutral prompt and look where its top-20
  promoted tokens land in the next-token distribution,

      output_score = (1 - best_rank / |V|) * max_prob

  with best_rank the best (0 = most likely) rank of any of those tokens and max_prob the largest
  probability among them. 1 would mean a promoted token became certain; features that only read
  their input score near 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.llm.hooks import replace_input

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


@torch.no_grad()
def output_scores(
    model: nn.Module,
    block: nn.Module,
    prompt: Tensor,
    directions: Tensor,
    promoted: Tensor,
    push: Tensor,
    normalizer: Normalizer,
    layer: int,
    batch: int = 32,
) -> Tensor:
    """Output score (F,) of F directions (F, D) pushed by ``push`` (F,) at the last token of ``prompt`` (T,).

    The push is in normalized units: the residual gets ``push * s * d`` with s the last token's own
    normalization scale (its std for `standardize`), the same convention as a `direction` edit.
    ``promoted`` (F, n) holds each direction's promoted token ids.
    """
    scores = []
    for start in range(0, directions.shape[0], batch):
        rows = slice(start, start + batch)
        step = push[rows, None] * directions[rows].float()  # (b, D)

        def add_at_last(h: Tensor, step: Tensor = step) -> Tensor:  # (b, T, D)
            out = h.clone()
            scale = normalizer.normalize(h[:, -1], layer)[1][1]  # (b, 1) or ()
            out[:, -1] = (h[:, -1].float() + step * scale).to(h.dtype)
            return out

        ids = prompt[None].expand(step.shape[0], -1).to(directions.device)  # (b, T)
        with replace_input(block, add_at_last):
            logits = model(input_ids=ids).logits[:, -1].float()  # (b, V)
        probs = logits.softmax(-1)  # (b, V)
        chosen = probs.gather(1, promoted[rows].to(probs.device))  # (b, n)
        # rank of a token = how many tokens are strictly more likely (0 = the most likely token)
        ranks = (probs[:, None, :] > chosen[:, :, None]).sum(-1)  # (b, n)
        scores.append((1 - ranks.min(1).values / probs.shape[-1]) * chosen.max(1).values)
    return torch.cat(scores).cpu()


@torch.no_grad()
def feature_output_scores(
    model: nn.Module,
    block: nn.Module,
    tokenizer: Any,
    w_dec: Tensor,
    w_u: Tensor,
    latents: list[int],
    a_max: dict[int, float],
    normalizer: Normalizer,
    layer: int,
    gain: float = 1.0,
) -> Tensor:
    """Output scores (F,) of ``latents``, each pushed by SCORE_PUSH x its largest activation at the last
    token of SCORE_PROMPT; ``block`` is the block whose input is ``layer``. ``gain`` multiplies the push
    (1 / the routing weight for a RouteSAE, whose code lives in w * x)."""
    ids = torch.tensor(tokenizer(SCORE_PROMPT).input_ids, device=w_dec.device)  # (T,)
    chosen = torch.tensor(latents, device=w_dec.device)
    directions = w_dec[chosen]  # (F, D)
    promoted = logit_effects(directions, w_u, SCORE_TOKENS).top_ids  # (F, 20)
    push = torch.tensor([gain * SCORE_PUSH * a_max.get(i, 1.0) for i in latents], device=w_dec.device)  # (F,)
    return output_scores(model, block, ids, directions, promoted, push, normalizer, layer)
