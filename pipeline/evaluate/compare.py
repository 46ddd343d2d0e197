"""One table and two plots comparing many evaluated runs (``sae-pipe evaluate --all``)."""

from __future__ import annotations

import csv
import io
from typing import Any

from pipeline.evaluate.page import write_page
from pipeline.infra.files import Folder

COLUMNS = [
    "run",
    "arch",
    "layers",
    "n_latents",
    "k",
    "l0",
    "nmse",
    "fvu",
    "dead_share",
    "dense_latents",
    "top_route_share",
    "kl_per_token",
    "kl_paper_scale",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "ce_recovered",
]


def write_comparison(results: list[dict[str, Any]], out: Folder) -> list[str]:
    """``comparison.csv``, ``comparison.md``, ``comparison.html`` (every plot and the suites' numbers),
    ``l0_vs_nmse.png`` and (with KL) ``l0_vs_kl.png``."""
    rows = [{c: _cell(r.get(c)) for c in COLUMNS} for r in sorted(results, key=lambda r: (r["layers"], r["l0"]))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    out.write_bytes(buffer.getvalue().encode(), "comparison.csv")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    out.write_bytes(("\n".join(lines) + "\n").encode(), "comparison.md")
    written = ["comparison.csv", "comparison.md", write_page(results, out), _plot(results, "nmse", out)]
    if all("kl_per_token" in r for r in results):
        written.append(_plot(results, "kl_per_token", out))
    return [out.path(name) for name in written]


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, list):
        return "-".join(map(str, value))
    return "" if value is None else value


def _plot(results: list[dict[str, Any]], metric: str, out: Folder) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for arch in sorted({r["arch"] for r in results}):
        chosen = [r for r in results if r["arch"] == arch]
        ax.scatter([r["l0"] for r in chosen], [r[metric] for r in chosen], label=arch)
        for r in chosen:
            ax.annotate(f"n{r['n_latents']} k{r['k']}", (r["l0"], r[metric]), fontsize=7)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(metric)
    ax.set_title(f"L0 vs {metric}")
    ax.legend()
    name = f"l0_vs_{metric.split('_')[0]}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    out.write_bytes(buffer.getvalue(), name)
    return name


def one_line(result: dict[str, Any]) -> str:
    """A run's headline numbers on one line (what `sae-pipe evaluate` prints without --json)."""
    line = f"{result['run']}: nmse {result['nmse']:.4f} l0 {result['l0']:.1f}"
    if "kl_per_token" in result:
        line += f" kl {result['kl_per_token']:.4f} ce_recovered {result['ce_recovered']:.3f}"
    return line
