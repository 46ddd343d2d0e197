"""The probing suite: SAEBench's sparse probing (``sparse_probing``, sae-bench 0.6.0, after Gurnee et al.,
2023, "Finding Neurons in a Haystack") on documents of the cache, with no LLM forward.

Each document is the mean of its stored rows (at most ``--probe-tokens``, held-out rows first): its mean
activation (the SAE's input space) and its mean SAE code, as SAEBench mean-pools a text's activations.
Documents are split 80 / 20 into train and test (so no document has rows on both sides), and each side is
balanced by dropping documents of the larger class, as SAEBench balances its sets (chance = 0.5).

  llm_test_accuracy       a logistic probe on the mean activation (every dimension)
  llm_top_k_test_accuracy the same on the k dimensions whose class means differ most (train split)
  sae_test_accuracy       a logistic probe on the mean code (every latent)
  sae_top_k_test_accuracy on the k latents whose class means differ most: k-sparse probing, k in K_VALUES

Tasks, from what the cache and its corpus know (:func:`document_tasks`): every corpus, whether a document
shows code (a ``>>>`` prompt); the built-in corpus, reference-manual topic vs library docstring; a JSONL
corpus, its ``--probe-label`` column (its MAX_CLASSES most common values, each against the rest). A task's
accuracy is the mean over its classes; the headline numbers are the mean over tasks.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.probes import accuracy, fit_probe, top_by_difference
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.interop.saebench import EvalResult
from pipeline.live.subject import Subject, encode_rows, load_cache_tokenizer

EVAL_TYPE = "sparse_probing"
K_VALUES = (1, 2, 5, 20)
TEST_SHARE = 0.2
MIN_CLASS = 4  # documents of each class the balanced train split needs
MAX_CLASSES = 5  # classes of a label column probed, the most common first
SEED = 42
ROW_BATCH = 4096


class Pooled(NamedTuple):
    """The documents of the rows read, each pooled over its rows."""

    docs: np.ndarray  # (P,) document ids (the corpus's order)
    raw: Tensor  # (P, D) mean activation
    code: Tensor  # (P, N) mean SAE code
    texts: list[str]  # each document's stored tokens, decoded


def _row_columns(s: Subject, split: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Document id and token (R,) of the first ``rows`` rows of ``split``, in the order encode_rows reads them."""
    left, docs, tokens = rows, [], []
    for record in s.cache.shards:
        n = min(record["rows"][split], left)
        if n > 0:
            docs.append(s.cache.read(record["index"], f"{split}/doc")[:n])
            tokens.append(s.cache.read(record["index"], f"{split}/token")[:n])
            left -= n
    return np.concatenate(docs), np.concatenate(tokens)


@torch.no_grad()
def pool_documents(s: Subject, cfg: EvaluateConfig) -> Pooled:
    """Mean activation and mean code of every document among the first rows (held-out, then training)."""
    held = s.cache.rows("heldout") if not cfg.probe_tokens else min(cfg.probe_tokens, s.cache.rows("heldout"))
    rest = s.cache.rows("train") if not cfg.probe_tokens else min(cfg.probe_tokens - held, s.cache.rows("train"))
    plan = [(split, n) for split, n in (("heldout", held), ("train", rest)) if n > 0]
    columns = [_row_columns(s, split, n) for split, n in plan]
    docs, where = np.unique(np.concatenate([c[0] for c in columns]), return_inverse=True)  # where: (R,)
    tokens = np.concatenate([c[1] for c in columns])
    at = torch.from_numpy(where)
    raw: Tensor | None = None
    code = torch.zeros(len(docs), s.cfg["sae"]["n_latents"], dtype=torch.float64)  # (P, N)
    done = 0
    for split, n in plan:
        for out in encode_rows(s.sae, s.cache, s.layers, split, n, ROW_BATCH, cfg.infer_k, cfg.theta):
            idx = at[done : done + len(out.x)]  # (b,)
            x = out.x.flatten(1).double().cpu()  # (b, D): a routed SAE's layers side by side
            raw = torch.zeros(len(docs), x.shape[1], dtype=torch.float64) if raw is None else raw
            raw.index_add_(0, idx, x)
            ids, acts = out.latents.indices.cpu(), out.latents.acts.double().cpu()  # (b, k)
            code.index_put_((idx[:, None].expand_as(ids), ids), acts, accumulate=True)
            done += len(out.x)
    counts = torch.bincount(at, minlength=len(docs)).double()[:, None]  # (P, 1)
    assert raw is not None  # plan is never empty: the cache has rows
    tokenizer = cache_tokenizer(s)
    order = np.argsort(where, kind="stable")  # rows grouped by document, in reading order
    pieces = np.split(tokens[order], np.cumsum(np.bincount(where, minlength=len(docs)))[:-1])
    return Pooled(docs, raw / counts, code / counts, [tokenizer.decode(p.tolist()) for p in pieces])


