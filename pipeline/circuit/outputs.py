"""What `sae-pipe circuit` writes (JSON, CSV, safetensors, PNG, HTML: never pickles).

circuit.json        the chosen circuit (the smallest with faithfulness >= 0.8, else the most faithful):
                    its latents per layer with their score and, where the run was interpreted, their
                    top tokens, explanation and a link into the feature report; every other circuit
                    by method; baseline, stability, wall time, settings
curve.csv           method, param (lambda or size), seed, size, per-layer sizes, faithfulness, completeness
curve.png           faithfulness against circuit size, one line per method (and per seed of the mask)
scores.safetensors  per method and layer the latent scores (mask: the trained logits, one per lambda and seed)
index.html          the chosen circuit's latents, linked to the feature reports
"""

from __future__ import annotations

import csv
import html
import io
import os
from typing import Any, NamedTuple

import pyarrow.parquet as pq
from safetensors.torch import save
from torch import Tensor

from pipeline.circuit.measures import Score
from pipeline.infra.files import Folder
from pipeline.sae.subject import Subject

GOOD = 0.8  # faithfulness a circuit must reach to be chosen for being small
TOP_TOKENS = 5  # top-activating tokens shown per latent


class Found(NamedTuple):
    """One circuit of one method."""

    method: str
    param: float  # mask: lambda; ig / ig_layer / attrib: the size cut
    seed: int  # of the train/test split it was found and measured on (and of the mask's initial noise)
    circuit: list[Tensor]  # per site, bool (N,)
    scores: list[Tensor]  # per site, (N,): mask logits or attribution scores
    score: Score


def chosen(found: list[Found]) -> Found:
    """The smallest circuit with faithfulness >= GOOD (mask first on ties), else the most faithful one."""
    good = [f for f in found if f.score.faithfulness >= GOOD]
    if good:
        return min(good, key=lambda f: (f.score.size, f.method != "mask"))
    return max(found, key=lambda f: f.score.faithfulness)


def feature_notes(cache_root: str, run: str) -> dict[int, dict[str, Any]]:
    """latent -> top tokens, explanation and report link from the run's `interpret` outputs (if any)."""
    folder = Folder.at(cache_root).child("interpret", run).local()
    notes: dict[int, dict[str, Any]] = {}
    if (folder / "examples.parquet").is_file():
        rows = pq.read_table(folder / "examples.parquet", columns=["latent", "kind", "rank", "token"]).to_pylist()
        for row in sorted(rows, key=lambda r: r["rank"]):
            entry = notes.setdefault(int(row["latent"]), {"top_tokens": []})
            if row["kind"] == "top" and len(entry["top_tokens"]) < TOP_TOKENS:
                entry["top_tokens"].append(row["token"])
    if (folder / "explanations.parquet").is_file():
        for row in pq.read_table(folder / "explanations.parquet", columns=["latent", "explanation"]).to_pylist():
            if row["explanation"]:
                notes.setdefault(int(row["latent"]), {})["explanation"] = row["explanation"]
    if (folder / "report.html").is_file():
        for latent, entry in notes.items():
            entry["report"] = f"{folder / 'report.html'}#f{latent}"
    return notes


def latent_rows(best: Found, subjects: list[Subject], cache_root: str) -> list[dict[str, Any]]:
    """The chosen circuit's latents, best score first within each layer."""
    rows = []
    for subject, kept, scores in zip(subjects, best.circuit, best.scores):
        notes = feature_notes(cache_root, subject.folder.name)
        for latent in sorted(kept.nonzero().flatten().tolist(), key=lambda i: -float(scores[i])):
            rows.append(
                {
                    "layer": subject.layers[0],
                    "run": subject.folder.name,
                    "latent": latent,
                    "score": round(float(scores[latent]), 5),
                    **notes.get(latent, {}),
                }
            )
    return rows


def write_outputs(
    out: Folder, subjects: list[Subject], found: list[Found], reruns: list[Found], facts: dict[str, Any], root: str
) -> None:
    """Every output file; circuit.json last, so a folder with it is complete. ``reruns`` (the mask on further
    seeds) join the curve, the scores and the list of circuits, never the choice of the circuit."""
    layers = [s.layers[0] for s in subjects]
    best = chosen(found)
    rows = latent_rows(best, subjects, root)
    every = found + reruns
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "param", "seed", "size", "per_layer", "faithfulness", "completeness"])
    for f in every:
        per_layer = " ".join(f"L{k}:{v}" for k, v in f.score.per_layer.items())
        score = f.score
        writer.writerow(
            [f.method, f.param, f.seed, score.size, per_layer, f"{score.faithfulness:.4f}", f"{score.completeness:.4f}"]
        )
    out.write_bytes(buffer.getvalue().encode(), "curve.csv")
    tensors = {
        f"mask/{f.param:g}/seed{f.seed}/L{layer}"
        if f.method == "mask"
        else f"{f.method}/L{layer}": s.contiguous().cpu()
        for f in every
        for layer, s in zip(layers, f.scores)
    }
    out.write_bytes(save(tensors), "scores.safetensors")
    out.write_bytes(curve_png(every), "curve.png")
    out.write_bytes(page(best, rows, facts, out).encode(), "index.html")
    summary = {"method": best.method, "param": best.param, "seed": best.seed, **best.score._asdict(), "latents": rows}
    circuits = [
        {
            "method": f.method,
            "param": f.param,
            "seed": f.seed,
            **f.score._asdict(),
            "latents": {str(layer): c.nonzero().flatten().tolist() for layer, c in zip(layers, f.circuit)},
        }
        for f in every
    ]
    out.write_json(
        {**facts, "layers": layers, "runs": [s.folder.url for s in subjects], "circuit": summary, "circuits": circuits},
        "circuit.json",
    )


def curve_png(found: list[Found]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    lines = dict.fromkeys((f.method, f.seed) for f in found)
    for method, seed in lines:
        points = sorted(
            (max(f.score.size, 1), f.score.faithfulness) for f in found if (f.method, f.seed) == (method, seed)
        )
        label = f"{method} (seed {seed})" if len({s for m, s in lines if m == method}) > 1 else method
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(GOOD, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (latents)")
    ax.set_ylabel("faithfulness (held-out pairs)")
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def page(best: Found, rows: list[dict[str, Any]], facts: dict[str, Any], out: Folder) -> str:
    """A short HTML page: the chosen circuit's latents, linked to their feature reports."""
    items = []
    for row in rows:
        link = row.get("report")
        href = (
            os.path.relpath(link.split("#")[0], out.local()) + "#" + link.split("#")[1]
            if link and out.is_local
            else link
        )
        name = f"<a href='{html.escape(href)}'>{row['latent']}</a>" if href else str(row["latent"])
        tokens = html.escape(" | ".join(row.get("top_tokens", [])))
        items.append(
            f"<tr><td>{row['layer']}</td><td>{name}</td><td>{row['score']:.4g}</td><td>{tokens}</td>"
            f"<td>{html.escape(row.get('explanation', ''))}</td></tr>"
        )
    s = best.score
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>circuit: {html.escape(facts['task'])}</title></head>"
        f"<body><h1>Circuit for task {html.escape(facts['task'])}</h1>"
        f"<p>{best.method} ({best.param:g}): {s.size} latents, faithfulness {s.faithfulness:.3f}, completeness "
        f"{s.completeness:.3f} on {facts['pairs']['test']} held-out pairs. <img src='curve.png' alt='curve'></p>"
        "<table><tr><th>layer</th><th>latent</th><th>score</th><th>top tokens</th><th>explanation</th></tr>"
        f"{''.join(items)}</table></body></html>"
    )
