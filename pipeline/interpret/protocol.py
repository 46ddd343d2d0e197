"""The RouteSAE paper's context filter, applied before features go to the explainer.

Only activations above a threshold count; contexts are grouped by the activated token (lowercased),
keeping the strongest few per token; a latent passes when it fires on at most ``max_token_types``
distinct tokens and has at least ``min_contexts`` kept contexts. Every latent gets a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.interpret.features import Activations


@dataclass
class ProtocolSettings:
    """Thresholds of the filter (the RouteSAE code's defaults)."""

    threshold: float = 10.0  # activations at or below this are ignored
    per_token: int = 2  # contexts kept per activated token
    max_token_types: int = 32  # more distinct activated tokens than this: too diffuse
    min_contexts: int = 5  # fewer kept contexts than this: too rare


def apply_protocol(
    acts: Activations, row_tokens: np.ndarray, token_text: dict[int, str], s: ProtocolSettings
) -> tuple[pa.Table, dict[int, list[int]]]:
    """(per-latent verdicts, latent -> indices into ``acts`` of the contexts kept for it)."""
    verdicts: dict[str, list[object]] = {"latent": [], "passes": [], "reason": [], "token_types": [], "contexts": []}
    kept_by_latent: dict[int, list[int]] = {}
    for latent in range(len(acts.counts)):
        group = acts.group(latent)
        strong = np.flatnonzero(acts.act[group] > s.threshold) + group.start
        kept: list[int] = []
        per_type: dict[str, int] = {}
        for i in strong:  # strongest first, so the first per_token of each token type are its best
            key = token_text[int(row_tokens[acts.row[i]])].strip().lower()
            if per_type.get(key, 0) < s.per_token:
                per_type[key] = per_type.get(key, 0) + 1
                kept.append(int(i))
        passes, reason = _verdict(len(strong), len(per_type), len(kept), s)
        for column, value in zip(verdicts, (latent, passes, reason, len(per_type), len(kept))):
            verdicts[column].append(value)
        if passes:
            kept_by_latent[latent] = kept
    return pa.table(verdicts), kept_by_latent


def _verdict(strong: int, types: int, contexts: int, s: ProtocolSettings) -> tuple[bool, str]:
    if strong == 0:
        return False, f"no activation above {s.threshold:g}"
    if types > s.max_token_types:
        return False, f"{types} activated token types > {s.max_token_types}"
    if contexts < s.min_contexts:
        return False, f"{contexts} contexts < {s.min_contexts}"
    return True, "passes"
