"""The first-letter task of the absorption suite, built offline from the model's own vocabulary.

Words are the vocabulary's single tokens that are one ASCII word (a leading space allowed), as SAEBench's
``get_alpha_tokens`` takes them; up to ``--probe-words`` per first letter. Each word is read in an
in-context prompt of SAEBench's template (ten other words, each followed by its capital first letter,
then the word itself), built from token ids so that the word is exactly one token at a known position;
the activation there at each layer the SAE reads, normalized as it reads it, is the word's row. Every word
shares one
set of solved examples (SAEBench draws them per word), none of them a word of the task, so the examples
run through the blocks below the layer once and their keys and values serve every word: each word costs
its own few tokens, not the prompt's ~90. A logistic probe per letter (one against the rest) is fitted on
80 % of the words of one layer and scored (F1) on the rest.

RouteSAE (several layers, one routed input per word): the probes are fitted on the layer its router sends
most of the task's words to, the layer most of the SAE's codes come from (the middle routed layer would
fit a router that spreads the words evenly, which the uncentred router does not: 39-97 % of the rows on
one layer in benchmarks/RESULTS.md), and absorption reads the routed input the SAE encodes.

The LLM's forwards depend on the cache and the layers only, the probes also on their layer, so every SAE of
a sweep shares them (:func:`letter_task` keeps the last ones built).
"""

from __future__ import annotations

import copy
import inspect
import string
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.probes import Probe, f1, fit_probe
from pipeline.evaluate.probing import cache_tokenizer
from pipeline.live.subject import Subject, load_llm
from pipeline.llm.hooks import StopForward, capture
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.interface import SAE

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"  # SAEBench's prompt_template
ICL_EXAMPLES = 10  # solved examples before the word (SAEBench's max_icl_examples)
SEED = 42  # SAEBench's random_seed
TEST_SHARE = 0.2  # words held out to score the probes and find absorption on
WORD_BATCH = 256  # words per forward (each a few tokens after the shared examples)


class LetterTask(NamedTuple):
    """The words, their activations at the SAE's layer and the letter probes."""

    words: list[str]
    letter: Tensor  # (M,) int64 index into LETTERS
    x: Tensor  # (M, D) float64 activation at the word on the probes' layer, normalized as the SAE reads it
    test: Tensor  # (M,) bool: held-out words
    probes: list[Probe]  # one per letter, fitted on the other words
    probe_f1: list[float]  # each probe's F1 on the held-out words
    word_pos: int  # the word's position counted from the prompt's end (SAEBench's prompt_token_pos)
    inputs: Tensor  # (M, D) float64 what the SAE encodes at the word: x, or a RouteSAE's routed input
    layer: int  # the layer of x, where the probes were fitted


def alpha_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, text) of every vocabulary token that decodes to one ASCII word, a leading space allowed."""
    found = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        word = text[1:] if text.startswith(" ") else text
        if word.isascii() and word.isalpha():
            found.append((token, text))
    return found


def pick_words(vocab: list[tuple[int, str]], per_letter: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """At most ``per_letter`` words of ``vocab`` for each first letter, drawn with ``rng``."""
    by_letter: dict[str, list[tuple[int, str]]] = {}
    for token, text in vocab:
        by_letter.setdefault(text.strip()[0].lower(), []).append((token, text))
    chosen = []
    for letter in LETTERS:
        group = by_letter.get(letter, [])
        chosen += [group[i] for i in sorted(rng.permutation(len(group))[:per_letter])]
    return chosen


def prompt_parts(tokenizer: Any, examples: list[str]) -> tuple[list[int], list[int]]:
    """Token ids before and after the word: the solved ``examples``, then the template around the word."""
    before, after = TEMPLATE.split("{word}")
    shots = "".join(f"\n{before}{w}{after} {w.strip()[0].upper()}" for w in examples)
    prefix = tokenizer(shots + "\n" + before)["input_ids"]  # BOS first when the tokenizer adds one
    return prefix, tokenizer(after, add_special_tokens=False)["input_ids"]


def _to_layers(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, layers: list[int], cache: Any) -> Tensor:
    """The residual stream (B, T, L, D) entering each block of ``layers`` for ``ids`` after what ``cache``
    holds, which gains their keys and values (a transformers ``DynamicCache``); the blocks from the last
    layer up never run."""
    base = cast(nn.Module, model.base_model)
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # 5.x | 4.x
    with capture(blocks, layers) as captured:
        try:
            base(input_ids=ids, use_cache=True, **{name: cache})
        except StopForward:
            pass
    return torch.stack([captured["resid", layer] for layer in layers], dim=2)


@torch.no_grad()
def word_activations(
    model: nn.Module, blocks: nn.ModuleList, parts: tuple[list[int], list[int]], words: list[int], layers: list[int]
) -> Tensor:
    """The residual stream (M, L, D) at each of ``layers`` on each word of ``words``, read in ``prefix + [word] +
    suffix``: the prefix runs once, every word then attends to its cached keys and values (WORD_BATCH words a
    forward, all the same length, so no padding)."""
    from transformers import DynamicCache  # imported here: transformers takes seconds to import

    device = next(model.parameters()).device
    prefix, suffix = parts
    shared = DynamicCache()
    _to_layers(model, blocks, torch.tensor([prefix], device=device), layers, shared)
    rows = []
    for start in range(0, len(words), WORD_BATCH):
        chunk = words[start : start + WORD_BATCH]
        cache = copy.deepcopy(shared)
        cache.batch_repeat_interleave(len(chunk))
        ids = torch.tensor([[word, *suffix] for word in chunk], device=device)  # (b, 1 + S)
        rows.append(_to_layers(model, blocks, ids, layers, cache)[:, 0].float().cpu())  # (b, L, D) at the word
    return torch.cat(rows)


class WordRows(NamedTuple):
    """The words and their activations at every layer the SAE reads: the LLM's part of the task."""

    words: list[str]
    letter: Tensor  # (M,) int64 index into LETTERS
    xs: Tensor  # (M, L, D) float32, each layer normalized as the SAE reads it
    test: Tensor  # (M,) bool: held-out words
    word_pos: int


