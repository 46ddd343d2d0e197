"""Per-feature output columns for features.parquet: what each decoder direction does to the logits.

  promotes / promotes_logit      the 10 tokens d_i @ W_U raises most (final norm's scale folded in)
  suppresses / suppresses_logit  the 10 it lowers most
  output_score                   (1 - best_rank / |V|) * max_prob of the top-20 promoted tokens when
                                 the feature is pushed at the end of a neutral prompt (live latents only)
Definitions: :mod:`pipeline.live.logits`.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from pipeline.infra.errors import UserError
from pipeline.live.logits import feature_output_scores, logit_effects
from pipeline.live.subject import Subject, load_cache_tokenizer, load_llm
from pipeline.llm.unembed import unembedding

TOP = 10  # promoted and suppressed tokens kept per feature

TYPES = {
    "promotes": pa.list_(pa.string()),
    "promotes_logit": pa.list_(pa.float32()),
    "suppresses": pa.list_(pa.string()),
    "suppresses_logit": pa.list_(pa.float32()),
    "output_score": pa.float32(),
}


@torch.no_grad()
def effect_columns(s: Subject, features: pa.Table) -> dict[str, dict[int, object]]:
    """{column: {latent: value}} for :data:`TYPES`, from the model the run's cache came from."""
    device = next(s.sae.parameters()).device
    model, blocks = load_llm(s.cache, device)
    tokenizer = load_cache_tokenizer(s.cache)
    w_u = unembedding(model).to(device)  # (V, D)
    effects = logit_effects(s.sae.directions(), w_u, TOP)
    words = {int(t): tokenizer.decode([int(t)]) for t in torch.cat([effects.top_ids, effects.bottom_ids]).unique()}
    data = features.select(["latent", "max_act"]).to_pydict()
    a_max = {int(i): float(m) for i, m in zip(data["latent"], data["max_act"]) if m > 0}
    live = sorted(a_max)
    if not live:  # nothing to score, explain or show
        raise UserError("no latent fires on the held-out tokens scanned; lower --theta or raise --max-tokens.")
    scores = feature_output_scores(model, blocks, tokenizer, s.site(), w_u, live, a_max)
    latents = range(len(effects.top_ids))
    return {
        "promotes": {i: [words[int(t)] for t in effects.top_ids[i]] for i in latents},
        "promotes_logit": {i: effects.top_values[i].tolist() for i in latents},
        "suppresses": {i: [words[int(t)] for t in effects.bottom_ids[i]] for i in latents},
        "suppresses_logit": {i: effects.bottom_values[i].tolist() for i in latents},
        "output_score": {latent: float(score) for latent, score in zip(live, scores)},
    }
