"""Layer specs: which residual streams to capture.

Layer ``L`` is the residual stream entering block ``L`` (Hugging Face ``hidden_states[L]``,
0 = embeddings; SAELens calls it ``blocks.L.hook_resid_pre``), so valid layers are ``0..n-1``.
"""

from __future__ import annotations

from pipeline.infra.errors import UserError


def layer_span(layers: list[int]) -> str:
    """Short name of a sorted layer list for folder names: ``L12``, or ``L3-12x2`` (first, last, count)."""
    return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}x{len(layers)}"


def route_range(n_layers: int) -> list[int]:
    """The RouteSAE layer range: n/4 .. 3n/4 inclusive (as in the RouteSAE code)."""
    return list(range(n_layers // 4, n_layers * 3 // 4 + 1))


def parse_layers(spec: str | int | list[int], n_layers: int) -> list[int]:
    """Turn ``6``, ``3,7,11``, ``3:11`` (inclusive), ``all`` or ``route`` into sorted layer ids."""
    valid = f"valid layers are 0..{n_layers - 1} (0 = embeddings, L = input of block L)"
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, list):
        layers = [int(x) for x in spec]
    else:
        text = str(spec).strip().lower()
        if text == "all":
            layers = list(range(n_layers))
        elif text == "route":
            layers = route_range(n_layers)
        elif ":" in text:
            lo, _, hi = text.partition(":")
            layers = list(range(_as_int(lo, spec), _as_int(hi, spec) + 1))
        else:
            layers = [_as_int(part, spec) for part in text.split(",") if part.strip()]
    if not layers:
        raise UserError(f"layer spec {spec!r} selects no layer; {valid}.")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layer(s) {bad} out of range for a {n_layers}-block model; {valid}.")
    return sorted(set(layers))


def _as_int(text: str, spec: object) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"cannot read layer spec {spec!r}: use 6, 3,7,11, 3:11 (inclusive), all or route.") from None
