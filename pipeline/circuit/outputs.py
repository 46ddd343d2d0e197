"""What `sae-pipe circuit` writes (JSON, CSV, safetensors, PNG, HTML: never pickles).

circuit.json        status (found | trivial | unfaithful | not solved) and its message; the chosen circuit
                    (the smallest with VALIDATION faithfulness >= 0.8, else the most faithful, reported
                    with its TEST measures and their 95 % intervals): its latents per layer with their
                    score and, where the run was interpreted, their top tokens, explanation and a link
                    into the feature report; every other circuit by method; ends of each part, stability,
                    wall time, settings. No circuit at all when the task is not solved.
curve.csv           method, param (lambda or size), seed, size, per-layer sizes, validation faithfulness,
                    test faithfulness and completeness with their 95 % bootstrap intervals
curve.png           faithfulness against circuit size, one line per method (and per seed of the mask)
scores.safetensors  per method and layer the latent scores (mask: the trained logits, one per lambda and seed)
index.html          the chosen circuit's latents, linked to the feature reports
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from typing import Any, NamedTuple

import pyarrow.parquet as pq
from safetensors.torch import save
from torch import Tensor

from pipeline.circuit.measures import Score
from pipeline.infra.console import Stopwatch
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.live.subject import Subject

GOOD = 0.8  # faithfulness a circuit must reach to be chosen for being small
TOP_TOKENS = 5  # top-activating tokens shown per latent


class Found(NamedTuple):
    """One circuit of one method."""

    method: str
    param: float  # mask: lambda; ig / ig_layer / attrib: the size cut
    seed: int  # of the train/test split it was found and measured on (and of the mask's initial noise)
    circuit: list[Tensor]  # per site, bool (N,)
    scores: list[Tensor]  # per site, (N,): mask logits or attribution scores
    val: float  # faithfulness on the validation pairs: what the circuit is chosen by
    score: Score  # on the test pairs: what is reported


class Verdict(NamedTuple):
    """The circuit chosen on the validation pairs and what may be claimed of it."""

    best: Found | None  # None: the task is not solved, nothing to choose
    status: str  # found | trivial | unfaithful | not solved
    message: str


def chosen(found: list[Found], why: str) -> Verdict:
    """The smallest circuit with validation faithfulness >= GOOD (mask first on ties), else the most faithful
    one; found only when it reaches GOOD with at most half of the latents (a circuit of most latents is the
    model, not a circuit of it). ``why``: the reason the task is not solved ('' when it is)."""
    if why or not found:
        return Verdict(None, "not solved", f"no circuit claimed: {why or 'no method produced a circuit'}.")
    good = [f for f in found if f.val >= GOOD]
    best = min(good, key=lambda f: (f.score.size, f.method != "mask")) if good else max(found, key=lambda f: f.val)
    s, total = best.score, sum(len(c) for c in best.circuit)
    name = f"{best.method} ({best.param:g}), {s.size} of {total} latents"
    measured = (
        f"test faithfulness {s.faithfulness:.3f} [{s.faithfulness_ci[0]:.3f}, {s.faithfulness_ci[1]:.3f}], "
        f"completeness {s.completeness:.3f} [{s.completeness_ci[0]:.3f}, {s.completeness_ci[1]:.3f}]"
    )
    if not good:
        return Verdict(best, "unfaithful", f"no circuit found: none reaches validation faithfulness {GOOD} "
                       f"(best {name}, validation {best.val:.3f}; {measured}).")  # fmt: skip
    if 2 * s.size > total:
        return Verdict(best, "trivial", f"no circuit found: the smallest circuit at validation faithfulness {GOOD} "
                       f"keeps more than half of the latents ({name}; {measured}); try more --steps or larger "
                       "--lambdas.")  # fmt: skip
    return Verdict(best, "found", f"found {name}: validation faithfulness {best.val:.3f}; {measured}.")


def feature_notes(cache_root: str, run: str) -> dict[int, dict[str, Any]]:
    """latent -> top tokens, explanation and report link from the run's `interpret` outputs (if any)."""
    found = Layout(cache_root).interpreted(run)
    notes: dict[int, dict[str, Any]] = {}
    if found.examples.is_file():
        rows = pq.read_table(found.examples, columns=["latent", "kind", "rank", "token"]).to_pylist()
        for row in sorted(rows, key=lambda r: r["rank"]):
            entry = notes.setdefault(int(row["latent"]), {"top_tokens": []})
            if row["kind"] == "top" and len(entry["top_tokens"]) < TOP_TOKENS:
                entry["top_tokens"].append(row["token"])
    if found.explanations.is_file():
        for row in pq.read_table(found.explanations, columns=["latent", "explanation"]).to_pylist():
            if row["explanation"]:
                notes.setdefault(int(row["latent"]), {})["explanation"] = row["explanation"]
    if found.report.is_file():
        for latent, entry in notes.items():
            entry["report"] = f"{found.report}#f{latent}"
    return notes


