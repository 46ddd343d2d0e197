"""The absorption suite: feature absorption on the first-letter task (Chanin et al., 2024, "A is for
Absorption: Studying Feature Splitting and Absorption in Sparse Autoencoders", arXiv:2409.14507), with
SAEBench's definitions and output format (``absorption_first_letter``, sae-bench 0.6.0).

For each letter, on the words of :mod:`pipeline.evaluate.letters`:

  main latents     the letter's k-sparse probe on the SAE's code grows from k = 1 while its F1 on the held-out
                   words rises by more than F1_JUMP; the latents of the last such k are the letter's (split)
                   latents. Candidates are ranked by how much more they fire on the letter's words
                   (SAEBench ranks them by an L1-regularized probe's weights)
  true positives   held-out words of the letter that the letter's probe calls positive
  absorption_fraction  per true positive: 0 when the main latents carry the whole probe projection
                   ``<x, p>`` (p the unit probe direction) or when the up to MAX_ABSORBERS other latents
                   with decoder cosine >= FRACTION_COS carry less than PROPORTION of it; 1 when the main
                   latents carry nothing; else absorbed / (absorbed + main), absorbed = min(their share,
                   what the main latents leave). A latent's share is its activation times its decoder
                   direction's cosine with p
  full absorption  no main latent fires, and the latent with the largest share has decoder cosine >=
                   FULL_COS with p and carries at least PROPORTION of ``<x, p>``

Per letter: mean_absorption_fraction and full_absorption_rate are over its true positives; the means
over letters count only letters whose probe reaches MIN_PROBE_F1 (SAEBench evaluates absorption only when
MIN_LETTERS of them do: the file says in ``eval_result_unstructured`` whether the model got there, with
every probe's F1, so a model too small for the task is visible).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.letters import ICL_EXAMPLES, LETTERS, SEED, TEMPLATE, WORD_BATCH, LetterTask, letter_task
from pipeline.evaluate.probes import STEPS, f1, fit_probe
from pipeline.infra.console import say
from pipeline.interop.saebench import EvalResult
from pipeline.live.subject import Subject
from pipeline.sae.interface import SAE

EVAL_TYPE = "absorption_first_letter"
MAX_K = 10  # largest k-sparse probe tried for a letter's main latents
F1_JUMP = 0.03  # F1 rise that makes one more latent part of the letter's split latents
MIN_PROBE_F1 = 0.6  # a letter counts only when its probe reaches this F1
MIN_LETTERS = 20  # SAEBench's min_feats_for_eval: letters needed for the means to mean something
FULL_COS = 0.025
FRACTION_COS = 0.1
PROPORTION = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8  # a main latent below this activation did not fire


def ranked_latents(codes: Tensor, letter: Tensor) -> Tensor:
    """For each letter, the MAX_K latents (26, K) whose mean on its words most exceeds their mean on the other
    words, best first, from the code (M, N) of the training words and their letters (M,)."""
    onehot = torch.nn.functional.one_hot(letter, len(LETTERS)).to(codes.dtype)  # (M, 26)
    inside = (onehot.T @ codes) / onehot.sum(0)[:, None].clamp_min(1)  # (26, N)
    # inside - overall mean = (share of other words) x (inside - mean on the other words): the same ranking
    return (inside - codes.mean(0)).topk(min(MAX_K, codes.shape[1]), dim=1).indices


def split_count(candidates: Tensor, y: Tensor, test: Tensor) -> int:
    """How many of the ranked candidate latents' codes ``candidates`` (M, K), best first, are the letter's split
    latents: k grows while the k-sparse probe's F1 on the held-out words rises by more than F1_JUMP."""
    best, chosen = -math.inf, 0
    for k in range(1, candidates.shape[1] + 1):
        probe = fit_probe(candidates[~test, :k], y[~test])
        score = f1(probe.score(candidates[test, :k]) > 0, y[test])
        if score <= best + F1_JUMP:
            break
        best, chosen = score, k
    return chosen


def word_absorption(acts: Tensor, cos: Tensor, proj: Tensor, main: list[int]) -> tuple[Tensor, Tensor]:
    """Absorption fraction (W,) and full absorption (W,) bool of W words from their codes ``acts`` (W, N),
    each latent's decoder cosine with the probe ``cos`` (N,) and the words' probe projections ``proj`` (W,)."""
    acts, cos, proj = acts.double(), cos.double(), proj.double()
    share = acts * cos  # (W, N): each latent's part of the probe projection
    is_main = torch.zeros(len(cos), dtype=torch.bool)
    is_main[main] = True
    main_share = share[:, is_main].sum(1)  # (W,)
    absorbers = ~is_main & (cos >= FRACTION_COS) & (share > 0)  # (W, N)
    top = share.where(absorbers, 0.0).topk(min(MAX_ABSORBERS, len(cos)), dim=1).values.sum(1)  # (W,)
    absorbed = torch.minimum(top, proj - main_share)  # (W,)
    fraction = (absorbed / (absorbed + main_share)).clamp(0.0, 1.0)
    fraction = torch.where(main_share <= 0, 1.0, fraction)
    fraction = torch.where((main_share >= proj) | (top / proj < PROPORTION), 0.0, fraction)
    lead = share.argmax(1)  # (W,) the latent with the largest share
    full = (
        (acts[:, is_main] < EPS).all(1)
        & (cos[lead] >= FULL_COS)
        & (proj >= 0)
        & (share.gather(1, lead[:, None])[:, 0] / proj >= PROPORTION)
    )
    return fraction, full


