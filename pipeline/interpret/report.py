"""One self-contained HTML page per run: the feature list, then each feature's histogram and examples.

No scripts, no external files: it opens from disk in any browser. Every piece of corpus or model
text goes through ``html.escape``.
"""

from __future__ import annotations

from html import escape
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

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
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
        _summary(summary),
        _index(shown, rows, explanations),
    ]
    parts += [_section(latent, rows[latent], by_latent.get(latent, []), explanations.get(latent)) for latent in shown]
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(summary: dict[str, Any]) -> str:
    items = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, (dict, list))
    )
    return f"<h2>Summary</h2><table>{items}</table>"


def _index(shown: list[int], rows: dict[int, dict[str, Any]], explanations: dict[int, dict[str, Any]]) -> str:
    head = (
        "<tr><th>latent</th><th>category</th><th>score</th><th>explanation</th><th>frequency</th><th>max act</th></tr>"
    )
    body = []
    for latent in shown:
        e = explanations.get(latent, {})
        body.append(
            f"<tr><td><a href='#f{latent}'>{latent}</a></td><td>{escape(str(e.get('category') or '-'))}</td>"
            f"<td>{escape(str(e.get('score') or '-'))}</td><td>{escape(str(e.get('explanation') or ''))}</td>"
            f"<td>{rows[latent]['frequency']:.5f}</td><td>{rows[latent]['max_act']:.3f}</td></tr>"
        )
    return f"<h2>Features</h2><table class='index'>{head}{''.join(body)}</table>"


def _section(
    latent: int, row: dict[str, Any], examples: list[dict[str, Any]], explanation: dict[str, Any] | None
) -> str:
    e = explanation or {}
    label = (
        f"<span class='cat'>{escape(str(e['category']))}</span> score {escape(str(e['score']))}"
        if e.get("category")
        else "<span class='muted'>not explained</span>"
    )
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
        f"{row['mean_act']:.3f}, max {row['max_act']:.3f}</p>{_histogram(row['hist'], row['max_act'])}"
        f"<h4>Top and sampled activations</h4><ol class='examples'>{items}</ol>"
        + (f"<h4>Random tokens where it is silent</h4><ul class='examples'>{quiet}</ul>" if quiet else "")
        + "</section>"
    )


def _histogram(counts: list[int], top: float, width: int = 300, height: int = 60) -> str:
    """Inline SVG bars of activation counts over (0, max]."""
    peak = max(max(counts, default=0), 1)
    bar = width / max(len(counts), 1)
    rects = "".join(
        f"<rect x='{i * bar:.1f}' y='{height - c / peak * height:.1f}' width='{bar - 1:.1f}' "
        f"height='{c / peak * height:.1f}' fill='#5b7bd5'/>"
        for i, c in enumerate(counts)
    )
    return (
        f"<svg width='{width}' height='{height + 14}' role='img' aria-label='activation histogram'>{rects}"
        f"<text x='0' y='{height + 12}' font-size='10'>0</text>"
        f"<text x='{width - 40}' y='{height + 12}' font-size='10'>{top:.2f}</text></svg>"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
