"""Two storage backends behind one interface, and the reader every later stage uses.

A shard folder holds the same logical arrays in both backends (``D`` = hidden size, ``L`` =
cached layers, ``n`` = rows of the split):

    train/act, heldout/act        (L, n, D)  float16 (or float32), layer-major so that one
                                             layer is one contiguous block
    */token, */doc                (n,)       int32 token id, document id
    */pos                         (n,)       uint16 position in the packed sequence
    heldout/seq                   (n,)       int32 row of heldout/sequences it comes from
    heldout/sequences, heldout/sequence_docs  (h, T) int32 tokens / document ids of held-out sequences
    heldout/sequence_index        (h,)       int32 global index of each held-out sequence

``memmap`` writes each array as ``<name>.npy``; ``zarr`` writes a zarr v3 group whose ``act``
arrays use the sharding codec (one object per shard, one inner chunk per layer).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from pipeline.errors import CorruptError, UserError
from pipeline.files import Folder
from pipeline.manifest import read_manifest, shard_name

BACKENDS = ("zarr", "memmap")
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


class Backend(Protocol):
    """Writes and reads the named arrays of one shard folder."""

    def write(self, folder: Folder, arrays: dict[str, np.ndarray]) -> None: ...

    def read(self, folder: Folder, name: str, first: Any = slice(None)) -> np.ndarray: ...

    def read_into(self, folder: Folder, name: str, first: Any, out: np.ndarray) -> None: ...


class MemmapBackend:
    """Plain ``.npy`` files, read with ``np.load(mmap_mode='r', allow_pickle=False)``: local disk only."""

    def write(self, folder: Folder, arrays: dict[str, np.ndarray]) -> None:
        root = folder.local()
        for name, array in arrays.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)

    def read(self, folder: Folder, name: str, first: Any = slice(None)) -> np.ndarray:
        return np.array(self._map(folder, name)[first])

    def read_into(self, folder: Folder, name: str, first: Any, out: np.ndarray) -> None:
        """One layer of a layer-major array is one contiguous span of the file: read it with ``readinto``
        (copying from a fresh memory map costs a page fault per 4 KiB)."""
        mapped = self._map(folder, name)
        if (
            isinstance(first, int)
            and mapped.ndim == 3
            and out.flags.c_contiguous
            and mapped[first].nbytes == out.nbytes
        ):
            read_span(folder.local() / f"{name}.npy", mapped.offset + first * mapped[first].nbytes, out)
        else:
            np.copyto(out, mapped[first])

    @staticmethod
    def _map(folder: Folder, name: str) -> np.memmap:
        return np.load(folder.local() / f"{name}.npy", mmap_mode="r", allow_pickle=False)


class ZarrBackend:
    """A zarr v3 group per shard, on a local disk or any fsspec URL."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Any] = {}  # opening an array costs ~0.1 s; reading it again does not
        self._spans: dict[tuple[str, str], ChunkSpans | None] = {}

    def write(self, folder: Folder, arrays: dict[str, np.ndarray]) -> None:
        import zarr

        group = zarr.open_group(self._store(folder, read_only=False), mode="w")
        for name, array in arrays.items():
            rows = max(array.shape[-2] if array.ndim == 3 else array.shape[0], 1)
            if array.ndim == 3:  # (L, n, D): one shard object, one chunk per layer
                chunks, shards = (1, rows, array.shape[2]), (array.shape[0], rows, array.shape[2])
            else:
                chunks, shards = (rows, *array.shape[1:]), None
            group.create_array(
                name, shape=array.shape, dtype=array.dtype, chunks=chunks, shards=shards, compressors=None, fill_value=0
            )[...] = array

    def read(self, folder: Folder, name: str, first: Any = slice(None)) -> np.ndarray:

        return np.asarray(self._array(folder, name)[first])

    def read_into(self, folder: Folder, name: str, first: Any, out: np.ndarray) -> None:
        """Decode straight into ``out`` (a fresh output array costs page faults on every read). A layer
        stored plainly on a local disk is read from its file with one ``readinto``: zarr's partial shard
        decode would zero-fill and copy a whole extra array first (2.5x slower)."""
        from zarr.core.buffer import default_buffer_prototype

        spans = self._plain_chunks(folder, name) if isinstance(first, int) and out.flags.c_contiguous else None
        if spans is not None and spans.sizes[first] == out.nbytes:
            read_span(spans.path, spans.offsets[first], out)
            return
        target = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        self._array(folder, name).get_basic_selection(first, out=target)

    def _plain_chunks(self, folder: Folder, name: str) -> ChunkSpans | None:
        """Where each layer's bytes lie in a local one-shard array whose inner chunks are uncompressed
        little-endian bytes (how this backend writes ``act``); None for any other layout."""
        key = (folder.url, name)
        if key not in self._spans:
            self._spans[key] = _chunk_spans(self._array(folder, name), folder) if folder.is_local else None
        return self._spans[key]

    def _array(self, folder: Folder, name: str) -> Any:
        import zarr

        key = (folder.url, name)
        if key not in self._open:
            self._open[key] = zarr.open_array(self._store(folder, read_only=True), path=name, mode="r")
        return self._open[key]

    @staticmethod
    def _store(folder: Folder, read_only: bool):  # noqa: ANN205 - a zarr Store
        from zarr.storage import FsspecStore, LocalStore

        if folder.is_local:
            return _mapped_store_class()(folder.root, read_only=True) if read_only else LocalStore(folder.root)
        return FsspecStore.from_url(folder.url, read_only=read_only)


