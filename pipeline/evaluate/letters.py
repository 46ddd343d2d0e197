"""The first-letter task of the absorption suite, built offline from the model's own vocabulary.

Words are the vocabulary's single tokens that are one ASCII word (a leading space allowed), as SAEBench's
``get_alpha_tokens`` takes them; up to ``--probe-words`` per first letter. Each word is read in an
in-context prompt of SAEBench's template (ten other words, each followed by its capital first letter,
then the word itself), built from token ids so that the word is exactly one token at a known position;
the layer's activation there, normalized as the SAE reads it, is the word's row. Every word shares one
set of solved examples (SAEBench draws them per word), none of them a word of the task, so the examples
run through the blocks below the layer once and their keys and values serve every word: each word costs
its own few tokens, not the prompt's ~90. A logistic probe per
letter (one against the rest) is fitted on 80 % of the words and scored (F1) on the rest.

The LLM's forwards and the probes depend on the cache and the layer only, so every SAE of a sweep shares
them (:func:`letter_task` keeps the last one built).
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
from pipeline.live.subject import Subject, load_cache_tokenizer, load_llm
from pipeline.llm.hooks import StopForward, capture

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
    x: Tensor  # (M, D) float64 activation at the word, in the SAE's input space
    test: Tensor  # (M,) bool: held-out words
    probes: list[Probe]  # one per letter, fitted on the other words
    probe_f1: list[float]  # each probe's F1 on the held-out words
    word_pos: int  # the word's position counted from the prompt's end (SAEBench's prompt_token_pos)


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


def _to_layer(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, layer: int, cache: Any) -> Tensor:
    """The residual stream (B, T, D) entering block ``layer`` for ``ids`` after what ``cache`` holds, which
    gains their keys and values (a transformers ``DynamicCache``); the blocks from ``layer`` up never run."""
    base = cast(nn.Module, model.base_model)
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # 5.x | 4.x
    with capture(blocks, [layer]) as captured:
        try:
            base(input_ids=ids, use_cache=True, **{name: cache})
        except StopForward:
            pass
    return captured["resid", layer]


@torch.no_grad()
def word_activations(
    model: nn.Module, blocks: nn.ModuleList, parts: tuple[list[int], list[int]], words: list[int], layer: int
) -> Tensor:
    """The residual stream (M, D) at ``layer`` on each word of ``words``, read in ``prefix + [word] + suffix``:
    the prefix runs once, every word then attends to its cached keys and values (WORD_BATCH words a forward,
    all the same length, so no padding)."""
    from transformers import DynamicCache  # imported here: transformers takes seconds to import

    device = next(model.parameters()).device
    prefix, suffix = parts
    shared = DynamicCache()
    _to_layer(model, blocks, torch.tensor([prefix], device=device), layer, shared)
    rows = []
    for start in range(0, len(words), WORD_BATCH):
        chunk = words[start : start + WORD_BATCH]
        cache = copy.deepcopy(shared)
        cache.batch_repeat_interleave(len(chunk))
        ids = torch.tensor([[word, *suffix] for word in chunk], device=device)  # (b, 1 + S)
        rows.append(_to_layer(model, blocks, ids, layer, cache)[:, 0].float().cpu())  # (b, D) at the word
    return torch.cat(rows)


def build_letter_task(s: Subject, cfg: EvaluateConfig) -> LetterTask | None:
    """The first-letter task at run ``s``'s layer (None when the vocabulary has too few words to also give
    the examples)."""
    tokenizer = load_cache_tokenizer(s.cache)
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
    layer = s.layers[0]
    raw = word_activations(model, blocks, parts, [token for token, _ in chosen], layer)
    x = s.normalizer.normalize(raw, layer)[0].double()  # (M, D) as the SAE reads it
    letter = torch.tensor([LETTERS.index(text.strip()[0].lower()) for _, text in chosen])  # (M,)
    test = torch.from_numpy(rng.random(len(chosen)) < TEST_SHARE)  # (M,)
    probes, scores = [], []
    for i in range(len(LETTERS)):
        probe = fit_probe(x[~test], letter[~test] == i)
        probes.append(probe)
        scores.append(f1(probe.score(x[test]) > 0, letter[test] == i))
    word_pos = -1 - len(parts[1])
    return LetterTask([text for _, text in chosen], letter, x, test, probes, scores, word_pos)


_LAST: dict[tuple[Any, ...], LetterTask | None] = {}  # the last task built, for the next SAE of the same sweep


def letter_task(s: Subject, cfg: EvaluateConfig) -> LetterTask | None:
    """:func:`build_letter_task`, built once per cache, layer and settings."""
    key = (s.cache.key, s.layers[0], cfg.probe_words, cfg.compute_dtype, str(s.sae.device))
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = build_letter_task(s, cfg)
    return _LAST[key]
