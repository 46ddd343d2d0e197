"""The first-letter task of the absorption suite, built offline from the model's own vocabulary.

Words are the vocabulary's single tokens that are one ASCII word (a leading space allowed), as SAEBench's
``get_alpha_tokens`` takes them; up to ``--probe-words`` per first letter. Each word is read in an
in-context prompt of SAEBench's template (ten other words, each followed by its capital first letter,
then the word itself), built from token ids so that the word is exactly one token at a known position;
the layer's activation there, normalized as the SAE reads it, is the word's row. A logistic probe per
letter (one against the rest) is fitted on 80 % of the words and scored (F1) on the rest.

The LLM's forwards and the probes depend on the cache and the layer only, so every SAE of a sweep shares
them (:func:`letter_task` keeps the last one built).
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.probes import Probe, f1, fit_probe
from pipeline.live.subject import Subject, load_cache_tokenizer, load_llm
from pipeline.llm.hooks import run_to_layers

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"  # SAEBench's prompt_template
ICL_EXAMPLES = 10  # solved examples before the word (SAEBench's max_icl_examples)
SEED = 42  # SAEBench's random_seed
TEST_SHARE = 0.2  # words held out to score the probes and find absorption on


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


def prompt_ids(tokenizer: Any, token: int, examples: list[str]) -> tuple[list[int], int]:
    """The prompt's token ids and the word's position in it: solved ``examples``, then the word (one token)."""
    before, after = TEMPLATE.split("{word}")
    shots = "".join(f"\n{before}{w}{after} {w.strip()[0].upper()}" for w in examples)
    prefix = tokenizer(shots + "\n" + before)["input_ids"]  # BOS first when the tokenizer adds one
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    return [*prefix, token, *suffix], len(prefix)


@torch.no_grad()
def word_activations(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, prompts: list[tuple[list[int], int]], layer: int, batch: int
) -> Tensor:
    """The residual stream (M, D) at layer ``layer`` on each prompt's word, ``batch`` prompts per forward.
    Prompts are padded on the right: a causal model's earlier positions never see the padding."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        tokens = torch.zeros(len(chunk), max(len(ids) for ids, _ in chunk), dtype=torch.long)  # (b, T)
        for row, (ids, _) in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids)
        hidden = run_to_layers(model, blocks, tokens.to(device), [layer])[layer]  # (b, T, D)
        at = torch.tensor([pos for _, pos in chunk], device=hidden.device)  # (b,)
        rows.append(hidden[torch.arange(len(chunk), device=hidden.device), at].float().cpu())  # (b, D)
    return torch.cat(rows)


def build_letter_task(s: Subject, cfg: EvaluateConfig) -> LetterTask | None:
    """The first-letter task at run ``s``'s layer (None when the vocabulary has too few words)."""
    tokenizer = load_cache_tokenizer(s.cache)
    vocab = alpha_tokens(tokenizer)
    if len(vocab) <= ICL_EXAMPLES:
        return None
    rng = np.random.default_rng(SEED)
    chosen = pick_words(vocab, cfg.probe_words, rng)
    texts = [text for _, text in vocab]
    prompts = []
    for token, text in chosen:
        others = [texts[i] for i in rng.choice(len(texts), ICL_EXAMPLES + 1, replace=False) if texts[i] != text]
        prompts.append(prompt_ids(tokenizer, token, others[:ICL_EXAMPLES]))
    model, blocks = load_llm(s.cache, s.sae.device, cfg.compute_dtype)
    layer = s.layers[0]
    raw = word_activations(model, blocks, prompts, layer, cfg.batch_size * 8)  # prompts are short: 8x the batch
    x = s.normalizer.normalize(raw, layer)[0].double()  # (M, D) as the SAE reads it
    letter = torch.tensor([LETTERS.index(text.strip()[0].lower()) for _, text in chosen])  # (M,)
    test = torch.from_numpy(rng.random(len(chosen)) < TEST_SHARE)  # (M,)
    probes, scores = [], []
    for i in range(len(LETTERS)):
        probe = fit_probe(x[~test], letter[~test] == i)
        probes.append(probe)
        scores.append(f1(probe.score(x[test]) > 0, letter[test] == i))
    word_pos = prompts[0][1] - len(prompts[0][0])
    return LetterTask([text for _, text in chosen], letter, x, test, probes, scores, word_pos)


_LAST: dict[tuple[Any, ...], LetterTask | None] = {}  # the last task built, for the next SAE of the same sweep


def letter_task(s: Subject, cfg: EvaluateConfig) -> LetterTask | None:
    """:func:`build_letter_task`, built once per cache, layer and settings."""
    key = (s.cache.key, s.layers[0], cfg.probe_words, cfg.compute_dtype, str(s.sae.device))
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = build_letter_task(s, cfg)
    return _LAST[key]
