"""Held-out sequences split between the explainer and the scorers, and the scorers' test examples.

Each held-out packed sequence goes to one side, drawn with the seed: ``train`` sequences give the
examples the explainer sees (and the report shows), ``test`` sequences the examples the scorers judge.
Sequences that share a document (one cut across them by the packing) go to the same side, so no test
example shares a sequence or a document with any explainer example of any latent: a scorer never judges
text the explainer was shown, nor the rest of a document it was shown part of.

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


def linked_groups(sequence: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """(R,) the group of each row (``sequence``, ``doc``: (R,) its packed sequence and document): packed
    sequences linked by a document that runs across them (GPT-style packing cuts documents at sequence
    edges) are one group, numbered 0.. in the order of their first sequence."""
    _, seq_of = np.unique(sequence, return_inverse=True)
    parent = list(range(int(seq_of.max()) + 1 if len(seq_of) else 0))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    first: dict[int, int] = {}  # document -> the first sequence seen holding it
    for d, s in np.unique(np.stack([doc, seq_of], 1), axis=0).tolist():  # (P, 2) distinct (doc, sequence)
        if d in first:
            a, b = root(first[d]), root(s)
            parent[max(a, b)] = min(a, b)
        else:
            first[d] = s
    roots = np.array([root(i) for i in range(len(parent))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1][seq_of] if len(seq_of) else seq_of


def scoring_rows(sequence: np.ndarray, doc: np.ndarray, share: float, seed: int) -> np.ndarray:
    """(R,) bool: rows reserved for scoring. Whole groups of :func:`linked_groups` go to one side, so no
    document (and no packed sequence) reaches both the explainer and the scorers. Groups are taken in a
    seeded order while they fit in round(share x sequences); with 0 < share < 1 and two or more groups,
    both sides get one."""
    group = linked_groups(sequence, doc)
    n = int(group.max()) + 1 if len(group) else 0
    sizes = np.bincount(group[np.unique(sequence, return_index=True)[1]], minlength=n)  # sequences per group
    wanted = int(round(share * int(sizes.sum())))
    picked = np.zeros(n, dtype=bool)
    order = np.random.default_rng([seed, 17]).permutation(n)
    taken = 0
    for g in order:
        if taken + sizes[g] <= wanted:
            picked[g], taken = True, taken + int(sizes[g])
    if 0 < share < 1 and n >= 2 and not picked.any():
        picked[order[0]] = True
    elif 0 < share < 1 and n >= 2 and picked.all():
        picked[order[-1]] = False
    return picked[group]


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
