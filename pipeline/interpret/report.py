"""One self-contained HTML page per run: the feature list, then each feature's histogram and examples.

No scripts, no external files: it opens from disk in any browser. Every piece of corpus or model
text goes through ``html.escape``.
"""

from __future__ import annotations

from html import escape
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.interpret.charts import histogram, interval, scatter
from pipeline.interpret.score import SCORERS

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; width: 100%; } th, td { border-bottom: 1px solid #ddd; padding: 3px 6px;
text-align: left; vertical-align: top; } th { background: #f4f4f4; }
.feature { border-top: 2px solid #888; margin-top: 1.5em; } .cat { padding: 1px 6px; border-radius: 3px;
background: #e8eefc; } .examples li { font-family: ui-monospace, monospace; font-size: 12.5px; margin: 2px 0;
white-space: pre-wrap; } mark { background: #ffd54f; color: #000; font-weight: bold; padding: 0 1px; }
.act { color: #666; display: inline-block; min-width: 4.5em; } .muted { color: #777; }
"""


def render_report(
    title: str,
    summary: dict[str, Any],
    features: pa.Table,
    examples: pa.Table,
    explanations: dict[int, dict[str, Any]],
    shown: list[int],
) -> str:
    """The HTML text of the report; ``shown`` lists the latents that get a section, in order."""
    rows = {
        int(r["latent"]): r
        for r in features.filter(pc.is_in(features["latent"], pa.array(shown, pa.int32()))).to_pylist()
    }
    by_latent: dict[int, list[dict[str, Any]]] = {}
    mine = pc.and_(pc.is_in(examples["latent"], pa.array(shown, pa.int32())), pc.equal(examples["split"], "train"))
    for example in examples.filter(mine).to_pylist():
        by_latent.setdefault(example["latent"], []).append(example)
    scorers = [s for s in SCORERS if f"{s}_balanced_accuracy" in features.column_names]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
        _scores(summary.get("scores"), features, scorers),
        _summary(summary),
        _index(shown, rows, explanations, scorers),
    ]
    parts += [
        _section(latent, rows[latent], by_latent.get(latent, []), explanations.get(latent), scorers) for latent in shown
    ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(summary: dict[str, Any]) -> str:
    items = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, (dict, list))
    )
    return f"<h2>Summary</h2><table>{items}</table>"


def _scores(scores: Any, features: pa.Table, scorers: list[str]) -> str:
    """Per scorer: the mean over features with its 95 % interval, a histogram of the per-feature balanced
    accuracies, and balanced accuracy against frequency."""
    if not isinstance(scores, dict):
        return f"<h2>Scores</h2><p class='muted'>{escape(str(scores))}</p>" if scores else ""
    head = "<tr><th>scorer</th><th>features</th><th>balanced accuracy [95 % interval]</th><th></th>"
    head += "<th>precision</th><th>recall</th><th>F1</th><th>AUC</th></tr>"
    body = "".join(
        f"<tr><th>{escape(name)}</th><td>{entry['features']}</td><td>{_ci(entry, 'balanced_accuracy')}</td>"
        f"<td>{interval(entry['balanced_accuracy'], entry['balanced_accuracy_low'], entry['balanced_accuracy_high'])}"
        f"</td>{''.join(f'<td>{_ci(entry, m)}</td>' for m in ('precision', 'recall', 'f1', 'auc'))}</tr>"
        for name, entry in scores.items()
        if entry.get("balanced_accuracy") is not None
    )
    frequency = features["frequency"].to_pylist()
    charts, points = [], {}
    for scorer in scorers:
        values = features[f"{scorer}_balanced_accuracy"].to_pylist()
        counts = [0] * 10
        for v in values:
            if v is not None:
                counts[min(int(v * 10), 9)] += 1
        chart = histogram(counts, "0", "1")
        charts.append(f"<div><h4>{escape(scorer)}: balanced accuracy per feature</h4>{chart}</div>")
        points[scorer] = [(f, v) for f, v in zip(frequency, values) if v is not None]
    plot = scatter(points, "frequency", "balanced accuracy") if points else ""
    return (
        f"<h2>Scores</h2><p class='muted'>Explanations judged on held-out test sequences the explainer never saw; "
        f"0.5 is chance. Intervals: 95 % bootstrap over features.</p><table>{head}{body}</table>"
        f"<div style='display:flex;gap:2em;flex-wrap:wrap'>{''.join(charts)}<div><h4>balanced accuracy vs "
        f"frequency</h4>{plot}</div></div>"
    )


def _ci(entry: dict[str, Any], metric: str) -> str:
    """The mean and its interval; "n/a" where the metric is undefined on every feature (precision when the
    scorer never said "active"), "-" where it was not measured (AUC without log-probabilities)."""
    if metric not in entry:
        return "-"
    if entry[metric] is None:
        return "n/a"
    return f"{entry[metric]:.3f} [{entry[f'{metric}_low']:.3f}, {entry[f'{metric}_high']:.3f}]"


def _index(
    shown: list[int], rows: dict[int, dict[str, Any]], explanations: dict[int, dict[str, Any]], scorers: list[str]
) -> str:
    head = "<tr><th>latent</th><th>category</th><th>score</th>"
    head += "".join(f"<th>{escape(s)}</th>" for s in scorers)
    head += "<th>explanation</th><th>frequency</th><th>max act</th></tr>"
    body = []
    for latent in shown:
        e = explanations.get(latent, {})
        body.append(
            f"<tr><td><a href='#f{latent}'>{latent}</a></td><td>{escape(str(e.get('category') or '-'))}</td>"
            f"<td>{escape(str(e.get('score') or '-'))}</td>{_score_cells(rows[latent], scorers)}"
            f"<td>{escape(str(e.get('explanation') or ''))}</td>"
            f"<td>{rows[latent]['frequency']:.5f}</td><td>{rows[latent]['max_act']:.3f}</td></tr>"
        )
    return f"<h2>Features</h2><table class='index'>{head}{''.join(body)}</table>"


def _score_cells(row: dict[str, Any], scorers: list[str]) -> str:
    values = [row.get(f"{s}_balanced_accuracy") for s in scorers]
    return "".join(f"<td>{'-' if v is None else f'{v:.2f}'}</td>" for v in values)


def _effects(row: dict[str, Any]) -> str:
    """The decoder's logit effects and output score, when features.parquet has them."""
    if not row.get("promotes"):
        return ""
    score = row.get("output_score")
    return (
        f"<p>promotes <code>{escape(' | '.join(row['promotes']))}</code><br>suppresses "
        f"<code>{escape(' | '.join(row['suppresses']))}</code>"
        + (f"<br>output score {score:.3f}" if score is not None else "")
        + "</p>"
    )


def _section(
    latent: int,
    row: dict[str, Any],
    examples: list[dict[str, Any]],
    explanation: dict[str, Any] | None,
    scorers: list[str],
) -> str:
    e = explanation or {}
    label = (
        f"<span class='cat'>{escape(str(e['category']))}</span> score {escape(str(e['score']))}"
        if e.get("category")
        else "<span class='muted'>not explained</span>"
    )
    label += "".join(
        f" · {escape(s)} {row[f'{s}_balanced_accuracy']:.2f}"
        for s in scorers
        if row.get(f"{s}_balanced_accuracy") is not None
    )
    top = f"{row['max_act']:.2f}"
    strong = [x for x in examples if x["kind"] != "random"][:20]
    items = "".join(
        f"<li><span class='act'>{x['activation']:.2f}</span>{escape(x['prefix'])}<mark>{escape(x['token'])}"
        f"</mark>{escape(x['suffix'])}</li>"
        for x in strong
    )
    quiet = "".join(
        f"<li><span class='act'>0</span>{escape(x['prefix'] + x['token'] + x['suffix'])}</li>"
        for x in examples
        if x["kind"] == "random"
    )
    return (
        f"<section class='feature' id='f{latent}'><h3>Latent {latent} {label}</h3>"
        f"<p>{escape(str(e.get('explanation') or ''))}</p>"
        f"<p class='muted'>active on {row['count']:,} tokens (frequency {row['frequency']:.5f}), mean "
        f"{row['mean_act']:.3f}, max {row['max_act']:.3f}</p>{_effects(row)}{histogram(row['hist'], '0', top)}"
        f"<h4>Top and sampled activations</h4><ol class='examples'>{items}</ol>"
        + (f"<h4>Random tokens where it is silent</h4><ul class='examples'>{quiet}</ul>" if quiet else "")
        + "</section>"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
