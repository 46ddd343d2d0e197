"""sae-pipe's half of `make check-peers` for the evaluate suites (runs in sae-pipe's venv, unlike the rest of
this folder): every suite's SAEBench file, written on a tiny randomly initialized model, for
benchmarks/check_saebench.py to validate with sae-bench's own classes.

    python -m benchmarks.peers.suite_files WORK    # WORK: check_peers.py's; writes WORK/suites/evaluate/...

The real SmolLM2 cache of check_peers.py holds six documents, too few for a probing task, so a 4-block Llama
(d 64, a 512-token BPE trained on the built-in corpus) reads a JSONL corpus of 80 short documents with a label
column: one TopK at layer 1 and one RouteSAE over layers 1..3, each with core, absorption, probing and
geometry. A random model's letter probes find no letter, so SAEBench's absorption file would have no details:
absorption also runs on the first TopK run check_peers.py trained on SmolLM2 (10 words per letter), whose
probes find every letter. The numbers mean nothing; the field names and structure are the point.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import builtin_documents
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig

VOCAB = 512


def tiny_model(folder: Path) -> Path:
    """A randomly initialized Llama with a byte-level BPE trained on the built-in corpus, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(builtin_documents()[:300], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=0, bos_token_id=0, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def labelled_corpus(path: Path) -> Path:
    """80 short built-in documents with a ``size`` column (long / short) for the probing suite's label task."""
    docs = [(doc[:120], "long" if len(doc) > 600 else "short") for doc in builtin_documents()[300:380]]
    path.write_text("".join(json.dumps({"text": text, "size": label}) + "\n" for text, label in docs))
    return path


def main(peers: Path) -> None:
    torch.set_num_threads(1)
    work = peers / "suites"
    model = tiny_model(work / "model")
    corpus = str(labelled_corpus(work / "labelled.jsonl"))
    spec: dict[str, Any] = {"model": str(model), "dataset": corpus, "layers": "1:3", "ctx_len": 32}
    spec |= {"max_tokens": 2400, "heldout": 0.25, "device": "cpu", "cache_root": str(work)}
    cache = extract.run(ExtractConfig(**spec)).folder.url
    base: dict[str, Any] = {"cache": cache, "latents": 32, "k": 4, "batch_size": 128, "max_tokens": 256}
    base |= {"out": str(work / "saes"), "device": "cpu", "precision": "float32"}
    runs = [fit.run(FitConfig(**base, layer=1)).runs[0].url]
    runs += [fit.run(FitConfig(**base, arch="route", route_layers="1:3")).runs[0].url]
    suites = ["core", "absorption", "probing", "geometry"]
    evaluate.run(
        EvaluateConfig(
            runs=runs,
            metrics=["nmse"],
            suite=suites,
            probe_words=4,
            probe_label="size",
            device="cpu",
            cache_root=str(work),
        )  # fmt: skip
    )
    real = sorted(str(run) for run in (peers / "saes").glob("*-topk-*"))[:1]
    out = str(work / "evaluate")
    evaluate.run(EvaluateConfig(runs=real, metrics=["nmse"], suite=["absorption"], probe_words=10, out=out,
                                 device="cpu", cache_root=str(peers)))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
