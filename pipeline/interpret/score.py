"""Scoring explanations on held-out examples: detection and fuzzing (the delphi scorers, on a clean split).

A scorer model gets a feature's explanation and a batch of test excerpts (activating and non-activating,
shuffled with the seed) and answers one 0/1 per excerpt:

- detection: is the feature active somewhere in the excerpt?
- fuzzing: tokens are marked << >>; on an activating excerpt, its own token and every token at or above
  ``fuzz_threshold`` x the feature's max activation; on a non-activating one as many random tokens as on
  the activating excerpt it is paired with. Is the marking where the feature is active?

Where the server returns log-probabilities, each verdict also gets P(1) (for the AUC). With ``control``
every feature is also scored with the explanation of another feature: the chance baseline of the scorer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.infra.chat import ChatClient, Messages

SCORERS = ("detection", "fuzzing")

SYSTEM = (
    "You check explanations of features of a sparse autoencoder trained on a language model's hidden states. "
    "Reply with one JSON list and nothing else."
)
QUESTION = {
    "detection": "For each excerpt, decide whether the feature is active anywhere in it, judging by the "
    "explanation alone: 1 if it is, 0 if it is not.",
    "fuzzing": "In each excerpt some tokens are marked with << >>. Decide whether the marked tokens are where "
    "the feature, as explained, is active: 1 if the marking is right, 0 if it is wrong.",
}
PROMPT = """A feature of the autoencoder has this explanation:
Explanation: {explanation}

{question}

{excerpts}

