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


def flip_byte(folder: Path, shard: int, array: str, offset: int) -> None:
    """Corrupt one byte of a memmap shard's array ``offset`` bytes past its 128-byte .npy header."""
    path = folder / "shards" / f"{shard:06d}" / "train" / f"{array}.npy"
    data = bytearray(path.read_bytes())
    data[128 + offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_verifying_stream_refuses_a_bad_array_and_never_serves_its_rows(tmp_path: Path) -> None:
    folder = synthetic_cache(tmp_path, [300] * 6, layers=(0, 1), d=8)
    flip_byte(folder.local(), 5, "act", 300 * 8 * 2 + 10)  # inside layer 1 of the last shard (layer-major float16)
    cache = ActivationCache.open(folder)
    bad = {tuple(r) for r in cache.read(5, "train/act", 1)}  # its layer-1 rows, as now stored
    assert len(list(ActivationStream(cache, StreamSpec([0], 100, verify=True)).batches(2))) == 36  # layer 0 intact
    unchecked = [r for b in ActivationStream(cache, StreamSpec([1], 100)).batches(1) for r in map(tuple, b[0])]
    assert len(unchecked) == 1800 and bad <= set(unchecked)  # without verify the bad rows train
    served = []
    in_order = StreamSpec([1], 100, pool_mb=0.0001, shuffle=False, verify=True)  # shard 5 is read last
    with pytest.raises(CorruptError, match=r"shard 000005 train/act\[1\]: checksum mismatch(.|\n)*cache repair"):
        for batch in ActivationStream(cache, in_order).batches(1):
            served += map(tuple, batch[0])
    assert len(served) >= 1000 and not bad & set(served)  # the other shards' rows came first, none of shard 5's


def test_a_verifying_stream_checks_each_array_once_and_an_int8_caches_scales(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = synthetic_cache(tmp_path, [700, 900, 500], layers=(0, 1), d=8, dtype="int8")
    checked: Counter[tuple[int, str]] = Counter()
    real_check = ActivationCache.check
    monkeypatch.setattr(ActivationCache, "check", lambda c, s, k, d: (checked.update([(s, k)]), real_check(c, s, k, d)))
    cache = ActivationCache.open(folder)
    assert len(list(ActivationStream(cache, StreamSpec([1], 100, verify=True)).batches(3))) == 63
    assert checked == {(s, key): 1 for s in (0, 1, 2) for key in ("train/act[1]", "train/scale")}  # not per epoch
    unrecorded = ActivationCache.open(folder)
    del unrecorded.manifest["shards"][1]["checksums"]["train/act[0]"]  # as verify() does, nothing to compare with
    assert len(list(ActivationStream(unrecorded, StreamSpec([0], 100, verify=True)).batches(1))) == 21
    flip_byte(folder.local(), 2, "scale", 500 * 4 + 2)  # the scales of layer 1
    with pytest.raises(CorruptError, match=r"shard 000002 train/scale: checksum mismatch"):
        list(ActivationStream(cache, StreamSpec([0], 100, verify=True)).batches(1))  # one checksum for all layers