_TOKENIZERS: dict[str, Any] = {}  # the last cache's tokenizer, for the next SAE of the same sweep


def cache_tokenizer(s: Subject) -> Any:
    """The tokenizer of run ``s``'s cache, loaded once per cache (a GGUF file's takes seconds to build)."""
    if s.cache.key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[s.cache.key] = load_cache_tokenizer(s.cache)
    return _TOKENIZERS[s.cache.key]


def _label_column(corpus: dict[str, Any], column: str, docs: np.ndarray) -> list[str | None]:
    """The ``column`` value (as text) of each document ``docs`` of a JSONL corpus, numbered as extraction
    numbers them (documents whose text is empty or not a string are skipped there, so here too)."""
    path = Path(str(corpus.get("dataset", "")))
    if path.suffix != ".jsonl" or not path.is_file():
        raise UserError(
            f"--probe-label reads a JSONL corpus file, and this cache's corpus is {corpus.get('dataset')!r}; "
            "leave --probe-label empty to probe the tasks every corpus has."
        )
    text_column, values = corpus.get("text_column", "text"), []
    with path.open() as lines:
        for line in lines:
            example = json.loads(line) if line.strip() else {}
            if isinstance(example.get(text_column), str) and example[text_column]:
                values.append(None if example.get(column) is None else str(example[column]))
    if all(v is None for v in values):
        raise UserError(f"no document of {path} has the column {column!r} that --probe-label names.")
    return [values[d] if d < len(values) else None for d in docs]


def check_label(s: Subject, cfg: EvaluateConfig) -> None:
    """Refuse a --probe-label the run's corpus cannot serve before any run is evaluated (reads the JSONL once)."""
    if cfg.probe_label:
        _label_column(s.cache.manifest["spec"].get("corpus", {}), cfg.probe_label, np.empty(0, dtype=np.int64))


def document_tasks(s: Subject, cfg: EvaluateConfig, pooled: Pooled) -> dict[str, dict[str, Tensor]]:
    """Task name -> class name -> each document's label (P,): 1 the class, 0 another, -1 unknown."""
    corpus = s.cache.manifest["spec"].get("corpus", {})
    found = {"sae-pipe/code_example": {"code_example": torch.tensor([">>>" in t for t in pooled.texts]).long()}}
    if corpus.get("dataset") == "builtin":  # extraction reads the manual's topics first (pipeline/extract/corpus.py)
        from pydoc_data.topics import topics

        found["sae-pipe/reference_manual"] = {"reference_manual": torch.from_numpy(pooled.docs < len(topics)).long()}
    if cfg.probe_label:
        values = _label_column(corpus, cfg.probe_label, pooled.docs)
        common = [v for v, _ in Counter(v for v in values if v is not None).most_common(MAX_CLASSES)]
        common = common[:1] if len(common) == 2 else common  # two values: one task, not it and its mirror
        found[f"{Path(str(corpus['dataset'])).name}/{cfg.probe_label}"] = {
            c: torch.tensor([-1 if v is None else int(v == c) for v in values]) for c in common
        }
    return found


