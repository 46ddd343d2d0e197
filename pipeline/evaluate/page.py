"""``comparison.html``: every evaluated run of a cache on one page (``sae-pipe evaluate --all``).

One L0-vs-metric plot per metric any run has (one point per SAE, coloured by architecture, its name on
hover), as inline SVG so the page is one self-contained file, then the table of every run. The metrics
are metrics.json's and, where the run's SAEBench files exist (``--suite``), their headline numbers.
"""

from __future__ import annotations

import html
import math
from typing import Any

from pipeline.infra.files import Folder
from pipeline.interop.saebench import file_name

# column -> (SAEBench eval type, metric category, metric), read from the run's SAEBench file
SUITE_METRICS = {
    "explained_variance": ("core", "reconstruction_quality", "explained_variance"),
    "kl_div_score": ("core", "model_behavior_preservation", "kl_div_score"),
    "absorption": ("absorption_first_letter", "mean", "mean_absorption_fraction_score"),
    "full_absorption": ("absorption_first_letter", "mean", "mean_full_absorption_score"),
    "sae_top_1_accuracy": ("sparse_probing", "sae", "sae_top_1_test_accuracy"),
    "sae_top_5_accuracy": ("sparse_probing", "sae", "sae_top_5_test_accuracy"),
    "llm_accuracy": ("sparse_probing", "llm", "llm_test_accuracy"),
    "max_decoder_cos": ("sae_pipe_geometry", "decoder", "max_decoder_cosine_sim_mean"),
}
PLOTTED = ("nmse", "kl_per_token", "ce_recovered", *SUITE_METRICS)
TABLE = ("run", "arch", "layers", "n_latents", "k", "l0", *PLOTTED)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, MARGIN = 380, 250, 48


def suite_numbers(result: dict[str, Any], out: Folder) -> dict[str, float]:
    """The run's SAEBench headline numbers under :data:`SUITE_METRICS`' names (absent files, -1 NaNs left out)."""
    found = {}
    for column, (eval_type, category, metric) in SUITE_METRICS.items():
        parts = (result["run"], "saebench", eval_type, file_name(result["run"]))
        if out.exists(*parts):
            value = out.read_json(*parts)["eval_result_metrics"].get(category, {}).get(metric)
            if isinstance(value, (int, float)) and value != -1:
                found[column] = float(value)
    return found


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def scatter(rows: list[dict[str, Any]], metric: str) -> str:
    """An SVG plot of L0 against ``metric``, one circle per row that has both."""
    points = [(r, _number(r.get("l0")), _number(r.get(metric))) for r in rows]
    shown = [(r, x, y) for r, x, y in points if x is not None and y is not None]
    xs, ys = [x for _, x, _ in shown], [y for _, _, y in shown]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    archs = sorted({str(r["arch"]) for r, _, _ in shown})

    def px(x: float) -> float:
        return MARGIN + (x - x0) / span_x * (WIDTH - 2 * MARGIN)

    def py(y: float) -> float:
        return HEIGHT - MARGIN - (y - y0) / span_y * (HEIGHT - 2 * MARGIN)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle">L0 vs {html.escape(metric)}</text>',
        f'<rect x="{MARGIN}" y="{MARGIN}" width="{WIDTH - 2 * MARGIN}" height="{HEIGHT - 2 * MARGIN}" '
        'fill="none" stroke="#999"/>',
        f'<text x="{MARGIN}" y="{HEIGHT - 28}" font-size="10">{x0:.4g}</text>',
        f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 28}" font-size="10" text-anchor="end">{x1:.4g}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle" font-size="11">L0</text>',
        f'<text x="{MARGIN - 4}" y="{HEIGHT - MARGIN}" font-size="10" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{MARGIN - 4}" y="{MARGIN + 8}" font-size="10" text-anchor="end">{y1:.4g}</text>',
    ]
    for r, x, y in shown:
        colour = COLOURS[archs.index(str(r["arch"])) % len(COLOURS)]
        label = html.escape(f"{r['run']}: L0 {x:.4g}, {metric} {y:.4g}")
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}"><title>{label}</title></circle>')
    for i, arch in enumerate(archs):
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<text x="{WIDTH - MARGIN + 4}" y="{MARGIN + 12 * (i + 1)}" font-size="10" fill="{colour}">')
        parts.append(f"{html.escape(arch)}</text>")
    return "".join(parts) + "</svg>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return html.escape("" if value is None else str(value))


def write_page(results: list[dict[str, Any]], out: Folder) -> str:
    """Write ``comparison.html`` under ``out`` (the evaluate folder holding each run's files); its name."""
    rows = [{**r, **suite_numbers(r, out)} for r in sorted(results, key=lambda r: (str(r["layers"]), r["l0"]))]
    plots = [scatter(rows, m) for m in PLOTTED if any(_number(r.get(m)) is not None for r in rows)]
    columns = [c for c in TABLE if any(r.get(c) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    caches = ", ".join(sorted({html.escape(str(r.get("cache_key", ""))) for r in rows}))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sae-pipe comparison</title>"
        "<style>body{font-family:sans-serif}svg{margin:6px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
        f"<h1>{len(rows)} SAEs of cache {caches}</h1>"
        "<p>Each point is one SAE; hover for its name. Suite numbers are SAEBench's (files under "
        "&lt;run&gt;/saebench/); definitions in pipeline/evaluate/.</p>"
        f"<div>{''.join(plots)}</div><table><tr>{head}</tr>{body}</table></body></html>\n"
    )
    out.write_bytes(page.encode(), "comparison.html")
    return "comparison.html"
