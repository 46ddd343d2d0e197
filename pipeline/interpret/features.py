"""Feature-activation tables, built by streaming the SAE's top-k codes over held-out rows.

Only the (latent, activation, row) triples of active latents are kept, never a dense
tokens x latents matrix; sorted by latent and activation they give every per-latent statistic,
the top examples and quantile-stratified samples (delphi-style) with vectorized numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.contexts import HeldoutIndex, decode_windows
from pipeline.cache.reader import ActivationCache
from pipeline.infra.console import Bar
from pipeline.live.subject import encode_rows
from pipeline.sae.interface import SAE

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
HIST_BINS = 20


@dataclass
class Activations:
    """Every activation of every latent on the scanned rows, grouped by latent, strongest first."""

    latent: np.ndarray  # (M,) int32
    act: np.ndarray  # (M,) float32
    row: np.ndarray  # (M,) int64 held-out row
    layer: np.ndarray | None  # (M,) int16 routed layer position (RouteSAE hard routing), else None
    starts: np.ndarray  # (N + 1,) offsets of each latent's group
    n_rows: int  # rows scanned
    row_layer: np.ndarray | None = None  # (n_rows,) int16 routed layer position of every row (hard routing)

    def group(self, latent: int) -> slice:
        return slice(int(self.starts[latent]), int(self.starts[latent + 1]))

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    def where(self, keep: np.ndarray) -> Activations:
        """Only the activations on rows where ``keep`` ((n_rows,) bool) holds, in the same order."""
        entries = keep[self.row]
        latent = self.latent[entries]
        starts = np.searchsorted(latent, np.arange(len(self.starts)))
        layer = None if self.layer is None else self.layer[entries]
        return Activations(latent, self.act[entries], self.row[entries], layer, starts, self.n_rows, self.row_layer)

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, activations) of one latent, rows ascending: for looking activations up by row."""
        group = self.group(latent)
        order = np.argsort(self.row[group], kind="stable")
        return self.row[group][order], self.act[group][order]


@torch.no_grad()
def collect(
    sae: SAE,
    layers: list[int],
    cache: ActivationCache,
    max_rows: int,
    batch: int,
    k: int | None,
    theta: float | None,
    progress: Bar | None = None,
) -> Activations:
    """Encode held-out rows batch by batch, keeping only active (latent, activation, row) triples."""
    device = next(sae.parameters()).device
    parts: dict[str, list[np.ndarray]] = {"latent": [], "act": [], "row": [], "layer": [], "row_layer": []}
    base = 0
    for out in encode_rows(sae, cache, layers, "heldout", max_rows, batch, k, theta):
        fired = out.latents.acts > 0  # (b, k)
        acts = out.latents.acts  # (b, k)
        row_ids = torch.arange(base, base + len(fired), device=device)[:, None].expand_as(fired)
        if out.layer_choice is not None and out.layer_weights is not None:  # hard routing: the SAE saw w * x
            weight = out.layer_weights.gather(1, out.layer_choice[:, None])  # (b, 1)
            acts = acts / weight
            parts["layer"].append(out.layer_choice[:, None].expand_as(fired)[fired].cpu().numpy().astype(np.int16))
            parts["row_layer"].append(out.layer_choice.cpu().numpy().astype(np.int16))
        parts["latent"].append(out.latents.indices[fired].cpu().numpy().astype(np.int32))
        parts["act"].append(acts[fired].cpu().numpy().astype(np.float32))
        parts["row"].append(row_ids[fired].cpu().numpy())
        base += len(fired)
        if progress is not None:
            progress.advance(0, len(fired))
    return _group(parts, base, int(sae.cfg.n_latents))


def _group(parts: dict[str, list[np.ndarray]], n_rows: int, n_latents: int) -> Activations:
    latent = np.concatenate(parts["latent"]) if parts["latent"] else np.zeros(0, np.int32)
    act = np.concatenate(parts["act"]) if parts["act"] else np.zeros(0, np.float32)
    row = np.concatenate(parts["row"]) if parts["row"] else np.zeros(0, np.int64)
    order = np.lexsort((-act, latent))  # by latent, then strongest activation first
    layer = np.concatenate(parts["layer"])[order] if parts["layer"] else None
    starts = np.searchsorted(latent[order], np.arange(n_latents + 1))
    row_layer = np.concatenate(parts["row_layer"]) if parts["row_layer"] else None
    return Activations(latent[order], act[order], row[order], layer, starts, n_rows, row_layer)


def feature_table(acts: Activations, layers: list[int] | None = None) -> pa.Table:
    """One row per latent: count, frequency, mean/max activation, quantiles, a histogram."""
    counts = acts.counts
    n = len(counts)
    sums = np.bincount(acts.latent, weights=acts.act, minlength=n)
    maxima = np.zeros(n)
    active = counts > 0
    maxima[active] = acts.act[acts.starts[:-1][active]]  # each group starts with its strongest activation
    columns = {
        "latent": np.arange(n, dtype=np.int32),
        "count": counts.astype(np.int64),
        "frequency": counts / max(acts.n_rows, 1),
        "mean_act": sums / np.maximum(counts, 1),
        "max_act": maxima,
    }
    for q in QUANTILES:
        columns[f"q{int(q * 100):02d}"] = _quantile(acts, q)
    table = pa.table(columns)
    table = table.append_column("hist", pa.array(list(_histograms(acts, maxima)), type=pa.list_(pa.int32())))
    if acts.layer is not None and layers is not None:
        table = table.append_column("top_layer", pa.array(_top_layers(acts, layers), type=pa.int32()))
    return table