def letter_row(task: LetterTask, codes: Tensor, cos: Tensor, ranked: Tensor, i: int) -> dict[str, Any]:
    """SAEBench's result detail of letter ``i`` from the code (M, N), the decoder cosines (N,) with its probe
    and its candidate latents ``ranked`` (K,)."""
    y = task.letter == i  # (M,)
    main = ranked[: split_count(codes[:, ranked], y, task.test)].tolist()
    probe = task.probes[i]
    positive = task.test & y & (probe.score(task.x) > 0)  # (M,) the probe's true positives
    unit = probe.weight / probe.weight.norm().clamp_min(1e-12)  # (D,)
    fraction, full = word_absorption(codes[positive], cos, task.inputs[positive] @ unit, main)
    n = int(positive.sum())
    return {
        "first_letter": LETTERS[i],
        "mean_absorption_fraction": float(fraction.sum()) / n if n else math.nan,
        "full_absorption_rate": float(full.sum()) / n if n else math.nan,
        "num_full_absorption": int(full.sum()),
        "num_probe_true_positives": n,
        "num_split_features": len(main),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = float(np.mean(values)) if values else math.nan
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else math.nan  # statistics.stdev's sample std


def summary(rows: list[dict[str, Any]], probe_f1: list[float]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The mean metrics and the details over the letters the probes found (F1 above MIN_PROBE_F1, some true
    positives), as SAEBench keeps them."""
    kept = [row for row, score in zip(rows, probe_f1) if score > MIN_PROBE_F1 and row["num_probe_true_positives"]]
    metrics: dict[str, float] = {}
    for ours, theirs in (
        ("mean_absorption_fraction", "absorption_fraction_score"),
        ("full_absorption_rate", "full_absorption_score"),
        ("num_split_features", "num_split_features"),
    ):
        mean, std = _mean_std([row[ours] for row in kept])
        metrics[f"mean_{theirs}"], metrics[f"std_dev_{theirs}"] = mean, std
    order = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
    ordered = {k: metrics[k] for k in order} | {k: v for k, v in metrics.items() if k not in order}
    return ordered, kept


def eval_config(s: Subject, cfg: EvaluateConfig, task: LetterTask) -> dict[str, Any]:
    """sae-bench's ``AbsorptionEvalConfig`` as this evaluation ran it."""
    spec = s.cache.manifest["spec"]
    dtype = spec.get("compute_dtype", "auto") if cfg.compute_dtype == "cache" else cfg.compute_dtype
    return {
        "model_name": spec["model"]["name"],
        "random_seed": SEED,
        "f1_jump_threshold": F1_JUMP,
        "max_k_value": MAX_K,
        "prompt_template": TEMPLATE,
        "prompt_token_pos": task.word_pos,
        "llm_batch_size": WORD_BATCH,
        "llm_dtype": dtype,
        "k_sparse_probe_l1_decay": 0.0,  # latents ranked by their mean difference, not an L1 probe
        "k_sparse_probe_batch_size": int((~task.test).sum()),  # full batch
        "k_sparse_probe_num_epochs": STEPS,  # L-BFGS iterations
        "min_GT_probe_f1": MIN_PROBE_F1,
        "min_feats_for_eval": MIN_LETTERS,
        "eval_k_sparse_probe_batch_size": len(task.words),
        "precalc_k_sparse_probe_sae_acts": True,
    }


@torch.no_grad()
def absorption_rows(task: LetterTask, sae: SAE) -> list[dict[str, Any]]:
    """Every letter's result detail for ``sae``."""
    codes = torch.cat([sae.dense_code(chunk.float().to(sae.device)).float().cpu() for chunk in task.inputs.split(1024)])
    ranked = ranked_latents(codes[~task.test], task.letter[~task.test])  # (26, K)
    decoder = torch.nn.functional.normalize(sae.directions().detach().double().cpu(), dim=1)  # (N, D)
    rows = []
    for i, probe in enumerate(task.probes):
        cos = decoder @ (probe.weight / probe.weight.norm().clamp_min(1e-12))  # (N,)
        rows.append(letter_row(task, codes, cos, ranked[i], i))
    return rows


def absorption_suite(s: Subject, cfg: EvaluateConfig) -> EvalResult | None:
    """The absorption suite of run ``s`` (None, said, for an SAE the task cannot be run on)."""
    if s.cfg.get("imported") or s.sae.sites != ("resid",):
        say(f"absorption suite skipped for {s.folder.name}: it reads the residual stream of its own cache")
        return None
    task = letter_task(s, cfg)
    if task is None:
        say(f"absorption suite skipped for {s.folder.name}: the vocabulary has under {ICL_EXAMPLES + 1} words")
        return None
    rows = absorption_rows(task, s.sae)
    metrics, kept = summary(rows, task.probe_f1)
    notes = {
        "probe_f1": dict(zip(LETTERS, task.probe_f1)),
        "letters_evaluated": len(kept),
        "enough_letters": len(kept) >= MIN_LETTERS,
        "all_letters": rows,
        "words": len(task.words),
        "probe_layer": task.layer,
        "space": "the SAE's input: the layer's activation normalized as the cache normalizes it (a RouteSAE's "
        "routed input; its probes on the layer its router sends most words to)",
        "definitions": "pipeline/evaluate/absorption.py",
    }
    return EvalResult(EVAL_TYPE, eval_config(s, cfg, task), {"mean": metrics}, kept, notes)
