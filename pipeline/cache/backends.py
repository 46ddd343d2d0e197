"""Two storage backends behind one interface: how a shard's arrays are written and read.

A shard folder holds the same logical arrays in both backends (``D`` = hidden size, ``L`` =
cached layers, ``n`` = rows of the split):

    train/act, heldout/act        (L, n, D)  float16 (or float32, or int8), layer-major so that one
                                             layer is one contiguous block
    train/scale, heldout/scale    (L, n)     float32 per-token scales of an int8 cache only
    */mlp_in, */mlp_out           (L, n, D)  the MLP sites, when extracted (pipeline.llm.sites), with their
    */mlp_in_scale, ...           (L, n)     own int8 scales
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
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from pipeline.infra.errors import CorruptError, UserError
from pipeline.infra.files import Folder

BACKENDS = ("zarr", "memmap")
STORE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}  # int8: pipeline.cache.compact


class Backend(Protocol):
    """Writes and reads the named arrays of one shard folder."""

    def write(self, folder: Folder, arrays: dict[str, np.ndarray]) -> None: ...

    def read(self, folder: Folder, name: str, first: Any = slice(None)) -> np.ndarray: ...

    def read_into(self, folder: Folder, name: str, first: Any, out: np.ndarray) -> None: ...

    def dtype(self, folder: Folder, name: str) -> np.dtype: ...


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

    def dtype(self, folder: Folder, name: str) -> np.dtype:
        return self._map(folder, name).dtype

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

    def dtype(self, folder: Folder, name: str) -> np.dtype:
        return np.dtype(self._array(folder, name).dtype)

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


def array_sha256(data: np.ndarray) -> str:
    """The hex sha256 of an array's raw C-order bytes: what the writer records, what readers check against."""
    return hashlib.sha256(np.ascontiguousarray(data).data).hexdigest()


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of raw C-order bytes, per layer for ``act`` arrays (``train/act[0]``...), so a reader can
    check exactly the layers it reads. The values do not depend on the backend."""
    sums = {}
    for name, array in arrays.items():
        parts = [(f"{name}[{i}]", array[i]) for i in range(len(array))] if array.ndim == 3 else [(name, array)]
        for key, part in parts:
            sums[key] = array_sha256(part)
    return sums
