"""Formatting benchmark results as a dated markdown section of RESULTS.md, newest first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADER = """# Benchmark results

Produced by `make bench` (`python -m benchmarks.run`); newest run first, older runs kept below so
progress shows. Medians over repeats with min-max; the machine is shared and noisy (+-10 %), so
only ratios measured in the same run are compared. Targets are those of the benchmarks issue.
"""


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def fit_section(fit: dict[str, Any], limits: dict[str, float]) -> list[str]:
    lines = [
        "### fit: one TopK step (d=576, 16384 latents, k=32, batch 4096, 2 threads, SmolLM2 layer 12)",
        "",
        "| contender | tokens/s (min-max) | held-out FVU after the run | peak RSS MiB | CPU use |",
        "|---|---|---|---|---|",
    ]
    for name, r in fit.items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | {r['fvu_heldout']:.4f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['cpu_util']:.2f} |"
        )
    peer = fit.get("sparsify 1.3.3")
    lines.append("")
    for precision, key in (("bf16", "sae-pipe bf16"), ("fp32", "sae-pipe fp32")):
        ours = fit[key]
        share = ours["tokens_per_s"] / limits[precision]
        lines.append(
            f"- {key}: {share:.2f}x of its encoder-GEMM limit ({limits[precision]:,.0f} tok/s); "
            f"target >= 0.6x: {_ok(share >= 0.6)}"
        )
        if peer:
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            lines.append(
                f"- {key} vs sparsify: {ratio:.2f}x tokens/s, FVU {ours['fvu_heldout']:.4f} vs "
                f"{peer['fvu_heldout']:.4f}; target >= 1.5x at equal or lower FVU: "
                f"{_ok(ratio >= 1.5 and ours['fvu_heldout'] <= peer['fvu_heldout'] * 1.01)}"
            )
    return lines


def extract_section(extract: dict[str, Any]) -> list[str]:
    lines = [
        "### extract: SmolLM2-135M, 64 sequences x 256 tokens, batch 8, float32 on CPU",
        "",
        "| what | tokens/s (min-max) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) |" for name, r in extract.items()]
    bare = extract["bare forward (LM head)"]["tokens_per_s"]
    top, low = (
        extract["extract layer 29 (top)"]["tokens_per_s"] / bare,
        extract["extract layer 3"]["tokens_per_s"] / bare,
    )
    return [
        *lines,
        "",
        f"- top layer: {top:.2f}x a bare forward; target >= 0.9x: {_ok(top >= 0.9)}",
        f"- layer 3: {low:.2f}x a bare forward (it stops after block 3); target > 1x: {_ok(low > 1)}",
    ]


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row["settings"].items())


def io_section(reader: dict[str, Any], sweep: list[dict[str, Any]], fit: dict[str, Any]) -> list[str]:
    raw, stream = reader["raw sequential read"], reader["shuffled stream"]
    consume = fit["sae-pipe bf16"]["tokens_per_s"]
    mb = reader["bytes_per_row"] / 2**20
    return [
        "### reader and sweep",
        "",
        "| what | rows/s (min-max) | MiB/s |",
        "|---|---|---|",
        f"| raw sequential read | {raw['rows_per_s']:,.0f} ({raw['min']:,.0f}-{raw['max']:,.0f}) | "
        f"{raw['rows_per_s'] * mb:,.0f} |",
        f"| shuffled, prefetched stream | {stream['rows_per_s']:,.0f} ({stream['min']:,.0f}-{stream['max']:,.0f}) | "
        f"{stream['rows_per_s'] * mb:,.0f} |",
        "",
        f"- stream vs one SAE's consumption ({consume:,.0f} tok/s, bf16 step): "
        f"{stream['rows_per_s'] / consume:.1f}x; target >= 20x: {_ok(stream['rows_per_s'] >= 20 * consume)}",
        f"- stream vs raw read: {stream['rows_per_s'] / raw['rows_per_s']:.2f}x; target >= 0.5x: "
        f"{_ok(stream['rows_per_s'] >= 0.5 * raw['rows_per_s'])}",
        *[
            f"- 4 SAEs ({_describe(row)}, {row['tokens_each']:,} tokens each, {row['layers_read']} layer(s) read): "
            f"one read {row['4-member sweep s']:.1f} s vs 4 separate fits {row['4 separate fits s']:.1f} s = "
            f"{row['ratio']:.2f}x; target <= 0.5x: {_ok(row['ratio'] <= 0.5)}"
            for row in sweep
        ],
    ]


def disk_section(disk: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### disk: bytes per stored token per layer (all files of the cache)",
        "",
        "| cache | layers | tokens | bytes/token/layer | 2d | overhead | target <= 1 % |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['cache']} | {r['layers']} | {r['tokens']:,} | {r['bytes_per_token_per_layer']:.1f} | {r['2d']} | "
        f"{r['overhead'] * 100:.2f} % | {_ok(r['overhead'] <= 0.01)} |"
        for r in disk
    ]
    return lines


def prepend(path: Path, results: dict[str, Any], command: str) -> None:
    m = results["machine"]
    section = [
        f"## {m['date']} - commit {m['commit']}",
        "",
        f"{m['cpu']}; {m['versions']}. Command: `{command}`.",
        "",
        *fit_section(results["fit"], results["gemm_limits"]),
        "",
        *extract_section(results["extract"]),
        "",
        *io_section(results["reader"], results["sweep"], results["fit"]),
        "",
        *disk_section(results["disk"]),
        "",
    ]
    old = path.read_text().split("\n## ", 1)[1] if path.exists() and "\n## " in path.read_text() else ""
    path.write_text(HEADER + "\n" + "\n".join(section) + ("\n## " + old if old else ""))
