"""The cache's training sequences, rebuilt from its rows: fine-tuning runs the LLM on them, so it needs no corpus.

A cache stores each training row's token and position (extract/capture.py ``row_metadata``) in (sequence,
position) order, but not the special positions packing left out: the EOS after each document and, when the
tokenizer adds one, the BOS before it (extract/packing.py). So a sequence starts where the position stops
growing, and the gap before a stored position holds the specials between two documents: counted from the
previous stored token, EOS, BOS, EOS, BOS... (an empty document is BOS EOS); before a sequence's first stored
token, counted back from it, BOS, EOS, BOS... With no BOS every gap is EOS. Positions after a sequence's last
stored one are masked out and cannot change the logits before them (a causal model).

The held-out split also stores its sequences whole: the rule is checked on them before it is trusted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from pipeline.cache.reader import ActivationCache
from pipeline.infra.errors import UserError


class Specials(NamedTuple):
    """The tokens packing puts between documents."""

    eos: int
    bos: int | None  # None: the tokenizer adds no BOS

    @classmethod
    def of(cls, tokenizer: Any) -> Specials:  # noqa: ANN401 - a Hugging Face tokenizer
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]
        return cls(int(tokenizer.eos_token_id), int(bos) if adds_bos else None)


class Sequences(NamedTuple):
    """Token sequences and the positions the cache stored (the real ones)."""

    tokens: np.ndarray  # (S, T) int64
    mask: np.ndarray  # (S, T) bool

    @property
    def real(self) -> np.ndarray:
        """Stored positions per sequence (S,)."""
        return self.mask.sum(1)


def rebuilt(token: np.ndarray, pos: np.ndarray, ctx_len: int, specials: Specials) -> Sequences:
    """Sequences (S, ctx_len) from rows in (sequence, position) order: ``token`` (n,), ``pos`` (n,)."""
    starts = np.r_[True, pos[1:] <= pos[:-1]] if len(pos) else np.zeros(0, dtype=bool)  # (n,)
    seq = np.cumsum(starts) - 1  # (n,) the sequence of each row
    tokens = np.full((int(starts.sum()), ctx_len), specials.eos, dtype=np.int64)  # (S, T)
    mask = np.zeros(tokens.shape, dtype=bool)
    tokens[seq, pos], mask[seq, pos] = token, True
    if specials.bos is not None and len(tokens):
        at = np.broadcast_to(np.arange(ctx_len), tokens.shape)  # (S, T)
        previous = np.maximum.accumulate(np.where(mask, at, -1), axis=1)  # (S, T) last stored position up to t
        first = mask.argmax(1)[:, None]  # (S, 1)
        since = np.where(previous >= 0, at - previous - 1, first - 1 - at)  # (S, T) steps into the gap
        bos_here = (since % 2 == 1) == (previous >= 0)  # odd steps after a token, even ones before the first
        tokens[~mask & bos_here] = specials.bos
    return Sequences(tokens, mask)


def _split(cache: ActivationCache, split: str, specials: Specials) -> list[Sequences]:
    """Every shard's sequences of ``split``, rebuilt from its rows."""
    ctx_len = int(cache.manifest["spec"]["ctx_len"])
    return [
        rebuilt(cache.read(r["index"], f"{split}/token"), cache.read(r["index"], f"{split}/pos"), ctx_len, specials)
        for r in cache.shards
        if r["rows"][split] > 0
    ]


def check_rule(cache: ActivationCache, specials: Specials) -> None:
    """Refuse a cache whose held-out sequences the rule does not rebuild, up to each one's last stored position."""
    for record, found in zip([r for r in cache.shards if r["rows"]["heldout"] > 0], _split(cache, "heldout", specials)):
        stored = cache.read(record["index"], "heldout/sequences").astype(np.int64)  # (h, T)
        upto = np.cumsum(found.mask[:, ::-1], 1)[:, ::-1] > 0  # (S, T) at or before the last stored position
        if found.tokens.shape != stored.shape or not np.array_equal(found.tokens[upto], stored[upto]):
            raise UserError(
                f"cache {cache.key}: its training sequences cannot be rebuilt from its rows (the held-out ones of "
                f"shard {record['index']} do not come back as stored: special tokens other than EOS/BOS?); "
                "fine-tuning needs them."
            )


def training_sequences(cache: ActivationCache, specials: Specials) -> Sequences:
    """All training sequences of ``cache``, rebuilt (checked on its held-out split first)."""
    check_rule(cache, specials)
    parts = _split(cache, "train", specials)
    if not parts:
        raise UserError(f"cache {cache.key} has no training rows to fine-tune on.")
    return Sequences(np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts]))
