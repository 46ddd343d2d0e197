"""The shuffled, prefetched stream of training rows that feeds SAE training.

Each epoch visits the shards in a random order. Shards are read whole (large sequential reads)
into a mixing pool of rows; the pool is shuffled and half of it is served as batches while the
next shards refill it, so every batch mixes rows from several shards. Unshuffled (the RouteSAE
reference's order), shards come in index order and rows as stored, each full batch served as the pool
needs room. Every row is served once per epoch, except the few short of a full batch at an epoch's
end: they open the next epoch (and are dropped after the last). A background thread does all reading
and shuffling ahead of the trainer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.cache.compact import SCALE_DTYPE, dequantize
from pipeline.cache.manifest import site_arrays
from pipeline.cache.reader import ActivationCache
from pipeline.infra.errors import UserError

MOVE_BYTES = 16 * 2**20  # rows moved per copy when the pool is compacted
# threads hashing what the reader put in the pool (sha256 releases the GIL): one core's ~1.8 GB/s halved the
# stream's rate in the reader thread (1.8M -> 0.84M demo rows/s, one core), enough workers keep up with the reads
CHECK_THREADS = 2


@dataclass(frozen=True)
class StreamSpec:
    """What to read and in which order."""

    layers: list[int]  # model layers to serve, in this order along axis 0 of each (L, B, D) batch
    batch_size: int  # rows per batch
    seed: int = 0  # shard order and row shuffling
    pool_mb: float = 1024.0  # size of the mixing pool
    prefetch: int = 4  # batches prepared ahead
    rank: int = 0  # this process reads shards rank, rank + world, ...
    world: int = 1
    sites: tuple[str, ...] = ("resid",)  # with MLP sites, axis 0 is site-major: (S * L, B, D), same rows
    shuffle: bool = True  # False: shards in index order, rows as stored (the RouteSAE reference's order)
    verify: bool = False  # check each array against its checksum when first read: a bad one is never served


class ActivationStream:
    """Iterates over fixed-size batches (L, B, D) of training rows, epoch after epoch.

    Batches are layer-major like the cache: ``batch[i]`` is one layer's (B, D) block, contiguous; a stream
    of several sites serves, for each site in turn, its layers' blocks of the same rows (transcoders read
    mlp_in and mlp_out of one token side by side). They
    come in the cache's dtype (float16 or float32), or decoded to float32 from an int8 cache, whose pool
    keeps the codes and their per-token scales (a quarter of float32's memory).
    """

    def __init__(self, cache: ActivationCache, spec: StreamSpec) -> None:
        self.cache, self.spec = cache, spec
        positions = [cache.layer_index(layer) for layer in spec.layers]
        missing = [site for site in spec.sites if site not in cache.sites]
        if missing:
            raise UserError(
                f"cache {cache.key} holds {', '.join(cache.sites)}, not {', '.join(missing)}; "
                "extract it with --sites resid,mlp_in,mlp_out."
            )
        # (activation array, its int8 scale array, layer position) of each block on the batch's axis 0
        self.blocks = [(*site_arrays(site), pos) for site in spec.sites for pos in positions]
        self.shard_rows = {r["index"]: int(r["rows"]["train"]) for r in cache.shards if r["rows"]["train"] > 0}
        self.shards = sorted(self.shard_rows)[spec.rank :: spec.world]
        self.rows = sum(self.shard_rows[i] for i in self.shards)
        row_bytes = len(self.blocks) * cache.d_model * np.dtype(cache.manifest["spec"]["dtype"]).itemsize
        row_bytes += len(self.blocks) * np.dtype(SCALE_DTYPE).itemsize if cache.compact else 0
        largest = max(self.shard_rows.values(), default=1)
        wanted = max(int(spec.pool_mb * 2**20) // row_bytes, 2 * (largest + spec.batch_size))  # room to refill
        self.pool_rows = min(wanted, self.rows + spec.batch_size)  # never more than the data needs
        self._pool: np.ndarray | None = None  # allocated once: first-touch page faults cost as much as reading
        self._scales: np.ndarray | None = None  # (L, rows) per-token scales of an int8 cache
        self._verified: set[tuple[int, str]] = set()  # (shard, checksum key) read and checked (or being checked)
        self._checks: list[Future] = []  # checks of pool rows not served yet
        self._checker: ThreadPoolExecutor | None = None  # runs them, while the stream produces

    def batches(self, epochs: int, skip: int = 0) -> Iterator[np.ndarray]:
        """Batches of ``epochs`` passes; the first ``skip`` batches are dropped (to resume)."""
        out: queue.Queue[np.ndarray | BaseException | None] = queue.Queue(self.spec.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce, args=(epochs, skip, out, stop), daemon=True, name="activation-stream"
        )
        thread.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock the producer if it waits on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def _produce(self, epochs: int, skip: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            served = 0
            for batch in self._batches(epochs):
                if stop.is_set():
                    return
                if served >= skip:
                    out.put(batch)
                served += 1
            out.put(None)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            out.put(err)

    def _batches(self, epochs: int) -> Iterator[np.ndarray]:
        """Deterministic for a given seed: same shard order, same shuffles, same batches."""
        rng = np.random.default_rng(self.spec.seed)
        size = self.spec.batch_size
        if self._pool is None:
            dtype = self.cache.manifest["spec"]["dtype"]
            self._pool = np.empty((len(self.blocks), self.pool_rows, self.cache.d_model), dtype=dtype)
            if self.cache.compact:
                self._scales = np.empty((len(self.blocks), self.pool_rows), dtype=SCALE_DTYPE)
        pool = self._pool  # (L, rows, D)
        filled = 0
        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="checksum") as self._checker:
            for _ in range(epochs):
                for shard in rng.permutation(self.shards) if self.spec.shuffle else self.shards:
                    while filled + self.shard_rows[int(shard)] > self.pool_rows:  # make room: serve half the pool
                        half = max(filled // 2 - (filled // 2) % size, size)
                        # in order, every full batch goes: the rows kept (under a batch) then precede the next shard
                        serve = half if self.spec.shuffle else filled - filled % size
                        filled = yield from self._serve(pool, filled, serve, rng)
                    filled += self._read_into(pool, filled, int(shard))
                filled = yield from self._serve(pool, filled, filled - filled % size, rng)  # the epoch's end

    def _serve(
        self, pool: np.ndarray, filled: int, serve: int, rng: np.random.Generator
    ) -> Generator[np.ndarray, None, int]:
        """Yield ``serve`` random rows of the pool as batches (unshuffled: the first ``serve``); move the rest
        to the front (unshuffled, fewer than ``serve`` and in order)."""
        for check in self._checks:  # every row in the pool passed its checksum before any is served or moved
            check.result()
        self._checks.clear()
        perm = rng.permutation(filled) if self.spec.shuffle else np.arange(filled)
        size = self.spec.batch_size
        scales = self._scales
        for start in range(0, serve, size):
            rows = np.sort(perm[start : start + size])  # sorted gathers read memory in order
            yield pool[:, rows] if scales is None else dequantize(pool[:, rows], scales[:, rows])  # (L, B, D)
        keep = filled - serve
        # Only kept rows behind the front part move, into the served rows' slots inside it, a slice at a
        # time: a quarter of the pool per refill and a 16 MiB temporary, where gathering all kept rows
        # at once would allocate half the pool again.
        served, kept = perm[:serve], perm[serve:]
        holes, movers = np.sort(served[served < keep]), np.sort(kept[kept >= keep])
        step = max(1, MOVE_BYTES // (pool.shape[0] * pool.shape[2] * pool.itemsize))  # bounds the temporary copy
        for start in range(0, len(holes), step):
            pool[:, holes[start : start + step]] = pool[:, movers[start : start + step]]
        if scales is not None:
            scales[:, holes] = scales[:, movers]
        return keep

    def _read_into(self, pool: np.ndarray, start: int, shard: int) -> int:
        """Read one shard's training rows of the requested blocks straight into the pool; return their count.

        With ``verify`` each array is checked against the manifest's checksum on its first read, by the checker
        threads while the next shard is read, and before any row of the pool is served (:meth:`_serve`): a fit
        checks exactly the bytes it trains on, with no pass over the cache of its own (the whole training data,
        per fit and layer, at OpenWebText scale)."""
        rows = self.shard_rows[shard]
        for i, (act, scale, pos) in enumerate(self.blocks):
            block = pool[i, start : start + rows]  # (n, D), contiguous
            self.cache.read_into(shard, f"train/{act}", pos, block)
            key = f"train/{act}[{pos}]"  # its checksum's key: one per layer
            if self._unchecked(shard, key):
                assert self._checker is not None, "reads happen inside _batches"
                self._checks.append(self._checker.submit(self.cache.check, shard, key, block))
            if self._scales is not None:
                self.cache.read_into(shard, f"train/{scale}", pos, self._scales[i, start : start + rows])  # (n,)
                if self._unchecked(shard, f"train/{scale}"):  # one checksum for every layer's scales (L, n):
                    self.cache.check(shard, f"train/{scale}", self.cache.read(shard, f"train/{scale}"))  # small
        return rows

    def _unchecked(self, shard: int, key: str) -> bool:
        """Whether ``verify`` wants array ``key`` of ``shard`` checked now: on its first read only."""
        if not self.spec.verify or (shard, key) in self._verified:
            return False
        self._verified.add((shard, key))  # a failed check ends the stream
        return True
