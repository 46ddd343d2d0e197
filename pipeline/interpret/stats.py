"""Per-feature scores from scorer verdicts, and their means over features with bootstrap intervals.

Per feature (one scorer, one explanation): balanced accuracy = (recall on activating + specificity on
non-activating) / 2, so 0.5 is chance whatever the mix; precision, recall and F1 of the "active" verdict
(precision is undefined, None, when the scorer never said "active": no verdict to be right about; F1 is
then 2 TP / (2 TP + FP + FN) = 0 where the feature has activating examples);
AUC of P(1) where log-probabilities came back (the Mann-Whitney probability that an activating excerpt
gets a higher P(1) than a non-activating one, ties counting half). Verdicts that never came (failed or
malformed answers) are left out. Summary: the mean over scored features and a 95 % percentile bootstrap
interval that resamples features.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("balanced_accuracy", "precision", "recall", "f1", "auc")


def feature_scores(labels: np.ndarray, verdicts: np.ndarray, probs: np.ndarray | None) -> dict[str, float | None]:
    """The metrics of one feature; ``labels`` and ``verdicts`` are (n,) 0/1, ``probs`` (n,) P(1) or None."""
    positives, negatives = labels == 1, labels == 0
    tp = int(np.sum(verdicts[positives] == 1))
    fp = int(np.sum(verdicts[negatives] == 1))
    recall = tp / positives.sum() if positives.any() else None
    specificity = 1 - fp / negatives.sum() if negatives.any() else None
    fn = int(positives.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else None
    f1 = None if recall is None else 2 * tp / (2 * tp + fp + fn)  # = 2PR / (P + R) where both are defined
    return {
        "balanced_accuracy": None if recall is None or specificity is None else (recall + specificity) / 2,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": None if probs is None else auc(probs[positives], probs[negatives]),
        "n": int(len(labels)),
    }


def auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a random positive scores above a random negative), ties half; None without both classes."""
    if not len(positive) or not len(negative):
        return None
    above = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(above + 0.5 * ties)


def score_features(records: list[dict[str, Any]]) -> dict[tuple[str, bool], dict[int, dict[str, Any]]]:
    """(scorer, control) -> latent -> metrics, from scorer verdict records (rows of scores.parquet)."""
    grouped: dict[tuple[str, bool, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["verdict"] is not None:
            grouped.setdefault((r["scorer"], r["control"], r["latent"]), []).append(r)
    out: dict[tuple[str, bool], dict[int, dict[str, Any]]] = {}
    for (scorer, control, latent), rows in grouped.items():
        labels = np.array([r["label"] for r in rows])
        verdicts = np.array([r["verdict"] for r in rows])
        probs = np.array([r["prob"] for r in rows], dtype=float) if all(r["prob"] is not None for r in rows) else None
        out.setdefault((scorer, control), {})[latent] = feature_scores(labels, verdicts, probs)
    return out


def bootstrap_mean(values: list[float], resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % percentile-bootstrap interval over the values."""
    data = np.asarray(values, dtype=float)
    if len(data) == 1:
        return float(data[0]), float(data[0]), float(data[0])
    picks = np.random.default_rng([seed, 41]).integers(0, len(data), (resamples, len(data)))
    means = data[picks].mean(1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize_scores(
    per_feature: dict[tuple[str, bool], dict[int, dict[str, Any]]], resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per scorer (``<scorer>_shuffled`` for the control): features scored, and for every metric its mean
    over the features it is defined on with ``<metric>_low`` / ``<metric>_high`` (95 % bootstrap interval);
    ``<metric>_undefined``: features it is undefined on (precision: the scorer never said "active"), and a
    metric undefined on every feature is None (AUC without log-probabilities is left out)."""
    summary: dict[str, dict[str, Any]] = {}
    for (scorer, control), features in sorted(per_feature.items()):
        entry: dict[str, Any] = {"features": len(features)}
        for metric in METRICS:
            values = [m[metric] for m in features.values() if m[metric] is not None]
            if values:
                mean, low, high = bootstrap_mean(values, resamples, seed)
                entry.update({metric: round(mean, 4), f"{metric}_low": round(low, 4), f"{metric}_high": round(high, 4)})
            if metric == "auc" and not values:
                continue  # no log-probabilities came back: nothing was measured
            if not values:
                entry[metric] = None
            if len(values) < len(features):
                entry[f"{metric}_undefined"] = len(features) - len(values)
        summary[f"{scorer}_shuffled" if control else scorer] = entry
    return summary