Reply with a JSON list of {n} numbers (0 or 1), one per excerpt, in order; for three excerpts: [1, 0, 1]"""


@dataclass
class ScoreSettings:
    """How prompts are built (params: score_batch, fuzz_threshold, control, seed)."""

    batch: int = 5  # excerpts per prompt
    fuzz_threshold: float = 0.3  # mark tokens at or above this fraction of the feature's max activation
    control: bool = False  # also score each feature with another feature's explanation
    seed: int = 0  # excerpt order and random marks


class Batch(NamedTuple):
    """One scorer prompt: the excerpts of one latent judged against one explanation."""

    scorer: str
    latent: int
    explained_by: int  # the latent whose explanation was used (another one for the control)
    items: list[dict[str, Any]]  # test examples (rows of examples.parquet) plus "label" and "marked"
    messages: Messages


def build_batches(
    scorer: str,
    explanations: dict[int, str],
    tests: dict[int, list[dict[str, Any]]],
    max_acts: dict[int, float],
    settings: ScoreSettings,
) -> list[Batch]:
    """Every prompt of ``scorer`` for the explained latents (and, with control, the shuffled explanations)."""
    latents = sorted(latent for latent in explanations if tests.get(latent))
    pairs = [(latent, latent) for latent in latents]
    if settings.control and len(latents) > 1:  # shift by one: no latent keeps its own explanation
        pairs += [(latent, latents[(i + 1) % len(latents)]) for i, latent in enumerate(latents)]
    batches = []
    for latent, source in pairs:
        rng = np.random.default_rng([settings.seed, latent, SCORERS.index(scorer), int(source != latent)])
        items = _labelled(scorer, tests[latent], max_acts.get(latent, 0.0), settings.fuzz_threshold, rng)
        order = rng.permutation(len(items))
        for start in range(0, len(items), settings.batch):
            chunk = [items[i] for i in order[start : start + settings.batch]]
            messages = _messages(scorer, explanations[source], [_excerpt(scorer, item) for item in chunk])
            batches.append(Batch(scorer, latent, source, chunk, messages))
    return batches


def _labelled(
    scorer: str, examples: list[dict[str, Any]], max_act: float, fraction: float, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """The examples with their label (1 = activating) and, for fuzzing, the token indices to mark."""
    active = [e for e in examples if e["activation"] > 0]
    silent = [e for e in examples if e["activation"] <= 0]
    items = [{**e, "label": 1, "marked": []} for e in active] + [{**e, "label": 0, "marked": []} for e in silent]
    if scorer != "fuzzing":
        return items
    for item in items[: len(active)]:
        values = np.asarray(item["window_acts"])
        item["marked"] = sorted({int(item["center"]), *np.flatnonzero(values >= fraction * max_act).tolist()})
    for j, item in enumerate(items[len(active) :]):
        count = len(items[j % len(active)]["marked"]) if active else 1
        size = len(item["window_tokens"])
        item["marked"] = sorted(rng.choice(size, min(count, size), replace=False).tolist())
    return items


def _excerpt(scorer: str, item: dict[str, Any]) -> str:
    if scorer == "detection":
        return _flat(item["prefix"] + item["token"] + item["suffix"])
    marked, pieces = set(item["marked"]), []
    for i, token in enumerate(item["window_tokens"]):
        opens, closes = i in marked and i - 1 not in marked, i in marked and i + 1 not in marked
        pieces.append(("<<" if opens else "") + token.replace("<<", "<").replace(">>", ">") + (">>" if closes else ""))
    return _flat("".join(pieces))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _messages(scorer: str, explanation: str, excerpts: list[str]) -> Messages:
    lines = "\n".join(f"Excerpt {i}: {text}" for i, text in enumerate(excerpts, 1))
    prompt = PROMPT.format(explanation=_flat(explanation), question=QUESTION[scorer], excerpts=lines, n=len(excerpts))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def parse_verdicts(text: str, n: int) -> list[int] | None:
    """The n 0/1 verdicts of an answer: its one JSON list of n numbers 0 or 1; None otherwise (no list,
    another length, other values, or several lists: which one would be the answer?)."""
    lists = re.findall(r"\[[^\[\]]*\]", text)
    if len(lists) != 1:
        return None
    try:
        values = json.loads(lists[0])
    except ValueError:
        return None
    if len(values) != n or any(isinstance(v, bool) or v not in (0, 1) for v in values):
        return None
    return [int(v) for v in values]


def usable(batches: list[Batch]) -> Callable[[int, str], bool]:
    """Whether the answer to prompt i parses (the chat client caches only those)."""
    return lambda i, text: parse_verdicts(text, len(batches[i].items)) is not None


def probabilities(logprobs: list[dict[str, Any]] | None, n: int) -> list[float] | None:
    """P(1) of each of the n verdict tokens, from their top alternatives; None without log-probabilities."""
    if not logprobs:
        return None
    digits = [t for t in logprobs if t["token"].strip(" [],") in ("0", "1")]
    if len(digits) != n:
        return None
    out = []
    for token in digits:
        mass = {"0": 0.0, "1": 0.0}
        for alternative, logprob in (token["top"] or {token["token"]: 0.0}).items():
            if alternative.strip(" [],") in mass:
                mass[alternative.strip(" [],")] += float(np.exp(logprob))
        total = mass["0"] + mass["1"]
        out.append(mass["1"] / total if total > 0 else float(token["token"].strip(" [],") == "1"))
    return out


def run_scorer(client: ChatClient, batches: list[Batch], on_done: Any = None) -> list[dict[str, Any]]:
    """One verdict record per judged example (every row of scores.parquet). status: ok | malformed | failed |
    not sent; cached: the answer came from the answer cache (a malformed one never does: it is asked again)."""
    replies = client.ask_all([b.messages for b in batches], on_done, usable(batches))
    records = []
    for number, (batch, reply) in enumerate(zip(batches, replies)):
        answered = reply["status"] in ("ok", "cached")
        verdicts = parse_verdicts(reply["text"], len(batch.items)) if answered else None
        probs = probabilities(reply.get("logprobs"), len(batch.items)) if verdicts else None
        status = reply["status"] if not answered else "ok" if verdicts else "malformed"
        for i, item in enumerate(batch.items):
            records.append(
                {
                    "scorer": batch.scorer,
                    "latent": batch.latent,
                    "explained_by": batch.explained_by,
                    "control": batch.explained_by != batch.latent,
                    "batch": number,
                    "row": item["row"],
                    "sequence": item["sequence"],
                    "kind": item["kind"],
                    "label": item["label"],
                    "marked": item["marked"],
                    "verdict": verdicts[i] if verdicts else None,
                    "prob": probs[i] if probs else None,
                    "status": status,
                    "cached": bool(reply["cached"]),
                    "answer": reply.get("text") if i == 0 else None,  # the prompt's answer, on its first row
                    "prompt_tokens": reply.get("prompt_tokens", 0) if i == 0 else 0,
                    "completion_tokens": reply.get("completion_tokens", 0) if i == 0 else 0,
                }
            )
    return records
