"""Held-out sequences split between the explainer and the scorers, and the scorers' test examples.

Each held-out packed sequence goes to one side, drawn with the seed: ``train`` sequences give the
examples the explainer sees (and the report shows), ``test`` sequences the examples the scorers judge.
No test example shares a sequence with any explainer example of any latent, so a scorer never judges
text the explainer was shown.

A latent's test examples: activating ones drawn across its test activations' quantiles (rank bins,
strongest first), then as many non-activating ones, windows where it is silent on every token: random,
or for a share of them "hard" ones, whose own token is one the latent fires on most in train. Each test
example carries its window's per-token text and the latent's activation on every window token, from
which fuzzing highlights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.cache.contexts import HeldoutIndex
from pipeline.interpret.features import Activations, Example, quantile_sample

HARD_TOKENS = 5  # a latent's most frequent train tokens that make a silent window "hard"
CANDIDATES_PER_PICK = 50  # random windows tried per non-activating example before giving up


def scoring_rows(sequence: np.ndarray, share: float, seed: int) -> np.ndarray:
    """(R,) bool: rows whose packed sequence (``sequence``: (R,) its id) is reserved for scoring.
    round(share x sequences) of them, and with 0 < share < 1 and two or more sequences, both sides get one."""
    unique, inverse = np.unique(sequence, return_inverse=True)
    n = len(unique)
    wanted = int(round(share * n))
    if 0 < share < 1 and n >= 2:
        wanted = min(max(wanted, 1), n - 1)
    picked = np.zeros(n, dtype=bool)
    picked[np.random.default_rng([seed, 17]).permutation(n)[:wanted]] = True
    return picked[inverse]


@dataclass
class ScoringPlan:
    """How many test examples of which kinds (params: score_quantiles, score_per_quantile, score_hard)."""

    quantiles: int = 10
    per_quantile: int = 2
    hard_share: float = 0.0
    before: int = 24
    after: int = 4


def select_tests(
    acts: Activations, test: np.ndarray, latents: list[int], plan: ScoringPlan, index: HeldoutIndex, seed: int
) -> list[Example]:
    """(latent, kind, rank, activation, row) test examples of ``latents``, all on rows where ``test`` holds."""
    rng = np.random.default_rng([seed, 29])
    held, trained = acts.where(test), acts.where(~test)
    pool = np.flatnonzero(test)
    chosen: list[Example] = []
    for latent in latents:
        group = held.group(latent)
        active = quantile_sample(latent, held.row[group], held.act[group], plan.quantiles, plan.per_quantile, rng)
        silent = _Silence(acts.of(latent)[0], index, plan)
        counts = Counter(index.token[trained.row[trained.group(latent)]].tolist())
        favourite = [t for t, _ in counts.most_common(HARD_TOKENS)]
        hard_pool = pool[np.isin(index.token[pool], favourite)]
        hard = silent.pick(hard_pool, int(round(plan.hard_share * len(active))), rng, set())
        quiet = silent.pick(pool, len(active) - len(hard), rng, set(hard))
        chosen += active
        chosen += [(latent, "hard", i, 0.0, r) for i, r in enumerate(hard)]
        chosen += [(latent, "random", i, 0.0, r) for i, r in enumerate(quiet)]
    return chosen


class _Silence:
    """Finds windows in which one latent (active on the sorted ``active`` rows) is silent on every token."""

    def __init__(self, active: np.ndarray, index: HeldoutIndex, plan: ScoringPlan) -> None:
        self.active, self.index, self.plan = active, index, plan

    def quiet(self, row: int) -> bool:
        rows = self.index.window_rows(row, self.plan.before, self.plan.after)
        at = np.searchsorted(self.active, rows)
        return not np.any(self.active[np.minimum(at, len(self.active) - 1)] == rows) if len(self.active) else True

    def pick(self, pool: np.ndarray, wanted: int, rng: np.random.Generator, taken: set[int]) -> list[int]:
        picked: list[int] = []
        if wanted <= 0 or not len(pool):
            return picked
        for row in rng.choice(pool, min(len(pool), wanted * CANDIDATES_PER_PICK), replace=False):
            if int(row) not in taken and self.quiet(int(row)):
                picked.append(int(row))
                if len(picked) == wanted:
                    break
        return picked


def window_columns(
    chosen: list[Example],
    acts: Activations,
    index: HeldoutIndex,
    tokenizer,
    before: int,
    after: int,  # noqa: ANN001
) -> dict[str, pa.Array]:
    """Per example: ``window_tokens`` (each token's text), ``window_acts`` (the latent's activation on
    each, 0 where silent) and ``center`` (the example's own token in the window)."""
    lookup: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    windows = [index.window(c[4], before, after) for c in chosen]
    ids = sorted({t for tokens, _ in windows for t in tokens})
    text = dict(zip(ids, tokenizer.batch_decode([[t] for t in ids]))) if ids else {}
    values = []
    for latent, *_, row in chosen:
        rows, acts_of = lookup.setdefault(latent, acts.of(latent))
        window = index.window_rows(row, before, after)
        at = np.minimum(np.searchsorted(rows, window), max(len(rows) - 1, 0))
        hit = (rows[at] == window) if len(rows) else np.zeros(len(window), dtype=bool)
        values.append(np.where(hit, acts_of[at] if len(rows) else 0.0, 0.0).astype(np.float32).tolist())
    return {
        "window_tokens": pa.array([[text[t] for t in tokens] for tokens, _ in windows], pa.list_(pa.string())),
        "window_acts": pa.array(values, pa.list_(pa.float32())),
        "center": pa.array([at for _, at in windows], pa.int32()),
    }
