"""benchmarks/step_parts.py's timers: every call counted under its place, and every place restored afterwards."""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_parts import table, timed_calls
from pipeline.sae import kernels


def test_timed_calls_count_each_call_and_restore_every_place() -> None:
    places = [(kernels.SparseDecode, "backward"), (kernels, "sparse_t_matmul"), (kernels, "bag_dot")]
    before = [owner.__dict__[name] for owner, name in places]
    vals = torch.rand(6, 2, requires_grad=True)
    w_dec = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"), timed_calls(places) as times:
        kernels.SparseDecode.apply(vals, torch.tensor([[0, 1]] * 6), w_dec).sum().backward()
        kernels.SparseDecode.apply(vals, torch.tensor([[2, 4]] * 6), w_dec).sum().backward()
        raise RuntimeError("a failure inside the timed run")
    assert {label: len(spans) for label, spans in times.items()} == {
        "SparseDecode.backward": 2,
        "kernels.bag_dot": 2,  # called by the backward: nested timers count too
        "kernels.sparse_t_matmul": 2,
    }
    assert [owner.__dict__[name] for owner, name in places] == before  # restored although the run raised
    assert isinstance(kernels.SparseDecode.__dict__["backward"], staticmethod)


def test_table_rows_per_step_and_share_of_the_fit() -> None:
    rows = table({"a": [0.1, 0.3, 0.2, 0.4], "b": [1.0, 1.0]}, steps=2, whole_s=4.0)
    assert [row["place"] for row in rows] == ["b", "a"]  # largest total first
    place, *numbers = rows[1].values()
    assert place == "a" and numbers == pytest.approx([2.0, 250.0, 1.0, 0.25])  # calls a step, median ms, s, share