def latent_rows(best: Found, subjects: list[Subject], cache_root: str) -> list[dict[str, Any]]:
    """The chosen circuit's latents, largest absolute score first within each layer."""
    rows = []
    for subject, kept, scores in zip(subjects, best.circuit, best.scores):
        notes = feature_notes(cache_root, subject.folder.name)
        for latent in sorted(kept.nonzero().flatten().tolist(), key=lambda i: -abs(float(scores[i]))):
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


CURVE_COLUMNS = ["method", "param", "seed", "size", "per_layer", "val_faithfulness", "faithfulness"]
CURVE_COLUMNS += ["faithfulness_low", "faithfulness_high", "completeness", "completeness_low", "completeness_high"]


def curve_csv(every: list[Found]) -> bytes:
    """One row per circuit: its size, validation faithfulness and test measures with their intervals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CURVE_COLUMNS)
    for f in every:
        s = f.score
        numbers = [f.val, s.faithfulness, *s.faithfulness_ci, s.completeness, *s.completeness_ci]
        per_layer = " ".join(f"L{k}:{v}" for k, v in s.per_layer.items())
        writer.writerow([f.method, f.param, f.seed, s.size, per_layer, *(f"{x:.4f}" for x in numbers)])
    return buffer.getvalue().encode()


def described(f: Found, layers: list[int]) -> dict[str, Any]:
    """One circuit as circuit.json lists it (test measures, validation faithfulness, latents per layer)."""
    measures = {**f.score._asdict(), "val_faithfulness": f.val}
    latents = {str(layer): c.nonzero().flatten().tolist() for layer, c in zip(layers, f.circuit)}
    return {"method": f.method, "param": f.param, "seed": f.seed, **measures, "latents": latents}


def write_outputs(
    out: Folder, subjects: list[Subject], found: list[Found], reruns: list[Found], facts: dict[str, Any], root: str,
    clock: Stopwatch,
) -> dict[str, Any]:  # fmt: skip
    """Every output file, written whole into a temporary folder that replaces ``out`` at the end (a killed run
    leaves the previous result or none). ``reruns`` (the mask on further seeds) join the curve, the scores and
    the list of circuits, never the choice of the circuit. Returns circuit.json's document."""
    layers = [s.layers[0] for s in subjects]
    verdict = chosen(found, facts.pop("why"))
    rows = latent_rows(verdict.best, subjects, root) if verdict.best else []
    every = found + reruns
    tensors = {
        f"mask/{f.param:g}/seed{f.seed}/L{layer}"
        if f.method == "mask"
        else f"{f.method}/L{layer}": s.contiguous().cpu()
        for f in every
        for layer, s in zip(layers, f.scores)
    }
    summary = {**described(verdict.best, layers), "latents": rows} if verdict.best else None
    document = {
        "status": verdict.status,
        "found": verdict.status == "found",
        "message": verdict.message,
        **facts,
        "seconds": round(clock.seconds, 1),
        "layers": layers,
        "runs": [s.folder.url for s in subjects],
        "circuit": summary,
        "circuits": [described(f, layers) for f in every],
    }
    text = json.dumps(document, indent=2, allow_nan=False)  # a NaN is a bug to see, never a number to publish
    with out.replaced() as tmp:
        tmp.write_bytes(curve_csv(every), "curve.csv")
        tmp.write_bytes(save(tensors), "scores.safetensors")
        tmp.write_bytes(curve_png(every), "curve.png")
        tmp.write_bytes(page(verdict, rows, facts, out).encode(), "index.html")
        tmp.write_bytes((text + "\n").encode(), "circuit.json")
    return document


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
    if lines:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def page(verdict: Verdict, rows: list[dict[str, Any]], facts: dict[str, Any], out: Folder) -> str:
    """A short HTML page: the verdict and the chosen circuit's latents, linked to their feature reports."""
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
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>circuit: {html.escape(facts['task'])}</title></head>"
        f"<body><h1>Circuit for task {html.escape(facts['task'])}</h1>"
        f"<p>{html.escape(verdict.message)} ({facts['pairs']['test']} held-out test pairs.) "
        "<img src='curve.png' alt='curve'></p>"
        "<table><tr><th>layer</th><th>latent</th><th>score</th><th>top tokens</th><th>explanation</th></tr>"
        f"{''.join(items)}</table></body></html>"
    )
