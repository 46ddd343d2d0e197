"""params.yaml documents each key with the same sentence as the config field behind it (one source)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pipeline.circuit.config import CircuitConfig
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.finetune.config import FinetuneConfig
from pipeline.fit.config import FitConfig
from pipeline.infra import settings
from pipeline.infra.errors import UserError
from pipeline.infra.params import DATA_KEYS, MODEL_KEYS, build_config, doc
from pipeline.interpret.config import InterpretConfig
from pipeline.steer.config import SteerConfig

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "model": (ExtractConfig, MODEL_KEYS),
    "data": (ExtractConfig, DATA_KEYS),
    "extract": (ExtractConfig, None),
    "fit": (FitConfig, None),
    "finetune": (FinetuneConfig, None),
    "evaluate": (EvaluateConfig, None),
    "interpret": (InterpretConfig, None),
    "steer": (SteerConfig, None),
    "circuit": (CircuitConfig, None),
}


def commented_keys(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> the comment after the key's value, for every key of params.yaml."""
    found, section = {}, ""
    for line in text.splitlines():
        top = re.match(r"^(\w+):\s*(#.*)?$", line)
        if top:
            section = top.group(1)
            continue
        key = re.match(r"^  (\w+):.*?(?:  # (.*))?$", line)
        if key:
            found[(section, key.group(1))] = key.group(2) or ""
    return found


def mismatches(text: str) -> list[str]:
    bad = []
    for (section, key), comment in commented_keys(text).items():
        cls, mapping = SECTIONS[section]
        expected = doc(cls, mapping[key] if mapping else key)
        if comment != expected:
            bad.append(f"{section}.{key}: {comment!r} != {expected!r}")
    return bad


def test_every_key_carries_its_field_doc() -> None:
    text = (ROOT / "params.yaml").read_text()
    assert len(commented_keys(text)) > 30
    assert mismatches(text) == []


def test_a_stale_comment_is_caught() -> None:
    text = (ROOT / "params.yaml").read_text()
    stale = re.sub(r"(\n  k: \d+\s+# ).*", r"\1active latents (old wording)", text)
    assert stale != text
    assert mismatches(stale) == ["fit.k: 'active latents (old wording)' != 'active latents per token'"]


CONFIGS = [ExtractConfig, FitConfig, FinetuneConfig, EvaluateConfig, InterpretConfig, SteerConfig, CircuitConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_a_doc(cls: type) -> None:
    assert all(f.metadata.get("doc") for f in dataclasses.fields(cls))


@pytest.mark.parametrize(
    ("cls", "stage", "old", "now"),
    [
        # interpret's explainer was `model` until the LLM studied kept that name alone
        (InterpretConfig, "interpret", {"interpret": {"model": "gpt-4o", "features": 5}}, "interpret.explainer_model"),
        # model.device / model.dtype looked global but reached only extract
        (ExtractConfig, "extract", {"model": {"name": "m", "device": "cpu"}}, "extract.device"),
        (ExtractConfig, "extract", {"model": {"dtype": "float32"}}, "extract.compute_dtype"),
    ],
)
def test_a_moved_key_is_named_with_its_new_place(cls: type, stage: str, old: dict, now: str) -> None:
    with pytest.raises(UserError) as caught:
        build_config(cls, old, stage, {}, shared=("model",))
    section, key = next((s, k) for s, v in old.items() for k in v if k not in ("name", "features"))
    assert f"{section}.{key} is now {now}" in str(caught.value)


def test_shared_settings_are_the_one_declaration() -> None:
    """device and cache_root in every config, compute_dtype where a cache is replayed (extract's is its own):
    the default and doc of pipeline/infra/settings.py, not a copy that could drift."""
    shared = {"device": settings.device, "cache_root": settings.cache_root, "compute_dtype": settings.compute_dtype}
    seen = []
    for cls in CONFIGS:
        for field in dataclasses.fields(cls):
            if field.name in shared and (cls, field.name) != (ExtractConfig, "compute_dtype"):
                one = shared[field.name]()
                assert (field.default, field.metadata) == (one.default, one.metadata), (cls.__name__, field.name)
                seen.append(field.name)
    assert (seen.count("device"), seen.count("cache_root"), seen.count("compute_dtype")) == (7, 7, 2)
