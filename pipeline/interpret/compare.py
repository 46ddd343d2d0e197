"""Interpretation of many runs side by side (``sae-pipe interpret --all`` and the DVC stage).

``<cache_root>/interpret/comparison.csv`` and ``comparison.html``: per run, the active latents, the
explainer's mean score, and per scorer the mean balanced accuracy over features with its 95 % interval.
"""

from __future__ import annotations

import csv
import io
from html import escape
from typing import Any

from pipeline.infra.files import Folder
from pipeline.interpret.charts import interval
from pipeline.interpret.score import SCORERS

HEAD = ["run", "active_latents", "explained", "mean_score", "interpretable", "cost_usd", "scorer_cost_usd"]


def score_columns(summaries: list[dict[str, Any]]) -> list[str]:
    """The scorers (and controls) that any run has scores of, in a fixed order."""
    names = [name for s in SCORERS for name in (s, f"{s}_shuffled")]
    present = {name for summary in summaries for name in _scores(summary)}
    return [name for name in names if name in present]


def write_comparison(summaries: list[dict[str, Any]], out: Folder) -> str:
    """comparison.csv (one row per run) and comparison.html; returns the page's path."""
    scorers = score_columns(summaries)
    rows = []
    for summary in summaries:
        row = {key: summary.get(key) for key in HEAD}
        for name in scorers:
            entry = _scores(summary).get(name, {})
            for suffix in ("", "_low", "_high"):
                row[f"{name}_balanced_accuracy{suffix}"] = entry.get(f"balanced_accuracy{suffix}")
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]) if rows else HEAD)
    writer.writeheader()
    writer.writerows(rows)
    out.write_bytes(buffer.getvalue().encode(), "comparison.csv")
    out.write_bytes(_page(summaries, scorers).encode(), "comparison.html")
    return out.path("comparison.html")


def _page(summaries: list[dict[str, Any]], scorers: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in HEAD) + "".join(f"<th>{escape(s)}</th>" for s in scorers)
    body = []
    for summary in summaries:
        cells = "".join(f"<td>{escape(_fmt(summary.get(key)))}</td>" for key in HEAD[1:])
        for name in scorers:
            entry = _scores(summary).get(name, {})
            cells += (
                f"<td>{entry['balanced_accuracy']:.3f} [{entry['balanced_accuracy_low']:.3f}, "
                f"{entry['balanced_accuracy_high']:.3f}]<br>{interval(*_triple(entry))}</td>"
                if entry.get("balanced_accuracy") is not None
                else "<td>-</td>"
            )
        link = f"{escape(summary['run'])}/report.html"
        body.append(f"<tr><td><a href='{link}'>{escape(summary['run'])}</a></td>{cells}</tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Interpretation of runs</title><style>"
        "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:80em} table{border-collapse:collapse}"
        "th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left}</style></head><body>"
        "<h1>Interpretation of runs</h1><p>Balanced accuracy of the explanations on held-out examples (mean over "
        "scored features, 95 % bootstrap interval; 0.5 is chance).</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )


def _scores(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's scores per scorer; empty when scoring was skipped or not asked for."""
    scores = summary.get("scores")
    return scores if isinstance(scores, dict) else {}


def _triple(entry: dict[str, Any]) -> tuple[float, float, float]:
    return entry["balanced_accuracy"], entry["balanced_accuracy_low"], entry["balanced_accuracy_high"]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