def _quantile(acts: Activations, q: float) -> np.ndarray:
    """Per-latent quantile with numpy's linear interpolation, on groups sorted in descending order."""
    counts = acts.counts
    out = np.zeros(len(counts))
    has = counts > 0
    position = q * (counts[has] - 1)  # index in ascending order
    lo, hi = np.floor(position).astype(np.int64), np.ceil(position).astype(np.int64)
    last = acts.starts[:-1][has] + counts[has] - 1  # the group's smallest activation
    low_value, high_value = acts.act[last - lo], acts.act[last - hi]  # ascending index i sits at last - i
    out[has] = low_value + (high_value - low_value) * (position - lo)
    return out


def _histograms(acts: Activations, maxima: np.ndarray) -> np.ndarray:
    """(N, HIST_BINS) counts of each latent's activations over (0, its max]."""
    hist = np.zeros((len(maxima), HIST_BINS), dtype=np.int32)
    if len(acts.act):
        scale = maxima[acts.latent]
        bins = np.minimum((acts.act / np.maximum(scale, 1e-12) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        np.add.at(hist, (acts.latent, bins), 1)
    return hist


def _top_layers(acts: Activations, layers: list[int]) -> np.ndarray:
    """The routed layer each latent fires at most often (-1 if it never fires)."""
    assert acts.layer is not None, "only RouteSAE activations carry a routed layer"
    counts = np.zeros((len(acts.counts), len(layers)), dtype=np.int64)
    np.add.at(counts, (acts.latent, acts.layer), 1)
    return np.where(counts.sum(1) > 0, np.asarray(layers)[counts.argmax(1)], -1)


Example = tuple[int, str, int, float, int]  # (latent, kind, rank, activation, row)


def select_examples(
    acts: Activations,
    top: int,
    quantile_bins: int,
    per_bin: int,
    random: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> list[Example]:
    """For every active latent: top, quantile-sampled, and random rows of ``pool`` (default: all rows)
    where it is silent."""
    pool = np.arange(acts.n_rows) if pool is None else pool
    chosen: list[Example] = []
    for latent in np.flatnonzero(acts.counts):
        group = acts.group(int(latent))
        rows, values = acts.row[group], acts.act[group]
        chosen += [(int(latent), "top", i, float(values[i]), int(rows[i])) for i in range(min(top, len(rows)))]
        chosen += quantile_sample(int(latent), rows, values, quantile_bins, per_bin, rng)
        chosen += [(int(latent), "random", i, 0.0, r) for i, r in enumerate(inactive_rows(rows, pool, random, rng))]
    return chosen


def quantile_sample(
    latent: int, rows: np.ndarray, values: np.ndarray, bins: int, per_bin: int, rng: np.random.Generator
) -> list[Example]:
    """``per_bin`` examples from each of ``bins`` rank bins of activations sorted strongest first
    (kind q0 = the strongest bin)."""
    chosen: list[Example] = []
    for b, part in enumerate(np.array_split(np.arange(len(rows)), bins)):
        for i in rng.choice(part, min(per_bin, len(part)), replace=False) if len(part) else []:
            chosen.append((latent, f"q{b}", int(i), float(values[i]), int(rows[i])))
    return chosen


def inactive_rows(active: np.ndarray, pool: np.ndarray, wanted: int, rng: np.random.Generator) -> list[int]:
    """Up to ``wanted`` distinct random rows of ``pool`` where the latent is not active."""
    if len(pool) - len(active) <= 0:
        return []
    candidates = rng.choice(pool, min(len(pool), wanted * 4 + len(active) // 10 + 8), replace=False)
    return [int(r) for r in candidates[~np.isin(candidates, active)][:wanted]]  # random order, not sorted


def examples_table(
    chosen: list[Example],
    index: HeldoutIndex,
    tokenizer,  # noqa: ANN001
    before: int,
    after: int,
    split: str,
    layer: np.ndarray | None = None,
) -> pa.Table:
    """The selected examples with their split (train: the explainer may see it; test: only scorers do),
    packed sequence, token, document, position and decoded context; with ``layer`` ((rows,) model layer
    per held-out row, RouteSAE), the layer each example was routed to."""
    rows = np.asarray([c[4] for c in chosen], dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    texts = decode_windows(tokenizer, [index.window(int(r), before, after) for r in unique])
    table = pa.table(
        {
            "latent": pa.array([c[0] for c in chosen], pa.int32()),
            "split": pa.array([split] * len(chosen), pa.string()),
            "kind": pa.array([c[1] for c in chosen], pa.string()),
            "rank": pa.array([c[2] for c in chosen], pa.int32()),
            "activation": pa.array([c[3] for c in chosen], pa.float32()),
            "row": rows,
            "sequence": index.sequence[rows].astype(np.int64),
            "token_id": index.token[rows].astype(np.int32),
            "doc": index.doc[rows].astype(np.int32),
            "pos": index.pos[rows].astype(np.int32),
            "prefix": pa.array([texts[i][0] for i in inverse], pa.string()),
            "token": pa.array([texts[i][1] for i in inverse], pa.string()),
            "suffix": pa.array([texts[i][2] for i in inverse], pa.string()),
        }
    )
    return table if layer is None else table.append_column("layer", pa.array(layer[rows], pa.int32()))


def with_columns(table: pa.Table, columns: dict[str, dict[int, object]], types: dict[str, pa.DataType]) -> pa.Table:
    """``table`` (one row per latent) with more per-latent columns, given as {latent: value}; null where
    a latent has no value. How later stages add their own numbers to features.parquet."""
    latents = table["latent"].to_pylist()
    for name, values in columns.items():
        array = pa.array([values.get(latent) for latent in latents], types[name])
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, array)
    return table
