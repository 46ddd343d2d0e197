"""benchmarks/archs.py's bookkeeping: Pareto frontiers, the issue's bar per architecture, table, CSV and picture."""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.report import publish

HERE = Path(__file__).resolve().parent
BAR_L0 = 32  # the issue's Done-when: at L0 32, FVU no worse than the peer's, >= 3x its tokens/s, < 1 % dead
SPEEDUP, DEAD = 3.0, 0.01
L0_TOLERANCE = 0.1  # |log(L0 / ours)|: a peer run at our target this near our L0 stands in where none bracket it
PEER_LR = " at lr "  # a peer row trained at a learning rate other than its default: "SAELens BatchTopK at lr 0.005"


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal L0 and value, one strictly lower; both
    minimized), ordered by L0. Points with a NaN are never on it."""
    ok = [i for i, p in enumerate(points) if not any(math.isnan(t) for t in p)]
    front = [
        i
        for i in ok
        if not any(points[j][0] <= points[i][0] and points[j][1] <= points[i][1] and points[j] != points[i] for j in ok)
    ]
    return sorted(front, key=lambda i: points[i])


def at_l0(points: Sequence[tuple[float, float]], l0: float) -> float | None:
    """The value at ``l0``, linear in log L0 between the nearest points on each side; None outside their range."""
    below = [p for p in points if p[0] <= l0]
    above = [p for p in points if p[0] >= l0]
    if not below or not above:
        return None
    (a, va), (b, vb) = max(below), min(above)
    if a == b:
        return va
    t = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
    return va + t * (vb - va)


def peer_families(results: list[dict[str, Any]], pair: str) -> list[list[dict[str, Any]]]:
    """The paired peer's runs, one list per training setting: its default row name, and each ``PAIR at lr X``
    (archs.py's ``--peer-lr``), so runs at different learning rates are never interpolated together."""
    names = dict.fromkeys(r["name"] for r in results if r["name"] == pair or r["name"].startswith(pair + PEER_LR))
    return [[r for r in results if r["name"] == name] for name in names]


class Reading(NamedTuple):
    """One peer setting's FVU against ours at one L0, as far as the runs tell."""

    name: str  # the peer setting's row name
    how: str  # "at" our L0 | "dominated" | "at its L0" (ours interpolated there) | "none"
    fvu: float | None  # the peer's FVU there (dominated: the highest of its runs at L0 >= ours, a lower bound)
    ours: float | None  # ours there: our run's FVU, or ours interpolated at the peer run's L0
    runs: list[dict[str, Any]]


def peer_reading(runs: list[dict[str, Any]], ours: dict[str, Any], mine: list[dict[str, Any]]) -> Reading:
    """One peer setting against our run ``ours`` (and ``mine``: our architecture's runs at every target), first at
    our L0: interpolated over log L0 between the peer's runs around it, else its run at our target if that lies
    within L0_TOLERANCE of our L0 (a peer trained at k 32 whose inference threshold lands at L0 31.3 has no run
    above ours), else "dominated" if a run at an L0 at least ours has an FVU at least ours (FVU falls as L0 grows,
    so the setting does no better at our L0). Else at its run's L0, nearest ours first, with ours interpolated
    there between our runs at other targets; else nothing."""
    name, fvu = runs[0]["name"], at_l0(sorted((p["l0"], p["fvu"]) for p in runs), ours["l0"])
    gap = {id(p): abs(math.log(p["l0"] / ours["l0"])) if p["l0"] > 0 else math.inf for p in runs}
    near = [p for p in runs if p.get("target") == ours["target"] and gap[id(p)] <= L0_TOLERANCE]
    if fvu is not None or near:
        return Reading(name, "at", near[0]["fvu"] if fvu is None else fvu, ours["fvu"], runs)
    bound = max((p["fvu"] for p in runs if p["l0"] >= ours["l0"]), default=None)
    if bound is not None and bound >= ours["fvu"]:
        return Reading(name, "dominated", bound, ours["fvu"], runs)
    curve = sorted((r["l0"], r["fvu"]) for r in mine)
    for p in sorted(runs, key=lambda p: gap[id(p)]):
        if (there := at_l0(curve, p["l0"])) is not None:
            return Reading(name, "at its L0", p["fvu"], there, [p])
    return Reading(name, "none", None, None, runs)


def bar(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per architecture of ours run at target BAR_L0: its FVU against each of the paired peer's settings
    (:func:`peer_reading`; ok when at least one setting can be compared and ours reads no higher against any),
    the tokens/s ratio (against the best-reading setting's run at the same target, else the mean of its runs),
    the dead share, and whether each part holds."""
    rows = []
    for ours in [r for r in results if r["pair"] and r["target"] == BAR_L0]:
        mine = [r for r in results if r["name"] == ours["name"]]
        readings = [peer_reading(runs, ours, mine) for runs in peer_families(results, ours["pair"])]
        if not readings:
            continue
        measured = sorted((r for r in readings if r.how == "at"), key=lambda r: r.fvu or 0.0)
        chosen = (measured or [r for r in readings if r.how != "none"] or readings)[0]
        # at the same target where the peer ran one (its speed falls with k), else its runs' mean (one per l1)
        timed = [p for p in chosen.runs if p.get("target") == ours["target"]] or chosen.runs
        speed = ours["tokens_per_s"] / (sum(p["tokens_per_s"] for p in timed) / len(timed))
        row = {"arch": ours["name"], "peer": chosen.name, "fvu": ours["fvu"], "readings": readings}
        row |= {"peer_fvu": measured[0].fvu if measured else None, "speedup": speed, "l0": ours["l0"]}
        comparable = [r for r in readings if r.how != "none"]
        row["fvu_ok"] = bool(comparable) and all((r.ours or 0.0) <= (r.fvu or 0.0) for r in comparable)
        row["dead_share"] = ours["dead_share"]
        row["pass"] = row["fvu_ok"] and speed >= SPEEDUP and ours["dead_share"] < DEAD
        rows.append(row)
    return rows


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per run, the Pareto-optimal ones (L0-vs-FVU, L0-vs-KL, over all runs) marked."""
    fvu_front = set(pareto([(r["l0"], r["fvu"]) for r in results]))
    kl_front = set(pareto([(r["l0"], r.get("kl_per_token", math.nan)) for r in results]))
    head = "| contender | target / l1 | tokens | L0 | FVU | KL/token | CE rec. | dead | dense | tok/s | threads "
    head += "| peak RSS MiB | load |"
    lines = [head, "|" + "---|" * 13]
    for i, r in enumerate(results):
        setting = f"{r['target']:g}" if r["target"] is not None else f"l1 {r['setting']['coeff']:g}"
        marks = ("F" if i in fvu_front else "") + ("K" if i in kl_front else "")
        lines.append(
            f"| {r['name']}{' (' + marks + ')' if marks else ''} | {setting} | {r['tokens']:,} | {r['l0']:.1f} | "
            f"{r['fvu']:.4f} | "
            f"{_cell(r.get('kl_per_token'), '.4f')} | {_cell(r.get('ce_recovered'), '.4f')} | "
            f"{r['dead_share']:.2%} | {r['dense_latents']} | {r['tokens_per_s']:,.0f} | "
            f"{_cell(r.get('threads'), 'd')} | {r['peak_rss_mb']:,.0f} | "
            f"{r['load_after']} |"
        )
    return lines


def wide_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: each run scored at a wider k too (the TopK family at 4k), its held-out FVU and L0 at both;
    a peer's own FVU (its library's encode and decode, before import) beside ours as a check of the import."""
    lines = ["| contender | k | FVU at k | L0 at k | 4k | FVU at 4k | L0 at 4k | dead at 4k | peer's own FVU k / 4k |"]
    lines.append("|" + "---|" * 9)
    for r in [r for r in results if "wide" in r]:
        own = f"{r['own_fvu']:.4f} / {r['own_fvu_wide']:.4f}" if "own_fvu_wide" in r else "-"
        w = r["wide"]
        lines.append(
            f"| {r['name']} | {r['target']:g} | {r['fvu']:.4f} | {r['l0']:.1f} | {w['k']} | {w['fvu']:.4f} | "
            f"{w['l0']:.1f} | {w['dead_share']:.2%} | {own} |"
        )
    return lines


def describe(reading: Reading) -> str:
    """A peer setting's reading, for the verdict line."""
    if reading.how == "at":
        return f"{reading.name} {reading.fvu:.4f}"
    runs = ", ".join(f"L0 {p['l0']:.1f}: {p['fvu']:.4f}" for p in sorted(reading.runs, key=lambda p: p["l0"]))
    if reading.how == "at its L0":
        return f"{reading.name} at its L0 ({runs}; ours there {reading.ours:.4f})"
    return f"{reading.name} {'worse at a higher L0' if reading.how == 'dominated' else 'no run near'} ({runs})"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per architecture: the bar's three parts with the numbers, every peer setting's reading."""
    return [
        f"- {r['arch']} vs {r['peer']}: FVU {r['fvu']:.4f} at L0 {r['l0']:.1f} against "
        f"{'; '.join(describe(reading) for reading in r['readings'])}: "
        f"{'ok' if r['fvu_ok'] else '**worse/unknown**'}; "
        f"tokens/s {r['speedup']:.2f}x {'ok' if r['speedup'] >= SPEEDUP else '**< 3x**'}; dead "
        f"{r['dead_share']:.2%} {'ok' if r['dead_share'] < DEAD else '**>= 1 %**'}: "
        f"{'PASS' if r['pass'] else '**FAIL**'}"
        for r in rows
    ]


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    """The runs as a DVC scatter-plot CSV (x l0, y fvu or kl_per_token, one series per contender)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        head = ["contender", "target", "l0", "fvu", "kl_per_token", "ce_recovered", "dead_share", "tokens_per_s"]
        out.writerow([*head, "threads"])
        for r in results:
            out.writerow(
                [r["name"], r["target"], f"{r['l0']:.3f}", f"{r['fvu']:.5f}", r.get("kl_per_token", ""),
                 r.get("ce_recovered", ""), f"{r['dead_share']:.5f}", f"{r['tokens_per_s']:.0f}", r.get("threads", "")]
            )  # fmt: skip


def l0_window(results: list[dict[str, Any]]) -> tuple[float, float]:
    """The picture's L0 axis: half the smallest target to twice the largest. A run far off every target (a
    peer's penalty that all but silenced its SAE) would otherwise stretch the axis and squeeze the curves; it
    stays in the table. Without targets (peers' runs only), the runs' own range."""
    targets = [float(r["target"]) for r in results if r.get("target") is not None] or [r["l0"] for r in results]
    return min(targets) / 2, max(targets) * 2


def picture(results: list[dict[str, Any]], path: Path) -> None:
    """L0 vs FVU and L0 vs KL per token, one marker series per contender, the overall frontiers as lines, the
    L0 axis over :func:`l0_window` (how many runs fall outside it is written on the picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    names = list(dict.fromkeys(r["name"] for r in results))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}  # one color per contender
    low, high = l0_window(results)
    for ax, key, label in ((axes[0], "fvu", "held-out FVU"), (axes[1], "kl_per_token", "KL per token")):
        runs = [r for r in results if r.get(key) is not None]
        inside = [r for r in runs if low <= r["l0"] <= high]
        if not inside:  # --kl-tokens -1, or every run off the window: a log axis of no data cannot be laid out
            why = f"no run at L0 {low:g}-{high:g}" if runs else "not measured"
            ax.text(0.5, 0.5, f"{label}: {why}", ha="center", transform=ax.transAxes)
            continue
        for name in dict.fromkeys(r["name"] for r in runs):
            mine = [r for r in runs if r["name"] == name]
            style = "o-" if mine[0]["library"] == "sae-pipe" else "s--"
            ax.plot(*zip(*sorted((r["l0"], r[key]) for r in mine)), style, label=name, color=colors[name], alpha=0.8)
        front = [runs[i] for i in pareto([(r["l0"], r[key]) for r in runs])]
        ax.plot([r["l0"] for r in front], [r[key] for r in front], "k:", lw=2, label="Pareto frontier")
        values = [r[key] for r in inside]
        ax.set(xscale="log", yscale="log", xlabel="L0 (held-out)", ylabel=label, xlim=(low, high))
        ax.set_ylim(min(values) / 1.15, max(values) * 1.15)
        if len(inside) < len(runs):
            ax.set_title(f"{len(runs) - len(inside)} run(s) at L0 outside {low:g}-{high:g}: in the table", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.78, 1))  # the legend in a column of its own, right of the panels
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish_all(results: list[dict[str, Any]], args: argparse.Namespace, cache_key: str) -> None:
    """Table, bar, CSV and picture; with --write into RESULTS.md (the picture and CSV next to it)."""
    folder = HERE if args.write else Path(args.scratch)  # a partial run (--only) leaves the published ones alone
    where = "benchmarks" if args.write else args.scratch
    write_csv(results, folder / "archs.csv")
    picture(results, folder / "archs.png")
    wide = wide_table(results)
    lines = [
        f"Cache `{cache_key}`, {args.latents} latents, batch 4096, the training tokens of each row; scored on "
        "every held-out row (FVU, L0, dead = fires on no held-out row, dense = fires on > 10 % of them); KL/CE: "
        f"`sae-pipe evaluate --metrics kl,ce --max-tokens {args.kl_tokens}`. (F)/(K): on the L0-vs-FVU / "
        "L0-vs-KL Pareto frontier. tok/s: training tokens / training seconds (ours: the whole fit call; "
        "SAELens: SAETrainer.fit(); sparsify: its steps). threads: the contender's torch threads (- where its run did "
        "not record them; the header's count is the publishing process's). load: the 1-min load average after the run "
        f"(2 shared cores). Picture: {where}/archs.png; data: {where}/archs.csv.",
        "",
        *table(results),
        "",
        f"Bar at L0 {BAR_L0} (issue 30): FVU no worse than the peer's, >= {SPEEDUP:g}x its tokens/s, < 1 % dead.",
        "",
        *verdicts(bar(results)),
    ]
    if len(wide) > 2:
        lines += ["", "The TopK family at k and at 4k (multi-TopK trains both codes):", "", *wide]
    publish(lines, "architectures at equal tokens (issue 30)", "benchmarks.archs", args.write)
