"""`sae-pipe steer`: generate from prompts with and without latent edits, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.sae.subject import Subject, load_llm, load_subject
from pipeline.sae.topk import TopKSAE
from pipeline.steer.config import SteerConfig
from pipeline.steer.edits import Positions, parse_edit
from pipeline.steer.intervene import MODES, Target, steering


def steer(cfg: SteerConfig) -> list[dict[str, Any]]:
    """One record per prompt: the prompt, the unedited and the edited continuation, the edits."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown --mode {cfg.mode!r}; use one of {', '.join(MODES)}.")
    if cfg.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    positions = Positions.parse(cfg.positions)
    prompts = cfg.prompts + _file_prompts(cfg.prompts_file)
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    device = resolve_device(cfg.device)
    subject = load_subject(cfg.run, device)
    target = make_target(subject, cfg)
    model, blocks = load_llm(subject.cache, device)
    spec = subject.cache.manifest["spec"]["model"]
    tokenizer = load_tokenizer(resolve_model(spec["name"], spec.get("revision")))
    records = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
        _check_length(model, ids.shape[1] + cfg.max_new_tokens)
        unedited = generate(model, ids, cfg)
        with steering(blocks, [target], cfg.mode, positions, ids.shape[1]):
            edited = generate(model, ids, cfg)
        records.append(
            {
                "prompt": prompt,
                "unedited": tokenizer.decode(unedited[0, ids.shape[1] :], skip_special_tokens=True),
                "edited": tokenizer.decode(edited[0, ids.shape[1] :], skip_special_tokens=True),
                "edits": [f"{e.latent}={e.kind}:{e.value:g}" for e in target.edits],
                "mode": cfg.mode,
                "positions": cfg.positions,
                "layer": target.layer,
            }
        )
    return records


def make_target(subject: Subject, cfg: SteerConfig) -> Target:
    """The run's SAE with the parsed edits and, for direction edits, each feature's largest activation."""
    if subject.is_route or not isinstance(subject.sae, TopKSAE):
        raise UserError(
            f"run {subject.folder.name} is a RouteSAE; steering supports TopK runs so far "
            "(RouteSAE edits need each token's routed layer before the forward reaches it)."
        )
    if not cfg.features:
        raise UserError("no edit: pass --feature LATENT=KIND:VALUE, e.g. --feature 1592=scale:0.")
    edits = [parse_edit(text, subject.sae.cfg.n_latents) for text in cfg.features]
    return Target(subject.sae, subject.layers[0], subject.normalizer, edits, _max_activations(subject, cfg))


def _max_activations(subject: Subject, cfg: SteerConfig) -> dict[int, float]:
    """latent -> max_act from the run's feature table, when one exists (direction edits scale by it)."""
    default = Folder.at(cfg.cache_root).child("interpret", subject.folder.name).local() / "features.parquet"
    table = Path(cfg.feature_table) if cfg.feature_table else default
    if not table.is_file():
        return {}
    data = pq.read_table(table, columns=["latent", "max_act"]).to_pydict()
    return {int(latent): float(value) for latent, value in zip(data["latent"], data["max_act"]) if value > 0}


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, cfg: SteerConfig) -> torch.Tensor:
    """Greedy, or seeded sampling: the same seed for the unedited and the edited run."""
    torch.manual_seed(cfg.seed)
    options: dict[str, Any] = {"do_sample": cfg.sample, "max_new_tokens": cfg.max_new_tokens}
    if cfg.sample:
        options["temperature"] = cfg.temperature
    pad = getattr(model.generation_config, "eos_token_id", None)
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)  # type: ignore[operator]


def _check_length(model: nn.Module, length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and length > limit:
        raise UserError(
            f"the prompt plus --max-new-tokens is {length} tokens, longer than the model's {limit} positions; "
            "shorten the prompt or lower --max-new-tokens."
        )


def _file_prompts(path: str) -> list[str]:
    if not path:
        return []
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts-file {path} does not exist.")
    return [line for line in file.read_text().splitlines() if line.strip()]
