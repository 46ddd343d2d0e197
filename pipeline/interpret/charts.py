"""Small inline SVG charts for the self-contained HTML pages (no scripts, no external files)."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#5b7bd5", "#d5805b", "#5bb08a", "#a05bd5")


def histogram(counts: list[int], low: str, high: str, width: int = 300, height: int = 60) -> str:
    """Bars of ``counts`` over equal bins, the axis labelled ``low`` .. ``high``."""
    peak = max(max(counts, default=0), 1)
    bar = width / max(len(counts), 1)
    rects = "".join(
        f"<rect x='{i * bar:.1f}' y='{height - c / peak * height:.1f}' width='{bar - 1:.1f}' "
        f"height='{c / peak * height:.1f}' fill='{COLORS[0]}'><title>{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f"<svg width='{width}' height='{height + 14}' role='img' aria-label='histogram'>{rects}"
        f"<text x='0' y='{height + 12}' font-size='10'>{escape(low)}</text>"
        f"<text x='{width}' y='{height + 12}' font-size='10' text-anchor='end'>{escape(high)}</text></svg>"
    )


def scatter(
    series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, width: int = 420, height: int = 240
) -> str:
    """Points per series; x on a log10 axis (frequencies), y on [0, 1] (scores), chance level dashed."""
    xs = [math.log10(x) for points in series.values() for x, _ in points if x > 0]
    if not xs:
        return "<p class='muted'>no scored features</p>"
    lo, hi = math.floor(min(xs)), math.ceil(max(xs) + 1e-9)
    hi = hi if hi > lo else lo + 1
    left, bottom = 40, 30
    plot_w, plot_h = width - left - 10, height - bottom - 10

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (math.log10(x) - lo) / (hi - lo) * plot_w, 10 + (1 - y) * plot_h

    marks = []
    for color, (name, points) in zip(COLORS, series.items()):
        marks += [
            f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='3' fill='{color}' fill-opacity='0.7'><title>{escape(name)}: "
            f"{y:.2f} at {x:.2g}</title></circle>"
            for x, y in points
            if x > 0
            for cx, cy in [at(x, y)]
        ]
    ticks = "".join(
        f"<text x='{at(10.0**e, 0)[0]:.1f}' y='{height - 14}' font-size='10' text-anchor='middle'>1e{e}</text>"
        for e in range(lo, hi + 1)
    )
    legend = "".join(
        f"<text x='{left + 8 + 110 * i}' y='{height - 2}' font-size='10' fill='{color}'>● {escape(name)}</text>"
        for i, (color, name) in enumerate(zip(COLORS, series))
    )
    chance = at(10.0**lo, 0.5)[1]
    return (
        f"<svg width='{width}' height='{height + 4}' role='img' aria-label='{escape(y_label)} vs {escape(x_label)}'>"
        f"<rect x='{left}' y='10' width='{plot_w}' height='{plot_h}' fill='none' stroke='#bbb'/>"
        f"<line x1='{left}' x2='{left + plot_w}' y1='{chance:.1f}' y2='{chance:.1f}' stroke='#999' "
        f"stroke-dasharray='4 3'/><text x='2' y='14' font-size='10'>1.0</text>"
        f"<text x='2' y='{chance + 3:.1f}' font-size='10'>0.5</text>"
        f"<text x='2' y='{10 + plot_h}' font-size='10'>0</text>"
        f"{''.join(marks)}{ticks}{legend}"
        f"<text x='{left + plot_w - 90}' y='{height - 14}' font-size='10'>{escape(x_label)}</text></svg>"
    )


def interval(mean: float, low: float, high: float, width: int = 160, height: int = 14) -> str:
    """A mean with its interval on a [0, 1] axis, chance (0.5) marked."""

    def x(v: float) -> float:
        return 2 + max(0.0, min(1.0, v)) * (width - 4)

    return (
        f"<svg width='{width}' height='{height}' role='img' aria-label='{mean:.3f} [{low:.3f}, {high:.3f}]'>"
        f"<line x1='{x(0.5):.1f}' x2='{x(0.5):.1f}' y1='0' y2='{height}' stroke='#bbb'/>"
        f"<line x1='{x(low):.1f}' x2='{x(high):.1f}' y1='{height / 2}' y2='{height / 2}' stroke='{COLORS[0]}' "
        f"stroke-width='2'/><circle cx='{x(mean):.1f}' cy='{height / 2}' r='3' fill='{COLORS[0]}'/></svg>"
    )
