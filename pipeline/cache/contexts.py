"""Held-out rows with their provenance, and the text around any of them.

Row ``r`` of the held-out split (in shard order) has a token, a document, a position and the
packed sequence it came from; its context window is cut from that sequence and never crosses into
another document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.reader import ActivationCache


@dataclass
class HeldoutIndex:
    """Provenance of the first ``len(token)`` held-out rows, as flat arrays."""

    shard: np.ndarray  # (R,) shard of each row
    token: np.ndarray  # (R,) token id
    doc: np.ndarray  # (R,) document id
    pos: np.ndarray  # (R,) position in its packed sequence
    seq: np.ndarray  # (R,) row of its shard's heldout/sequences
    sequence: np.ndarray  # (R,) global index of its packed sequence (the same in every shard's numbering)
    sequences: dict[int, np.ndarray]  # shard -> (h, T) token ids of its held-out sequences
    sequence_docs: dict[int, np.ndarray]  # shard -> (h, T) document ids
    row_at: dict[int, np.ndarray]  # shard -> (h, T) the loaded row at each position, -1 where none

    @classmethod
    def load(cls, cache: ActivationCache, max_rows: int = 0) -> HeldoutIndex:
        left = max_rows or cache.rows("heldout")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "token", "doc", "pos", "seq", "sequence")}
        sequences, sequence_docs, row_at = {}, {}, {}
        base = 0
        for record in cache.shards:
            n = min(record["rows"]["heldout"], left)
            if n <= 0:
                continue
            index = record["index"]
            parts["shard"].append(np.full(n, index, dtype=np.int32))
            for column in ("token", "doc", "pos", "seq"):
                parts[column].append(cache.read(index, f"heldout/{column}")[:n].astype(np.int64))
            sequences[index] = cache.read(index, "heldout/sequences")
            sequence_docs[index] = cache.read(index, "heldout/sequence_docs")
            parts["sequence"].append(cache.read(index, "heldout/sequence_index").astype(np.int64)[parts["seq"][-1]])
            row_at[index] = np.full(sequences[index].shape, -1, dtype=np.int64)
            row_at[index][parts["seq"][-1], parts["pos"][-1]] = np.arange(base, base + n)
            base += n
            left -= n
        flat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in parts.items()}
        return cls(**flat, sequences=sequences, sequence_docs=sequence_docs, row_at=row_at)

    def __len__(self) -> int:
        return len(self.token)

    def window(self, row: int, before: int, after: int) -> tuple[list[int], int]:
        """Token ids around ``row`` within its document, and the index of the row's own token in them."""
        shard, seq, start, stop = self._span(row, before, after)
        return self.sequences[shard][seq][start:stop].tolist(), int(self.pos[row]) - start

    def window_rows(self, row: int, before: int, after: int) -> np.ndarray:
        """The rows of the tokens of ``window(row, before, after)``, -1 for a token with no loaded row
        (a special token, or one past the rows loaded)."""
        shard, seq, start, stop = self._span(row, before, after)
        return self.row_at[shard][seq, start:stop]

    def _span(self, row: int, before: int, after: int) -> tuple[int, int, int, int]:
        """(shard, sequence row, start, stop) of the window around ``row``, cut at its document's edges."""
        shard, seq, pos = int(self.shard[row]), int(self.seq[row]), int(self.pos[row])
        tokens, docs = self.sequences[shard][seq], self.sequence_docs[shard][seq]
        start, stop = max(0, pos - before), min(len(tokens), pos + after + 1)
        same = np.flatnonzero(docs[start:stop] == docs[pos]) + start  # stay inside the row's document
        return shard, seq, int(same.min()), int(same.max()) + 1


def decode_windows(tokenizer, windows: list[tuple[list[int], int]]) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """(prefix, token, suffix) text of each window, decoded in three batched calls."""
    prefix = tokenizer.batch_decode([ids[:at] for ids, at in windows], skip_special_tokens=True)
    token = tokenizer.batch_decode([ids[at : at + 1] for ids, at in windows], skip_special_tokens=False)
    suffix = tokenizer.batch_decode([ids[at + 1 :] for ids, at in windows], skip_special_tokens=True)
    return list(zip(prefix, token, suffix))
