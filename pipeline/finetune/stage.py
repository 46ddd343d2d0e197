"""`sae-pipe finetune`: continue training a run with its SAE spliced into the running LLM, on the model's KL to
the clean model (or next-token CE) plus an optional MSE term, over the cache's training sequences
(:mod:`pipeline.finetune.sequences`), into a new run folder that records its parent. The parent is only read.

Every single-layer SAE trains through the one SAE interface in inference mode (the code evaluate splices): TopK's
gradient flows through its k values, a threshold architecture's through the latents above their thresholds,
which stay as trained. A transcoder (or skip transcoder) is spliced as evaluate splices it, its prediction in
place of its MLP's output. RouteSAE (a router over layers) is refused.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.loss import batch_loss
from pipeline.finetune.plan import batches, lr_factor, settings, target
from pipeline.finetune.sequences import Sequences, Specials, training_sequences
from pipeline.infra.console import progress_bar, say
from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder, sha256_file
from pipeline.live.runs import takes
from pipeline.live.splice import real_positions, replays_exactly
from pipeline.live.subject import Live, Subject, go_live, load_subject
from pipeline.sae.folder import save_weights, write_cfg
from pipeline.sae.interface import SAE

LOG_FIELDS = ("step", "tokens", "loss", "model_loss", "mse", "lr")
# `--train decoder`: what maps a code to the output; every other parameter (the encoder, thresholds) stays frozen
DECODER = ("W_dec", "b_dec", "W_skip")


@dataclass
class FinetuneResult:
    """What one fine-tuning wrote and did."""

    folder: Folder  # the new run
    parent: str  # the run it started from
    steps: int
    tokens: int  # real positions trained on
    first_loss: float  # the model part (KL or CE) of the first step
    last_loss: float  # the same, mean over the last tenth of the steps


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``cfg.run`` into a new run folder; return where it went and how the loss moved."""
    if not cfg.run:
        raise UserError("no run to fine-tune: pass a run folder (printed by `sae-pipe fit`).")
    subject = load_subject(cfg.run, resolve_device(cfg.device))
    refuse(subject)
    out = target(cfg, subject)
    live = go_live(subject, cfg.compute_dtype)
    live.model.requires_grad_(False)
    sequences = training_sequences(subject.cache, Specials.of(live.tokenizer))
    steps = batches(sequences.real, cfg)
    started = time.perf_counter()
    log = train(live, sequences, steps, cfg)
    seconds = time.perf_counter() - started
    tail = log[-max(len(log) // 10, 1) :]
    result = FinetuneResult(
        out,
        subject.folder.name,
        len(log),
        int(log[-1]["tokens"]),
        float(log[0]["model_loss"]),
        float(np.mean([row["model_loss"] for row in tail])),
    )
    write_run(out, subject, cfg, log, {"seconds": round(seconds, 1), **summary(result, seconds)})
    say(f"fine-tuned {subject.folder.name} on {cfg.loss}: {result.first_loss:.4g} -> {result.last_loss:.4g}")
    return result


def refuse(subject: Subject) -> None:
    """One clear error for runs fine-tuning cannot splice or read sequences for."""
    if not takes("finetune", subject.cfg["sae"]):
        raise UserError(
            f"run {subject.folder.name} is a {subject.sae.cfg.arch} SAE that routes over several layers; finetune "
            "trains single-layer SAEs and transcoders (not RouteSAE)."
        )
    if subject.cfg.get("imported"):
        raise UserError(
            f"run {subject.folder.name} was imported and has no cache of its own; finetune reads the training "
            "sequences of the cache a run was trained on."
        )


def train(live: Live, sequences: Sequences, steps: list[np.ndarray], cfg: FinetuneConfig) -> list[dict[str, float]]:
    """Adam on the SAE's parameters over ``steps`` (sequence ids each), lr as ``plan.lr_factor``; the log rows."""
    sae, device = live.subject.sae, live.device
    sae.eval()  # the inference code, as evaluate splices it
    optimizer = torch.optim.Adam(trained(sae, cfg.train), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, len(steps), cfg.warmup))
    probe = torch.from_numpy(sequences.tokens[:1, :16]).to(device)  # (1, 16)
    replay = replays_exactly(live.model, live.blocks, probe, live.site.layer)
    log, seen = [], 0
    with progress_bar("finetune", sum(int(sequences.real[ids].sum()) for ids in steps), unit="tok") as bar:
        for number, ids in enumerate(steps):
            tokens = torch.from_numpy(sequences.tokens[ids]).to(device)  # (B, T)
            mask = torch.from_numpy(sequences.mask[ids]).to(device) & real_positions(tokens, live.special)  # (B, T)
            terms = batch_loss(live, tokens, mask, cfg.loss, cfg.mse_weight, replay)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            decay.step()
            sae.normalize_decoder()  # architectures with unit decoder rows keep them
            seen += int(mask.sum())
            parts = {"loss": float(terms.total.detach()), "model_loss": float(terms.model), "mse": float(terms.mse)}
            log.append({"step": number + 1, "tokens": seen, **parts, "lr": lr})
            bar.advance(0, int(mask.sum()))
    return log


def trained(sae: SAE, train: str) -> list[torch.nn.Parameter]:
    """The parameters ``--train`` names, set to require gradients; the rest frozen (no gradient is computed)."""
    for name, param in sae.named_parameters():
        param.requires_grad_(train == "all" or name in DECODER)
    return [param for param in sae.parameters() if param.requires_grad]


def summary(result: FinetuneResult, seconds: float) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "first_loss": round(result.first_loss, 6),
        "last_loss": round(result.last_loss, 6),
        "tokens_per_s": round(result.tokens / max(seconds, 1e-9), 1),
    }


def write_run(
    out: Folder, subject: Subject, cfg: FinetuneConfig, log: list[dict[str, float]], result: dict[str, Any]
) -> None:
    """cfg.json (the parent's, with a finetune block and this result), sae.safetensors and log.csv, swapped in whole."""
    parent = subject.folder
    record = {k: v for k, v in subject.cfg.items() if k not in ("format", "format_version", "result")}
    record["finetune"] = {
        "parent": parent.name,
        "parent_path": parent.url,
        "parent_sae_sha256": sha256_file(parent.local() / "sae.safetensors"),
        **settings(cfg),
        "compute_dtype": cfg.compute_dtype,
    }
    record["result"] = result
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(log)
    with out.replaced() as tmp:
        save_weights(tmp, subject.sae)
        tmp.write_bytes(text.getvalue().encode(), "log.csv")
        write_cfg(tmp, {**record, "status": "complete"})
