"""Stage one on tiny random models: stored rows equal the model's hidden states, keys, resume, reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cache import writer
from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract import stage as extract_module
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import CorpusSpec, iter_documents
from pipeline.extract.packing import PackSpec, pack, plan_shards, token_stream
from pipeline.extract.stage import prepare
from pipeline.infra.errors import UserError
from tests.support.caches import tree_bytes


def config(model_dir: Path, root: Path, **kw: object) -> ExtractConfig:
    base = {
        "model": str(model_dir),
        "layers": "1,3",
        "ctx_len": 32,
        "max_tokens": 900,
        "batch_size": 4,
        "shard_mb": 0.02,
        "cache_root": str(root),
        "device": "cpu",
    }
    return ExtractConfig(**{**base, **kw})  # type: ignore[arg-type]


def reference_rows(cfg: ExtractConfig, shard: dict, layer: int) -> dict[str, np.ndarray]:
    """Independent recomputation: re-pack, run HF with output_hidden_states, normalize, select."""
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    seqs_per_shard = prepare(cfg).spec["seqs_per_shard"]
    plans = plan_shards(
        pack(token_stream(iter_documents(CorpusSpec(cfg.dataset)), tok), cfg.ctx_len),
        tok.all_special_ids,
        PackSpec(cfg.ctx_len, cfg.heldout, seqs_per_shard, cfg.max_tokens),
    )
    plan = next(p for p in plans if p.index == shard["index"])
    with torch.no_grad():
        hidden = model(torch.from_numpy(plan.tokens), output_hidden_states=True).hidden_states[layer]
    x = Normalizer(cfg.normalize).normalize(hidden, layer)[0].numpy()
    out = {}
    for split, rows in (("train", ~plan.heldout), ("heldout", plan.heldout)):
        out[split] = x[plan.keep & rows[:, None]]
    return out


@pytest.mark.parametrize("backend", ["zarr", "memmap"])
def test_stored_rows_equal_hidden_states(tiny_llama: Path, tmp_path: Path, backend: str) -> None:
    cfg = config(tiny_llama, tmp_path, backend=backend)
    cache = ActivationCache.open(extract.run(cfg).folder)
    assert cache.rows("train") + cache.rows("heldout") == 900
    assert len(cache.shards) > 2
    for record in (cache.shards[0], cache.shards[-1]):
        for i, layer in enumerate(cache.layers):
            expected = reference_rows(cfg, record, layer)
            for split in ("train", "heldout"):
                stored = cache.read(record["index"], f"{split}/act", i).astype(np.float32)
                assert stored.shape == expected[split].shape
                np.testing.assert_allclose(stored, expected[split], atol=2e-2, rtol=1e-2)


def test_int8_cache_round_trips_within_half_a_step(tiny_llama: Path, tmp_path: Path) -> None:
    """Every decoded value lies within half a quantization step (scale / 2) of the float32 hidden state."""
    cfg = config(tiny_llama, tmp_path, dtype="int8", backend="zarr", max_tokens=300)
    cache = ActivationCache.open(extract.run(cfg).folder)
    assert cache.manifest["spec"]["dtype"] == "int8" and cache.manifest["format_version"] == 2
    record = cache.shards[0]
    for i, layer in enumerate(cache.layers):
        expected = reference_rows(cfg, record, layer)
        for split in ("train", "heldout"):
            scale = cache.read(record["index"], f"{split}/scale", i)  # (n,)
            decoded = cache.layer_rows(record["index"], split, i)
            assert decoded.dtype == np.float32 and decoded.shape == expected[split].shape
            assert np.all(np.abs(decoded - expected[split]) <= scale[:, None] * 0.5 + 1e-5)
            assert np.allclose(np.abs(expected[split]).max(axis=1), scale * 127, rtol=1e-5)  # absmax scale


def test_gpt2_blocks_are_found(tiny_gpt2: Path, tmp_path: Path) -> None:
    cfg = config(tiny_gpt2, tmp_path, layers="0,2", normalize="none", dtype="float32")
    cache = ActivationCache.open(extract.run(cfg).folder)
    record = cache.shards[0]
    expected = reference_rows(cfg, record, 2)["train"]
    np.testing.assert_allclose(cache.read(record["index"], "train/act", 1), expected, atol=1e-5, rtol=1e-5)


def test_metadata_matches_the_plan(tiny_llama: Path, tmp_path: Path) -> None:
    cache = ActivationCache.open(extract.run(config(tiny_llama, tmp_path, heldout=0.25)).folder)
    record = next(r for r in cache.shards if r["rows"]["heldout"] > 0)
    seqs = cache.read(record["index"], "heldout/sequences")
    seq, pos, token = (cache.read(record["index"], f"heldout/{c}") for c in ("seq", "pos", "token"))
    np.testing.assert_array_equal(seqs[seq, pos], token)  # every held-out row points into its sequence
    assert (cache.read(record["index"], "heldout/sequence_index") % 4 == 0).all()  # share 0.25: every 4th


def test_repeat_is_a_cache_hit_without_loading_the_model(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = extract.run(config(tiny_llama, tmp_path)).folder
    outputs = tmp_path / "activations"  # the extract stage's DVC output
    before = {str(p.relative_to(outputs)): p.read_bytes() for p in sorted(outputs.rglob("*")) if p.is_file()}
    monkeypatch.setattr(extract_module, "load_model", lambda *a, **k: pytest.fail("model loaded on a hit"))
    assert extract.run(config(tiny_llama, tmp_path)).folder.url == first.url
    after = {str(p.relative_to(outputs)): p.read_bytes() for p in sorted(outputs.rglob("*")) if p.is_file()}
    assert after == before  # a hit changes no output byte
    assert [p.name for p in outputs.iterdir()] == [first.name]  # no lock files or strays beside the cache


@pytest.mark.parametrize(
    "change",
    [
        {"layers": "1"},
        {"ctx_len": 16},
        {"normalize": "none"},
        {"dtype": "float32"},
        {"backend": "memmap"},
        {"max_tokens": 901},
        {"heldout": 0.1},
        {"shard_mb": 0.05},
        {"compute_dtype": "bfloat16"},
    ],
)
def test_any_spec_change_gives_a_new_key(tiny_llama: Path, tmp_path: Path, change: dict) -> None:
    assert (
        prepare(config(tiny_llama, tmp_path, **change)).folder.name != prepare(config(tiny_llama, tmp_path)).folder.name
    )


def test_other_model_or_corpus_gives_a_new_key(
    tiny_llama: Path, tiny_gpt2: Path, jsonl_corpus: Path, tmp_path: Path
) -> None:
    keys = {
        prepare(config(tiny_llama, tmp_path)).folder.name,
        prepare(config(tiny_gpt2, tmp_path)).folder.name,
        prepare(config(tiny_llama, tmp_path, dataset=str(jsonl_corpus))).folder.name,
    }
    assert len(keys) == 3


@pytest.mark.parametrize("backend", ["zarr", "memmap"])
def test_interrupted_run_resumes_to_identical_bytes(
    tiny_llama: Path, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = extract.run(config(tiny_llama, tmp_path / "a", backend=backend)).folder.local()
    real_commit = writer.commit_shard
    calls = {"n": 0}

    def failing_commit(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill between shards
        return real_commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "commit_shard", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        extract.run(config(tiny_llama, tmp_path / "b", backend=backend))
    monkeypatch.setattr(writer, "commit_shard", real_commit)
    partial = tmp_path / "b" / "activations" / whole.name
    assert len(list((partial / "shards").glob("*.json"))) == 2
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache.open(partial)
    resumed = extract.run(config(tiny_llama, tmp_path / "b", backend=backend)).folder.local()
    assert tree_bytes(resumed) == tree_bytes(whole)


def test_layer_specs(tiny_llama: Path, tmp_path: Path) -> None:
    for spec, layers in [("all", [0, 1, 2, 3]), ("route", [1, 2, 3]), ("1:2", [1, 2]), ("0,3", [0, 3])]:
        assert (
            ActivationCache.open(extract.run(config(tiny_llama, tmp_path, layers=spec, max_tokens=64)).folder).layers
            == layers
        )


def test_scale_normalization_gives_norm_sqrt_d(tiny_llama: Path, tmp_path: Path) -> None:
    cache = ActivationCache.open(extract.run(config(tiny_llama, tmp_path, normalize="scale", dtype="float32")).folder)
    x = cache.read(next(r["index"] for r in cache.shards if r["rows"]["train"]), "train/act", 0)
    assert abs(np.linalg.norm(x, axis=1).mean() / 8.0 - 1) < 0.1  # sqrt(64) = 8
    assert set(cache.manifest["normalization"]["scales"]) == {"1", "3"}


def test_local_jsonl_corpus_and_column_check(tiny_llama: Path, jsonl_corpus: Path, tmp_path: Path) -> None:
    assert (
        ActivationCache.open(extract.run(config(tiny_llama, tmp_path, dataset=str(jsonl_corpus))).folder).rows("train")
        > 0
    )
    with pytest.raises(UserError, match="columns are text, id"):
        extract.run(config(tiny_llama, tmp_path, dataset=str(jsonl_corpus), text_column="content"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "/no/such/model"}, "neither a model folder"),
        ({"model": "missing.gguf"}, "does not exist"),
        ({"layers": "7"}, r"valid layers are 0\.\.3"),
        ({"layers": "x"}, "cannot read layer spec"),
        ({"backend": "hdf5"}, "unknown backend"),
        ({"normalize": "l2"}, "unknown normalization"),
        ({"dataset": "/no/such.jsonl"}, "does not exist"),
        ({"ctx_len": 1}, "ctx-len"),
    ],
)
def test_bad_inputs_are_user_errors(tiny_llama: Path, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        extract.run(config(tiny_llama, tmp_path, **change))
    assert not (tmp_path / "activations").exists() or not any((tmp_path / "activations").glob("*/manifest.json"))


def test_corpus_too_small_for_one_row(tiny_llama: Path, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Only a few words.")
    with pytest.raises(UserError, match="yields no rows"):
        extract.run(config(tiny_llama, tmp_path, dataset=str(tiny), ctx_len=64))
    assert list((tmp_path / "activations").iterdir()) == []  # bad input leaves no empty cache folder behind


def test_folder_with_another_spec_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = extract.run(config(tiny_llama, tmp_path)).folder
    manifest = folder.read_json("manifest.json")
    manifest["spec"]["ctx_len"] = 999
    folder.write_json(manifest, "manifest.json")
    with pytest.raises(UserError, match="different spec"):
        extract.run(config(tiny_llama, tmp_path))