class ChunkSpans(NamedTuple):
    """Byte spans of the inner chunks (one per layer) of a one-shard zarr array file."""

    path: Path
    offsets: list[int]
    sizes: list[int]


def _chunk_spans(array: Any, folder: Folder) -> ChunkSpans | None:
    """Read the shard index (the zarr v3 sharding spec: (offset, nbytes) little-endian uint64 pairs at the
    file's end, then their crc32c) when the layout is the plain one; None otherwise."""
    import google_crc32c
    from zarr.codecs import BytesCodec, ShardingCodec
    from zarr.codecs.bytes import Endian
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = array.metadata.codecs
    if (
        len(codecs) != 1
        or not isinstance(codecs[0], ShardingCodec)
        or array.metadata.chunk_grid.chunk_shape != array.shape
    ):
        return None
    sharding = codecs[0]
    inner = sharding.codecs
    if len(inner) != 1 or not isinstance(inner[0], BytesCodec) or sys.byteorder != "little":
        return None
    if sharding.index_location != ShardingCodecIndexLocation.end or inner[0].endian not in (None, Endian.little):
        return None
    path = Path(folder.root) / array.path / array.metadata.encode_chunk_key((0,) * array.ndim)
    n_chunks = math.prod(s // c for s, c in zip(array.shape, sharding.chunk_shape, strict=True))
    size = path.stat().st_size
    if size < 16 * n_chunks + 4:
        return None  # let zarr read it and report what is wrong
    with open(path, "rb") as f:
        f.seek(size - 16 * n_chunks - 4)
        tail = f.read()
    if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
        return None
    index = np.frombuffer(tail[:-4], "<u8").reshape(n_chunks, 2)  # (chunks, [offset, nbytes])
    if (index > size).any() or (index[:, 0] + index[:, 1] > size).any():  # empty chunks are 2**64 - 1
        return None
    return ChunkSpans(path, [int(o) for o in index[:, 0]], [int(n) for n in index[:, 1]])


def read_span(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill the contiguous ``out`` with the bytes of ``path`` from ``offset``; a short file is corrupt."""
    view, got = out.data.cast("B"), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while got < out.nbytes and (n := f.readinto(view[got:])):  # one read(2) returns at most ~2 GiB
            got += n
    if got != out.nbytes:
        raise CorruptError(f"{path} ends {out.nbytes - got} bytes early; run `sae-pipe cache verify` on its cache.")


@functools.lru_cache(maxsize=1)
def _mapped_store_class() -> type:
    """zarr's LocalStore, reading through a memory map: the decoder then copies once, straight from the
    page cache, instead of reading every shard into a fresh bytes object first (2x faster here)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import LocalStore

    class MappedLocalStore(LocalStore):
        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            prototype = prototype or default_buffer_prototype()
            path = self.root / key
            if not path.is_file():
                return None
            size = path.stat().st_size
            start, stop = 0, size
            if isinstance(byte_range, RangeByteRequest):
                start, stop = byte_range.start, byte_range.end
            elif isinstance(byte_range, OffsetByteRequest):
                start = byte_range.offset
            elif isinstance(byte_range, SuffixByteRequest):
                start = max(0, size - byte_range.suffix)
            if stop <= start:
                return prototype.buffer.from_bytes(b"")
            return prototype.buffer.from_array_like(np.memmap(path, dtype=np.uint8, mode="r")[start:stop])

    return MappedLocalStore


def get_backend(name: str) -> Backend:
    if name == "zarr":
        return ZarrBackend()
    if name == "memmap":
        return MemmapBackend()
    raise UserError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}.")


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of raw C-order bytes, per layer for ``act`` arrays (``train/act[0]``...), so a reader can
    check exactly the layers it reads. The values do not depend on the backend."""
    sums = {}
    for name, array in arrays.items():
        parts = [(f"{name}[{i}]", array[i]) for i in range(len(array))] if array.ndim == 3 else [(name, array)]
        for key, part in parts:
            sums[key] = hashlib.sha256(np.ascontiguousarray(part).data).hexdigest()
    return sums


class Problem(NamedTuple):
    """One array of one shard that does not read back as written."""

    shard: int
    array: str  # checksum key, e.g. train/act[1]
    what: str  # "checksum mismatch" or "unreadable (...)"

    def __str__(self) -> str:
        return f"shard {shard_name(self.shard)} {self.array}: {self.what}"


def _parse_checksum_key(key: str) -> tuple[str, Any]:
    """``train/act[1]`` -> (``train/act``, 1); ``train/token`` -> (``train/token``, all)."""
    if key.endswith("]"):
        name, _, index = key[:-1].partition("[")
        return name, int(index)
    return key, slice(None)


class ActivationCache:
    """Read access to a complete cache: manifest facts and per-shard arrays."""

    def __init__(self, folder: Folder, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = get_backend(manifest["spec"]["backend"])

    @classmethod
    def open(cls, where: str | Folder) -> ActivationCache:
        folder = where if isinstance(where, Folder) else Folder.at(where)
        return cls(folder, read_manifest(folder))

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["spec"]["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def rows(self, split: str) -> int:
        return int(self.manifest["rows"][split])

    def layer_index(self, layer: int) -> int:
        """Position of a model layer in the cache's layer axis."""
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in cache {self.key}; it holds layers {self.layers}.")
        return self.layers.index(layer)

    def read(self, shard: int, name: str, first: Any = slice(None)) -> np.ndarray:
        """Array ``name`` (e.g. ``train/act``) of one shard; ``first`` indexes its first axis."""
        return self.backend.read(self.folder.child("shards", shard_name(shard)), name, first)

    def read_into(self, shard: int, name: str, first: Any, out: np.ndarray) -> None:
        """Like :meth:`read`, into a preallocated array of the right shape and dtype."""
        self.backend.read_into(self.folder.child("shards", shard_name(shard)), name, first, out)

    def heldout_rows(self, layers: list[int], max_rows: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Held-out rows shard by shard as (shard, (n, L, D)) for ``layers``, at most ``max_rows`` (0 = all)."""
        left = max_rows or self.rows("heldout")
        positions = [self.layer_index(layer) for layer in layers]
        for record in self.shards:
            n = min(record["rows"]["heldout"], left)
            if n <= 0:
                continue
            yield record["index"], np.stack([self.read(record["index"], "heldout/act", p)[:n] for p in positions], 1)
            left -= n

    def heldout_sequences(self, max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Held-out sequences (S, T) and the mask (S, T) of their stored positions, covering at least
        ``max_tokens`` stored positions (0 = all held-out sequences)."""
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        covered = 0
        for record in self.shards:
            if record["rows"]["heldout"] == 0:
                continue
            seqs = self.read(record["index"], "heldout/sequences")
            mask = np.zeros(seqs.shape, dtype=bool)
            mask[self.read(record["index"], "heldout/seq"), self.read(record["index"], "heldout/pos")] = True
            for seq, seq_mask in zip(seqs, mask):
                if max_tokens and covered >= max_tokens:
                    return np.stack(tokens), np.stack(masks)
                tokens.append(seq)
                masks.append(seq_mask)
                covered += int(seq_mask.sum())
        if not tokens:
            raise UserError(f"cache {self.key} has no held-out sequences; extract it with --heldout > 0.")
        return np.stack(tokens), np.stack(masks)

    def verify(self, only: list[str] | None = None) -> list[Problem]:
        """Re-read arrays (all, or the checksum keys in ``only``) and compare with the manifest's checksums."""
        problems = []
        for record in self.shards:
            for key, expected in record["checksums"].items():
                if only is not None and key not in only:
                    continue
                name, index = _parse_checksum_key(key)
                try:
                    data = np.ascontiguousarray(self.read(record["index"], name, index))
                except Exception as err:  # noqa: BLE001 - any read failure is a finding, not a crash
                    problems.append(
                        Problem(record["index"], key, f"unreadable ({type(err).__name__}: {str(err)[:120]})")
                    )
                    continue
                if hashlib.sha256(data.data).hexdigest() != expected:
                    problems.append(Problem(record["index"], key, "checksum mismatch"))
        return problems

    def require_valid(self, only: list[str] | None = None) -> None:
        """Raise :class:`CorruptError` naming every bad array, deleting nothing."""
        problems = self.verify(only)
        if problems:
            raise CorruptError(
                f"cache {self.folder.url} fails its checksums:\n  "
                + "\n  ".join(map(str, problems))
                + f"\nNothing was deleted. `sae-pipe cache repair {self.folder.url}` drops the bad "
                "shards; re-running the same extract command then rewrites just those."
            )
