"""GPT-style packing: documents joined with EOS and cut into fixed-length rows, then into shards.

Everything here is decided from tokens alone (no model), so the plan of which positions are
stored, which sequences are held out and where the token budget ends is known before any
forward pass, identical across runs, resumes and ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.infra.errors import UserError

TOKENIZE_BATCH = 64  # documents per tokenizer call (the fast tokenizer parallelizes within a call)


@dataclass(frozen=True)
class PackSpec:
    """How the token stream becomes stored rows."""

    ctx_len: int  # tokens per packed row (sequence)
    heldout: float  # share of sequences kept out of training (evaluate/interpret read them)
    seqs_per_shard: int  # sequences per shard
    max_rows: int  # stored rows in total; 0 means the whole corpus


@dataclass
class ShardPlan:
    """The sequences of one shard and which of their positions get stored."""

    index: int  # shard number
    first_seq: int  # global index of the shard's first sequence
    tokens: np.ndarray  # (P, T) int32 token ids
    docs: np.ndarray  # (P, T) int32 document ids
    keep: np.ndarray  # (P, T) bool: stored positions (not special, inside the budget)
    heldout: np.ndarray  # (P,) bool: held-out sequences
    skipped: int  # special-token positions (EOS, BOS...) left out of the store

    def rows(self, heldout: bool) -> int:
        """Stored rows of the held-out (True) or training (False) split."""
        mask = self.heldout if heldout else ~self.heldout
        return int(self.keep[mask].sum())


def token_stream(documents: Iterable[str], tokenizer) -> Iterator[np.ndarray]:  # noqa: ANN001 - HF tokenizer
    """Each document's token ids followed by EOS (BOS too when the tokenizer adds one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which packing needs between documents.")
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH:
            yield from _encode(tokenizer, batch, eos)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch, eos)


def _encode(tokenizer, texts: list[str], eos: int) -> Iterator[np.ndarray]:  # noqa: ANN001
    # split_special_tokens: a literal "<|endoftext|>" inside a web page is text, not a separator.
    encoded = tokenizer(texts, add_special_tokens=True, split_special_tokens=True, verbose=False)
    for ids in encoded["input_ids"]:
        yield np.asarray([*ids, eos], dtype=np.int32)


def pack(docs: Iterable[np.ndarray], ctx_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of ``ctx_len`` tokens with the document id of each position; the tail is dropped."""
    buf_tok: list[np.ndarray] = []
    buf_doc: list[np.ndarray] = []
    filled = 0
    for doc_id, ids in enumerate(docs):
        buf_tok.append(ids)
        buf_doc.append(np.full(len(ids), doc_id, dtype=np.int32))
        filled += len(ids)
        if filled < ctx_len:
            continue
        tokens, doc_ids = np.concatenate(buf_tok), np.concatenate(buf_doc)
        n_rows = len(tokens) // ctx_len
        for r in range(n_rows):
            yield tokens[r * ctx_len : (r + 1) * ctx_len], doc_ids[r * ctx_len : (r + 1) * ctx_len]
        cut = n_rows * ctx_len
        buf_tok, buf_doc, filled = [tokens[cut:]], [doc_ids[cut:]], len(tokens) - cut


def is_heldout(seq_index: int, share: float) -> bool:
    """Spread held-out sequences evenly, starting with the first: with share 0.05, sequences 0, 20, 40...

    Sequence i is held out when floor((i + o + 1) s) > floor((i + o) s), o = ceil(1/s) - 1, so even a
    cache of one sequence has a held-out split.
    """
    if share <= 0:
        return False
    offset = math.ceil(1 / share) - 1
    return int((seq_index + offset + 1) * share) > int((seq_index + offset) * share)


def plan_shards(
    sequences: Iterable[tuple[np.ndarray, np.ndarray]], special_ids: list[int], spec: PackSpec
) -> Iterator[ShardPlan]:
    """Group sequences into shards, marking stored positions; stop exactly at the row budget."""
    special = np.asarray(sorted(special_ids), dtype=np.int32)
    rows_left = spec.max_rows if spec.max_rows > 0 else None
    group: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    shard = first_seq = 0
    for seq_index, (tokens, doc_ids) in enumerate(sequences):
        keep = ~np.isin(tokens, special)
        if rows_left is not None:
            over = np.flatnonzero(np.cumsum(keep) > rows_left)
            keep[over] = False  # the budget ends inside this sequence
            rows_left -= int(keep.sum())
        group.append((tokens, doc_ids, keep))
        done = rows_left == 0
        if len(group) == spec.seqs_per_shard or done:
            yield _shard(shard, first_seq, group, spec.heldout, special)
            shard, first_seq, group = shard + 1, seq_index + 1, []
        if done:
            return
    if group:
        yield _shard(shard, first_seq, group, spec.heldout, special)


def _shard(
    index: int,
    first_seq: int,
    group: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    share: float,
    special: np.ndarray,
) -> ShardPlan:
    held = np.array([is_heldout(first_seq + i, share) for i in range(len(group))], dtype=bool)
    tokens = np.stack([g[0] for g in group])
    return ShardPlan(
        index,
        first_seq,
        tokens,
        np.stack([g[1] for g in group]),
        np.stack([g[2] for g in group]),
        held,
        int(np.isin(tokens, special).sum()),
    )
