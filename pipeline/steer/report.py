"""The steering evaluation's folder: steering.csv, generations.jsonl, summary.json, dose_response.png and a
self-contained steering.html (no scripts; the plot is embedded; every model text is escaped)."""

from __future__ import annotations

import base64
import csv
import io
import json
from html import escape
from typing import Any

from pipeline.infra.files import Folder

COLUMNS = ("feature", "strength", "effect", "logprob_gain", "kl", "perplexity", "concept", "fluency")


def write_outputs(
    out: Folder, summary: dict[str, Any], rows: list[dict[str, Any]], generations: list[dict[str, Any]]
) -> None:
    """The folder is written whole (`Folder.replaced`): a run killed while writing leaves the previous
    result or none, never a new steering.csv beside an old plot or summary."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _round(row[k]) for k in COLUMNS} for row in rows)
    with out.replaced() as tmp:
        tmp.write_bytes(text.getvalue().encode(), "steering.csv")
        tmp.write_bytes("".join(json.dumps(g) + "\n" for g in generations).encode(), "generations.jsonl")
        plot = dose_response_png(rows)
        tmp.write_bytes(plot, "dose_response.png")
        tmp.write_json(summary, "summary.json")
        tmp.write_bytes(render(summary, rows, generations, plot).encode(), "steering.html")


def dose_response_png(rows: list[dict[str, Any]]) -> bytes:
    """Effect (activation and log-prob gain) against KL, one line per feature, points labelled by strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for feature in dict.fromkeys(r["feature"] for r in rows):
        mine = sorted((r for r in rows if r["feature"] == feature), key=lambda r: r["strength"])
        for ax, metric in zip(axes, ("effect", "logprob_gain")):
            ax.plot([r["kl"] for r in mine], [r[metric] for r in mine], marker="o", label=f"latent {feature}")
            for r in mine:
                ax.annotate(f"{r['strength']:g}", (r["kl"], r[metric]), fontsize=7)
    axes[0].set_ylabel("feature activation on generated tokens")
    axes[1].set_ylabel("log-prob gain of promoted tokens (nats)")
    for ax in axes:
        ax.set_xlabel("KL from the unedited model on held-out text (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Steering: effect against cost (labels: strength x max activation)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render(summary: dict[str, Any], rows: list[dict[str, Any]], generations: list[dict[str, Any]], plot: bytes) -> str:
    """The HTML page: settings, the plot, the table, and the generations of every setting."""
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{_round(r[c])}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    features = "".join(
        f"<li>latent {escape(f)}: output score {info['output_score']:.3f}, max activation {info['a_max']:.3g}; "
        f"promotes <code>{escape(' '.join(summary['promoted'][f]))}</code></li>"
        for f, info in summary["features"].items()
    )
    texts = "".join(
        f"<tr><td>{g['feature']}</td><td>{g['strength']:g}</td><td>{escape(g['prompt'])}</td>"
        f"<td><code>{escape(g['text'])}</code></td></tr>"
        for g in generations
    )
    image = base64.b64encode(plot).decode()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Steering {escape(summary['run'])}</title></head>"
        f"<body style='font:14px system-ui;max-width:72em;margin:2em auto'><h1>Steering {escape(summary['run'])}</h1>"
        f"<p>Layers {summary['layers']}, mode {escape(summary['mode'])}, {summary['heldout_positions']:,} held-out "
        f"positions for KL, {summary['max_new_tokens']} generated tokens per prompt.</p><ul>{features}</ul>"
        f"<img alt='dose-response' src='data:image/png;base64,{image}'>"
        f"<h2>Dose-response</h2><table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"
        f"<h2>Generations</h2><table border=1 cellpadding=3><tr><th>feature</th><th>strength</th><th>prompt</th>"
        f"<th>generated</th></tr>{texts}</table></body></html>"
    )


def headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The numbers the DVC metrics list, from the values steering.csv holds: at the largest strength, the mean
    effect, log-prob gain and KL over the features."""
    written = [{k: _round(row[k]) for k in ("strength", "effect", "logprob_gain", "kl")} for row in rows]
    strongest = max(float(r["strength"]) for r in written)
    top = [r for r in written if float(r["strength"]) == strongest]
    return {
        "strength": strongest,
        **{f"mean_{k}": sum(float(r[k]) for r in top) / len(top) for k in ("effect", "logprob_gain", "kl")},
    }


def _round(value: Any) -> Any:
    if value is None:  # the judge's columns without a judge
        return ""
    return round(value, 5) if isinstance(value, float) else value
