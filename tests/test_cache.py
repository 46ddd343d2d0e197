"""The cache reader and its shuffled stream, on synthetic caches (both backends)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.backends import read_span
from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.infra.errors import CorruptError
from tests.support.caches import synthetic_cache


@pytest.mark.parametrize("shards, batch", [([768, 768, 768], 400), ([100, 900, 50, 900], 128)])
def test_small_pool_never_overflows(tmp_path: Path, shards: list[int], batch: int) -> None:
    cache = ActivationCache.open(synthetic_cache(tmp_path, shards, layers=(0, 1), d=8))
    stream = ActivationStream(cache, StreamSpec([0, 1], batch, pool_mb=0.0001))  # the smallest pool allowed
    counts = Counter(tuple(r) for b in stream.batches(2) for r in b[0])
    assert sum(counts.values()) == (2 * sum(shards)) // batch * batch  # every whole batch of two epochs
    assert max(counts.values()) <= 2  # no row twice per epoch
    assert sum(c == 2 for c in counts.values()) >= sum(shards) - 2 * batch  # only the remainders miss out


@pytest.mark.parametrize("backend", ["zarr", "memmap"])
def test_direct_layer_reads_equal_the_library_decode(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    cache = ActivationCache.open(synthetic_cache(tmp_path, [300, 200], layers=(0, 3, 5), backend=backend))
    names = [
        (r["index"], f"{split}/act", pos) for r in cache.shards for split in ("train", "heldout") for pos in range(3)
    ]
    expected = [cache.read(*name) for name in names]  # zarr's own decode / the .npy memory map
    monkeypatch.setattr(zarr.Array, "get_basic_selection", lambda *a, **k: pytest.fail("zarr decoded a plain layer"))
    for name, want in zip(names, expected, strict=True):
        out = np.full_like(want, np.nan)
        cache.read_into(*name, out)
        np.testing.assert_array_equal(out, want)


def test_a_damaged_shard_index_is_not_read_directly(tmp_path: Path) -> None:
    cache = ActivationCache.open(synthetic_cache(tmp_path, [300], layers=(0, 3, 5), backend="zarr"))
    (shard_file,) = Path(cache.folder.root).rglob("train/act/c/0/0/0")
    damaged = bytearray(shard_file.read_bytes())
    damaged[-1] ^= 1  # the index checksum
    shard_file.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):  # zarr reads it instead, and says what is wrong
        cache.read_into(0, "train/act", 1, np.empty((300, 32), np.float16))


def test_a_short_file_is_reported_not_read_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptError, match="ends 28 bytes early"):
        read_span(path, 36, np.empty(92, np.uint8))


def test_stream_serves_each_training_row_once_and_never_heldout(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [700, 900, 500], layers=(0,), d=8)
    cache = ActivationCache.open(folder)
    train = {tuple(r) for s in cache.shards for r in cache.read(s["index"], "train/act", 0)}
    held = {tuple(r) for s in cache.shards for r in cache.read(s["index"], "heldout/act", 0)}
    stream = ActivationStream(cache, StreamSpec([0], 100, seed=3, pool_mb=0.01))
    served = [tuple(r) for b in stream.batches(1) for r in b[0]]
    assert len(served) == 2100 and len(set(served)) == len(served)
    assert set(served) <= train and not set(served) & held
    first = next(iter(stream.batches(1)))
    again = next(iter(ActivationStream(cache, StreamSpec([0], 100, seed=3, pool_mb=0.01)).batches(1)))
    np.testing.assert_array_equal(first, again)  # reproducible with a seed
    shards_in_first = {
        s["index"]
        for s in cache.shards
        for r in cache.read(s["index"], "train/act", 0)
        if tuple(r) in {tuple(x) for x in first[0]}
    }
    assert len(shards_in_first) > 1  # batches mix shards


def test_int8_stream_serves_decoded_rows_with_their_own_scales(tmp_path: Path) -> None:
    """Codes and scales move together through a pool that compacts: every served row decodes as stored."""
    folder = synthetic_cache(tmp_path, [700, 900, 500], layers=(0,), d=8, dtype="int8")
    cache = ActivationCache.open(folder)
    decoded = {tuple(r) for s in cache.shards for r in cache.layer_rows(s["index"], "train", 0)}
    codes = np.concatenate([cache.read(s["index"], "train/act", 0) for s in cache.shards])
    assert codes.dtype == np.int8 and cache.manifest["format_version"] == 2
    served = [b for b in ActivationStream(cache, StreamSpec([0], 100, seed=3, pool_mb=0.005)).batches(1)]
    assert all(b.dtype == np.float32 for b in served)
    rows = [tuple(r) for b in served for r in b[0]]
    assert len(rows) == 2100 and set(rows) <= decoded


def test_activations_in_another_dtype_than_the_manifest_are_refused(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [300, 300], layers=(0,), d=8)
    act = folder.local() / "shards" / "000001" / "train" / "act.npy"
    np.save(act, np.load(act).astype(np.int8))  # a shard of an int8 cache in a float16 cache's folder
    cache = ActivationCache.open(folder)
    with pytest.raises(CorruptError, match="stores train/act as int8, but its manifest says float16"):
        list(ActivationStream(cache, StreamSpec([0], 100)).batches(1))
    with pytest.raises(CorruptError, match="stores train/act as int8"):
        cache.verify()
