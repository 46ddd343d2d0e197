"""Contrastive tasks: pairs of prompts whose next tokens differ, built offline or read from JSONL.

A pair is one JSON object per line: ``clean_prefix``, ``patch_prefix``, ``clean_answer``,
``patch_answer``. The metric is logit(clean_answer) - logit(patch_answer) after the clean prefix.
Answers must be one token of the loaded tokenizer, and the two prefixes the same number of tokens
(the patch prompts' mean latents stand in for ablated ones; equal lengths keep the pairs batchable).

Built-in generators (deterministic for a seed), each filtered to what is one token for the tokenizer:
  sva   subject-verb agreement: "The author near the pilots" -> " is" / " are"
  ioi   indirect object: "When Mary and John went to the store, John gave a book to" -> " Mary" / " John"
  code  Python output: ">>> d = {'a': 3}\n>>> d['a']\n" -> "3", with d['c'] -> "Traceback"; lists alike
        (the answer is the output's first token: "Trace" where the tokenizer splits "Traceback")
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.infra.errors import UserError

FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
TASKS = ("sva", "ioi", "code")

NOUNS = [
    ("author", "authors"), ("pilot", "pilots"), ("doctor", "doctors"), ("teacher", "teachers"),
    ("farmer", "farmers"), ("student", "students"), ("dog", "dogs"), ("friend", "friends"),
    ("manager", "managers"), ("writer", "writers"), ("player", "players"), ("officer", "officers"),
    ("driver", "drivers"), ("worker", "workers"), ("girl", "girls"), ("boy", "boys"),
    ("king", "kings"), ("bird", "birds"), ("nurse", "nurses"), ("lawyer", "lawyers"),
]  # fmt: skip
VERBS = [(" is", " are"), (" was", " were"), (" has", " have")]
SVA_TEMPLATES = ["The {s}", "The {s} near the {d}", "The {s} behind the {d}", "The {s} of the {d}"]
NAMES = [
    "Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Kate", "Mike", "Lisa", "Mark",
    "Emma", "Peter", "Laura", "Jack", "Alice", "Robert", "Susan", "Daniel",
]  # fmt: skip
IOI_TEMPLATES = [
    "When {a} and {b} went to the {place}, {s} gave a {thing} to",
    "After {a} and {b} arrived at the {place}, {s} handed a {thing} to",
    "Then, {a} and {b} had fun at the {place}. {s} gave a {thing} to",
]
PLACES = ["store", "park", "school", "beach", "office", "garden"]
THINGS = ["book", "drink", "ball", "gift", "letter", "key"]
KEYS = "abcdefgh"
TRACEBACK = "Traceback"


class Pair(NamedTuple):
    """One contrastive pair as token ids."""

    clean: list[int]  # clean prefix
    patch: list[int]  # patch prefix, as long as the clean one
    clean_answer: int  # the token the clean prefix should be followed by
    patch_answer: int  # the token the patch prefix should be followed by


Texts = dict[str, str]  # the four FIELDS of one pair


def sva_texts(rng: random.Random) -> Texts:
    singular, plural = rng.choice(NOUNS)
    other = rng.choice(NOUNS)[rng.randrange(2)]
    verb = rng.choice(VERBS)
    template = rng.choice(SVA_TEMPLATES)
    one, many = template.format(s=singular, d=other), template.format(s=plural, d=other)
    if rng.random() < 0.5:
        return {"clean_prefix": one, "patch_prefix": many, "clean_answer": verb[0], "patch_answer": verb[1]}
    return {"clean_prefix": many, "patch_prefix": one, "clean_answer": verb[1], "patch_answer": verb[0]}


def ioi_texts(rng: random.Random) -> Texts:
    a, b = rng.sample(NAMES, 2)
    template, place, thing = rng.choice(IOI_TEMPLATES), rng.choice(PLACES), rng.choice(THINGS)
    clean = template.format(a=a, b=b, s=b, place=place, thing=thing)
    patch = template.format(a=a, b=b, s=a, place=place, thing=thing)
    return {"clean_prefix": clean, "patch_prefix": patch, "clean_answer": f" {a}", "patch_answer": f" {b}"}


def python_output(container: dict[str, int] | list[int], key: str | int) -> str:
    """What the REPL prints first for ``container[key]``: the value, or the start of a traceback."""
    try:
        return str(container[key])  # type: ignore[index]
    except (KeyError, IndexError):
        return TRACEBACK


def code_texts(rng: random.Random) -> Texts:
    if rng.random() < 0.5:
        keys = rng.sample(KEYS, 3)
        present, missing = keys[rng.randrange(2)], keys[2]
        container: dict[str, int] | list[int] = {k: rng.randrange(10) for k in keys[:2]}
        setup, lookups = f">>> d = {container}\n", [f">>> d['{present}']\n", f">>> d['{missing}']\n"]
        keys_used: list[str | int] = [present, missing]
    else:
        container = [rng.randrange(10) for _ in range(3)]
        index, beyond = rng.randrange(3), rng.randrange(3, 10)
        setup, lookups = f">>> x = {container}\n", [f">>> x[{index}]\n", f">>> x[{beyond}]\n"]
        keys_used = [index, beyond]
    answers = [python_output(container, key) for key in keys_used]
    first = rng.randrange(2)  # which of the two lookups is the clean prompt
    return {
        "clean_prefix": setup + lookups[first],
        "patch_prefix": setup + lookups[1 - first],
        "clean_answer": answers[first],
        "patch_answer": answers[1 - first],
    }


GENERATORS: dict[str, Callable[[random.Random], Texts]] = {"sva": sva_texts, "ioi": ioi_texts, "code": code_texts}


def encode(tokenizer: Any, texts: Texts) -> Pair | str:
    """The pair as token ids, or why it cannot be one (a multi-token answer, prefixes of different lengths)."""
    empty = [f for f in ("clean_prefix", "patch_prefix") if not texts[f].strip()]
    if empty:
        return f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty; give both prefixes some text"
    answers = []
    for field in ("clean_answer", "patch_answer"):
        ids = tokenizer(texts[field], add_special_tokens=False).input_ids
        if len(ids) != 1:
            return f"{field} {texts[field]!r} is {len(ids)} tokens, not one"
        answers.append(int(ids[0]))
    clean, patch = (list(tokenizer(texts[f]).input_ids) for f in ("clean_prefix", "patch_prefix"))
    if len(clean) != len(patch):
        return f"clean_prefix is {len(clean)} tokens but patch_prefix {len(patch)}; they must be equally long"
    if answers[0] == answers[1]:
        return "clean_answer and patch_answer are the same token"
    return Pair(clean, patch, answers[0], answers[1])


def first_token(tokenizer: Any, text: str) -> str:
    """The text of the first token ``text`` is split into (what the model predicts first)."""
    return str(tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:1]))


def generate(task: str, tokenizer: Any, n_pairs: int, seed: int) -> list[Pair]:
    """``n_pairs`` distinct pairs of a built-in task that the tokenizer can take (one-token answers)."""
    rng, pairs, seen = random.Random(seed), [], set()
    for _ in range(n_pairs * 50):  # generators repeat themselves on small vocabularies: bounded tries
        texts = {k: first_token(tokenizer, v) if v == TRACEBACK else v for k, v in GENERATORS[task](rng).items()}
        key = texts["clean_prefix"] + texts["patch_prefix"]
        if key in seen:
            continue
        seen.add(key)
        pair = encode(tokenizer, texts)
        if isinstance(pair, Pair):
            pairs.append(pair)
            if len(pairs) == n_pairs:
                break
    if len(pairs) < 4:
        raise UserError(
            f"task {task!r} yields only {len(pairs)} pair(s) whose answers are one token of this model's "
            "tokenizer; give your own pairs as a JSONL file (--task FILE.jsonl)."
        )
    return pairs


def read_jsonl(path: Path, tokenizer: Any) -> list[Pair]:
    """The pairs of a user file; the first bad line is one clear error."""
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; give sva, ioi, code or a JSONL file of pairs.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"task file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSONL, one pair per line."
        ) from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where} is not a JSON object; each line holds {', '.join(FIELDS)}.") from None
        missing = [f for f in FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if missing:
            raise UserError(
                f"{where} lacks the text field(s) {', '.join(missing)}; each line holds {', '.join(FIELDS)}."
            )
        pair = encode(tokenizer, record)
        if not isinstance(pair, Pair):
            raise UserError(f"{where}: {pair}.")
        pairs.append(pair)
    if len(pairs) < 3:
        raise UserError(
            f"task file {path} holds {len(pairs)} pair(s); the train, validation and test splits need at least 3."
        )
    return pairs


def load_task(task: str, tokenizer: Any, n_pairs: int, seed: int) -> list[Pair]:
    """A built-in task's pairs, or a JSONL file's."""
    if task in GENERATORS:
        return generate(task, tokenizer, n_pairs, seed)
    if not task.endswith(".jsonl"):
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or a .jsonl file of pairs.")
    return read_jsonl(Path(task), tokenizer)


def split(pairs: list[Pair], val_share: float, test_share: float, seed: int) -> tuple[list[Pair], ...]:
    """(train, validation, test), shuffled by ``seed``; each part keeps at least one pair (3 pairs or more,
    shares positive and below 1 together)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(len(pairs) * test_share)), len(pairs) - 2)
    n_val = min(max(1, round(len(pairs) * val_share)), len(pairs) - n_test - 1)
    parts = order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
    return tuple([pairs[i] for i in part] for part in parts)
