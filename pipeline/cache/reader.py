"""The reader every later stage uses: a complete cache's manifest facts, its shards' arrays, its
held-out rows and sequences, and checksum verification. Writing lives in :mod:`pipeline.cache.writer`
over :mod:`pipeline.cache.backends`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from pipeline.cache import compact
from pipeline.cache.backends import STORE_DTYPES, array_sha256, get_backend
from pipeline.cache.manifest import read_manifest, shard_name, site_arrays
from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import CorruptError, UserError
from pipeline.infra.files import Folder


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
        self._dtype_checked: set[tuple[int, str]] = set()
        self._checksums: dict[int, dict[str, str]] | None = None  # shard -> checksum key -> sha256, for check()

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
    def sites(self) -> list[str]:
        """What is stored per layer (pipeline.llm.sites): resid, plus mlp_in / mlp_out where extracted."""
        return list(self.manifest["spec"].get("sites", ["resid"]))

    def site_normalizer(self, site: str = "resid") -> Normalizer:
        """How a site's rows were normalized (the MLP sites: one `scale` factor per layer, see extract)."""
        if site not in self.sites:
            raise UserError(f"cache {self.key} holds {', '.join(self.sites)}, not {site}; extract it with --sites.")
        data = self.manifest["normalization"] if site == "resid" else self.manifest["site_normalization"][site]
        return Normalizer.from_dict(data)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    @property
    def dtype(self) -> str:
        """The stored dtype the manifest names: float16, float32 or int8 (codes and per-token scales)."""
        return str(self.manifest["spec"]["dtype"])

    @property
    def compact(self) -> bool:
        return self.dtype == compact.COMPACT

    def rows(self, split: str) -> int:
        return int(self.manifest["rows"][split])

    def layer_index(self, layer: int) -> int:
        """Position of a model layer in the cache's layer axis."""
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in cache {self.key}; it holds layers {self.layers}.")
        return self.layers.index(layer)

    def read(self, shard: int, name: str, first: Any = slice(None)) -> np.ndarray:
        """Array ``name`` (e.g. ``train/act``) of one shard; ``first`` indexes its first axis."""
        self._check_dtype(shard, name)
        return self.backend.read(self.folder.child("shards", shard_name(shard)), name, first)

    def read_into(self, shard: int, name: str, first: Any, out: np.ndarray) -> None:
        """Like :meth:`read`, into a preallocated array of the right shape and dtype."""
        self._check_dtype(shard, name)
        self.backend.read_into(self.folder.child("shards", shard_name(shard)), name, first, out)

    def layer_rows(self, shard: int, split: str, position: int, site: str = "resid") -> np.ndarray:
        """One layer's rows (n, D) of a shard's split at ``site`` as float32, decoded when the cache is int8."""
        act, scale = site_arrays(site)
        codes = self.read(shard, f"{split}/{act}", position)  # (n, D)
        if self.compact:
            return compact.dequantize(codes, self.read(shard, f"{split}/{scale}", position))
        return codes.astype(np.float32)

    def _check_dtype(self, shard: int, name: str) -> None:
        """Refuse activations stored in another dtype than the manifest says (raw reads would misread them)."""
        if name.split("/")[-1] not in [site_arrays(s)[0] for s in self.sites] or (shard, name) in self._dtype_checked:
            return
        stored = self.backend.dtype(self.folder.child("shards", shard_name(shard)), name)
        if stored != np.dtype(STORE_DTYPES[self.dtype]):
            raise CorruptError(
                f"shard {shard_name(shard)} of cache {self.folder.url} stores {name} as {stored}, but its manifest "
                f"says {self.dtype}: the folder mixes caches. Run `sae-pipe cache repair {self.folder.url}` to drop "
                "that shard, then re-run the extract command."
            )
        self._dtype_checked.add((shard, name))

    def heldout_rows(self, layers: list[int], max_rows: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Held-out rows shard by shard as float32 (shard, (n, L, D)) for ``layers``, at most ``max_rows`` (0 = all)."""
        return self.split_rows("heldout", layers, max_rows)

    def split_rows(
        self, split: str, layers: list[int], max_rows: int = 0, site: str = "resid"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Rows of ``split`` (train | heldout) at ``site``, shard by shard, in stored order, as
        :meth:`heldout_rows` gives them."""
        left = max_rows or self.rows(split)
        positions = [self.layer_index(layer) for layer in layers]
        if site not in self.sites:
            raise UserError(f"cache {self.key} holds {', '.join(self.sites)}, not {site}; extract it with --sites.")
        for record in self.shards:
            n = min(record["rows"][split], left)
            if n <= 0:
                continue
            rows = [self.layer_rows(record["index"], split, p, site)[:n] for p in positions]  # L x (n, D)
            yield record["index"], np.stack(rows, 1)  # (n, L, D)
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
                    data = self.read(record["index"], name, index)
                except CorruptError:
                    raise  # a shard in another dtype: one clear error about the folder, not a list of checksums
                except Exception as err:  # noqa: BLE001 - any other read failure is a finding, not a crash
                    problems.append(
                        Problem(record["index"], key, f"unreadable ({type(err).__name__}: {str(err)[:120]})")
                    )
                    continue
                if array_sha256(data) != expected:
                    problems.append(Problem(record["index"], key, "checksum mismatch"))
        return problems

    def check(self, shard: int, key: str, data: np.ndarray) -> None:
        """Raise :class:`CorruptError` unless ``data``, the array behind checksum ``key`` of ``shard`` as it was
        read, matches the manifest's checksum (the stream checks what it serves this way, as it reads it); an
        array the manifest records no checksum for passes, as in :meth:`verify`."""
        if self._checksums is None:
            self._checksums = {int(r["index"]): r["checksums"] for r in self.shards}
        expected = self._checksums[shard].get(key)
        if expected is not None and array_sha256(data) != expected:
            raise self._corrupt([Problem(shard, key, "checksum mismatch")])

    def require_valid(self, only: list[str] | None = None) -> None:
        """Raise :class:`CorruptError` naming every bad array, deleting nothing."""
        problems = self.verify(only)
        if problems:
            raise self._corrupt(problems)

    def _corrupt(self, problems: list[Problem]) -> CorruptError:
        return CorruptError(
            f"cache {self.folder.url} fails its checksums:\n  "
            + "\n  ".join(map(str, problems))
            + f"\nNothing was deleted. `sae-pipe cache repair {self.folder.url}` drops the bad "
            "shards; re-running the same extract command then rewrites just those."
        )