def word_rows(s: Subject, cfg: EvaluateConfig) -> WordRows | None:
    """The words at every layer run ``s`` reads (None when the vocabulary has too few words to also give the
    examples)."""
    tokenizer = cache_tokenizer(s)
    vocab = alpha_tokens(tokenizer)
    if len(vocab) <= ICL_EXAMPLES:
        return None
    rng = np.random.default_rng(SEED)
    chosen = pick_words(vocab, cfg.probe_words, rng)
    taken = {token for token, _ in chosen}
    spare = [text for token, text in vocab if token not in taken]  # examples are never words of the task
    if len(spare) < ICL_EXAMPLES:
        return None
    parts = prompt_parts(tokenizer, [spare[i] for i in rng.choice(len(spare), ICL_EXAMPLES, replace=False)])
    model, blocks = load_llm(s.cache, s.sae.device, cfg.compute_dtype)
    raw = word_activations(model, blocks, parts, [token for token, _ in chosen], s.layers)  # (M, L, D)
    xs = torch.stack([s.normalizer.normalize(raw[:, i], layer)[0] for i, layer in enumerate(s.layers)], dim=1)
    letter = torch.tensor([LETTERS.index(text.strip()[0].lower()) for _, text in chosen])  # (M,)
    test = torch.from_numpy(rng.random(len(chosen)) < TEST_SHARE)  # (M,)
    return WordRows([text for _, text in chosen], letter, xs.float(), test, -1 - len(parts[1]))


def fit_letter_probes(rows: WordRows, at: int) -> tuple[list[Probe], list[float]]:
    """One probe per letter on layer index ``at`` of the rows, fitted on the training words, and its held-out F1."""
    x = rows.xs[:, at].double()  # (M, D)
    probes, scores = [], []
    for i in range(len(LETTERS)):
        probe = fit_probe(x[~rows.test], rows.letter[~rows.test] == i)
        probes.append(probe)
        scores.append(f1(probe.score(x[rows.test]) > 0, rows.letter[rows.test] == i))
    return probes, scores


@torch.no_grad()
def probe_layer(sae: SAE, xs: Tensor) -> tuple[int, Tensor]:
    """The index of the layer the letter probes read, and each word's SAE input (M, D), from the words' rows
    xs (M, L, D): a single-layer SAE's one layer; a RouteSAE's routed input and the layer its router sends
    most of the words to (hard routing; soft: the largest mean weight). The probe has to live in one layer,
    and that one is where the SAE's code of most words comes from (docs/EVALUATE.md)."""
    if not isinstance(sae, RouteSAE):
        return 0, xs[:, 0]
    weights, routed, choice = sae.route(xs.to(sae.device))  # (M, L), (M, D), (M,) or None
    if choice is not None:
        counts = torch.bincount(choice.cpu(), minlength=xs.shape[1])  # (L,)
    else:
        counts = weights.mean(0).cpu()  # (L,)
    return int(counts.argmax()), routed.float().cpu()


_ROWS: dict[tuple[Any, ...], WordRows | None] = {}  # the last words read, for the next SAE of the same sweep
_PROBES: dict[int, tuple[list[Probe], list[float]]] = {}  # their probes, per layer


def letter_task(s: Subject, cfg: EvaluateConfig) -> LetterTask | None:
    """The first-letter task for run ``s``; the LLM's forwards once per cache, layers and settings, the probes
    once per probe layer."""
    key = (s.cache.key, tuple(s.layers), cfg.probe_words, cfg.compute_dtype, str(s.sae.device))
    if key not in _ROWS:
        _ROWS.clear()
        _PROBES.clear()
        _ROWS[key] = word_rows(s, cfg)
    rows = _ROWS[key]
    if rows is None:
        return None
    at, inputs = probe_layer(s.sae, rows.xs)
    if at not in _PROBES:
        _PROBES[at] = fit_letter_probes(rows, at)
    probes, scores = _PROBES[at]
    x = rows.xs[:, at].double()  # (M, D)
    return LetterTask(
        rows.words, rows.letter, x, rows.test, probes, scores, rows.word_pos, inputs.double(), s.layers[at]
    )