def _balanced(labels: Tensor, side: Tensor, rng: np.random.Generator) -> Tensor:
    """Indices of as many documents of each class as the smaller class has, on ``side`` (P,) bool."""
    pos = torch.nonzero(side & (labels == 1))[:, 0]
    neg = torch.nonzero(side & (labels == 0))[:, 0]
    n = min(len(pos), len(neg))
    return torch.cat([pos[rng.permutation(len(pos))[:n]], neg[rng.permutation(len(neg))[:n]]])


def class_scores(pooled: Pooled, labels: Tensor, test: Tensor, rng: np.random.Generator) -> dict[str, float] | None:
    """Every accuracy of one class against the rest (None when a balanced split is too small to probe)."""
    train, held = _balanced(labels, ~test, rng), _balanced(labels, test, rng)
    if len(train) < 2 * MIN_CLASS or len(held) < 2:
        return None
    scores = {}
    for name, x in (("llm", pooled.raw), ("sae", pooled.code)):
        x_train, y_train, x_test, y_test = x[train], labels[train] == 1, x[held], labels[held] == 1
        scores[f"{name}_test_accuracy"] = accuracy(fit_probe(x_train, y_train), x_test, y_test)
        for k in K_VALUES:
            ids = top_by_difference(x_train, y_train, k)  # (k,)
            probe = fit_probe(x_train[:, ids], y_train)
            scores[f"{name}_top_{k}_test_accuracy"] = accuracy(probe, x_test[:, ids], y_test)
    return scores


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def probing_suite(s: Subject, cfg: EvaluateConfig) -> EvalResult | None:
    """The probing suite of run ``s`` (None, said, for an imported run without its layer's activations)."""
    if not s.has_activations:
        say(f"probing suite skipped for {s.folder.name}: its cache has no activation rows for its layer")
        return None
    pooled = pool_documents(s, cfg)
    test = torch.from_numpy(np.random.default_rng(SEED).random(len(pooled.docs)) < TEST_SHARE)  # (P,) by document
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    skipped: list[str] = []
    for task, classes in document_tasks(s, cfg, pooled).items():
        scored = {c: class_scores(pooled, labels, test, np.random.default_rng(SEED)) for c, labels in classes.items()}
        per_class[task] = {c: v for c, v in scored.items() if v is not None}
        skipped += [f"{task}/{c}" for c, v in scored.items() if v is None]
    by_task = {task: _mean(list(scores.values())) for task, scores in per_class.items() if scores}
    means = _mean(list(by_task.values()))
    names = ["{}_test_accuracy", *(f"{{}}_top_{k}_test_accuracy" for k in K_VALUES)]
    metrics = {side: {n.format(side): means.get(n.format(side), math.nan) for n in names} for side in ("llm", "sae")}
    details = [{"dataset_name": task, **scores} for task, scores in by_task.items()]
    notes = {
        "per_class": per_class,
        "skipped_too_few_documents": skipped,
        "documents": len(pooled.docs),
        "test_documents": int(test.sum()),
        "space": "documents pooled from the cache's rows (the SAE's input space); no LLM forward",
        "definitions": "pipeline/evaluate/probing.py",
    }
    return EvalResult(EVAL_TYPE, eval_config(s, cfg, list(by_task), pooled), metrics, details, notes)


def eval_config(s: Subject, cfg: EvaluateConfig, tasks: list[str], pooled: Pooled) -> dict[str, Any]:
    """sae-bench's ``SparseProbingEvalConfig`` as this evaluation ran it."""
    spec = s.cache.manifest["spec"]
    return {
        "random_seed": SEED,
        "dataset_names": tasks,
        "probe_train_set_size": int(round(len(pooled.docs) * (1 - TEST_SHARE))),  # before balancing
        "probe_test_set_size": int(round(len(pooled.docs) * TEST_SHARE)),
        "context_length": spec.get("ctx_len", 0),
        "sae_batch_size": ROW_BATCH,
        "llm_batch_size": None,  # no LLM forward: the cache's rows
        "llm_dtype": spec.get("compute_dtype", "auto"),
        "model_name": spec["model"]["name"],
        "k_values": list(K_VALUES),
        "lower_vram_usage": False,
    }
