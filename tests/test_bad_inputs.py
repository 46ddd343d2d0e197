"""Every user error the CLI can meet: one clear message, the documented exit code, no traceback.

The table below is the source of truth; the README's "When something is wrong" table must list every
message in it (checked at the end).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.interop.importing import import_checkpoint
from tests.support.caches import synthetic_cache
from tests.support.foreign import bad_checkpoints

ROOT = Path(__file__).resolve().parents[1]

# (name, argv with {placeholders}, exit code, message fragment as written in the README table)
CASES = [
    ("unknown model", "extract --model nope/x/y", 2, "is neither a model folder, a .gguf file, a built-in"),
    ("missing .gguf", "extract --model missing.gguf", 2, "does not exist; give an existing .gguf file"),
    (
        "layer out of range",
        "extract --model {tiny} --layers 9",
        2,
        "out of range for a 4-block model; valid layers are 0..3",
    ),
    ("bad layer spec", "extract --model {tiny} --layers x", 2, "cannot read layer spec"),
    ("unknown backend", "extract --backend hdf5", 2, "unknown backend 'hdf5'"),
    ("unknown normalization", "extract --normalize l2", 2, "unknown normalization 'l2'"),
    ("bad ctx-len", "extract --ctx-len 1", 2, "--ctx-len 1 is out of range"),
    (
        "ctx-len beyond the model",
        "extract --model {tiny} --layers 1 --ctx-len 1024",
        2,
        "is longer than the 512 positions model",
    ),
    ("no GPU", "extract --device cuda", 2, "asked for a GPU, but torch sees none"),
    (
        "missing dataset",
        "extract --model {tiny} --layers 1 --dataset /no/such.jsonl",
        2,
        "does not exist: give a local file or folder",
    ),
    (
        "missing text column",
        "extract --model {tiny} --layers 1 --dataset {jsonl} --text-column body",
        2,
        "has no column 'body'; its columns are",
    ),
    ("corpus too small", "extract --model {tiny} --layers 1 --dataset {small} --ctx-len 64", 2, "yields no rows"),
    ("missing params file", "extract --params {tmp}/none.yaml", 2, "does not exist"),
    ("typo in params", "extract --params {badparams}", 2, "has unknown key(s) layer"),
    ("not a cache", "cache info {tmp}", 2, "is not an activation cache (no manifest.json)"),
    ("corrupt cache", "cache verify {corrupt}", 4, "fails its checksums"),
    ("fit on a corrupt cache", "fit --cache {flipped} --k 4 --batch-size 128 --out {tmp}/f", 4, "its checksums"),
    ("fit without cache", "fit", 2, "no cache given: pass --cache"),
    ("activations in another dtype", "fit --cache {mixed} --k 4 --batch-size 128", 4, "manifest says float16"),
    ("incomplete cache", "fit --cache {incomplete}", 3, "is incomplete"),
    ("layer not cached", "fit --cache {cache} --layer 2", 2, "is not in cache"),
    ("route on one layer", "fit --cache {cache} --arch route", 2, "RouteSAE needs a multi-layer cache"),
    ("routed layers not cached", "fit --cache {edges} --arch route", 2, "(n/4..3n/4) by default, but cache"),
    ("k too large", "fit --cache {cache} --k 300 --latents 256", 2, "must be between 1 and the number of latents"),
    ("bad sweep", "fit --cache {cache} --sweep batch_size=1,2", 2, "bad --sweep"),
    (
        "resume, nothing to resume",
        "fit --cache {cache} --latents 128 --k 4 --out {tmp}/none --resume",
        2,
        "no unfinished run to continue",
    ),
    ("not a run", "evaluate {tmp}", 2, "is not an SAE run folder (no cfg.json)"),
    ("unknown metric", "evaluate {run} --metrics mse", 2, "unknown metric(s)"),
    ("budget beyond held-out", "evaluate {run} --max-tokens 100000000", 2, "held-out tokens of cache"),
    ("nothing held out", "evaluate {unheld} --metrics nmse", 2, "has no held-out tokens to evaluate on"),
    ("infer-k too large", "evaluate {run} --infer-k 128", 2, "--infer-k 128 must be between 1 and 127"),
    ("KL of a soft-routed run", "evaluate {soft}", 2, "uses soft routing: its reconstruction mixes layers"),
    ("unknown splice", "evaluate {run} --splice exact", 2, "unknown --splice 'exact'"),
    ("unknown model precision", "evaluate {run} --compute-dtype fp8", 2, "unknown --compute-dtype 'fp8'"),
    ("interpret: empty explainer model", "interpret {run} --explainer-model=", 2, "--explainer-model is empty"),
    ("probe words not positive", "evaluate {run} --probe-words=-3", 2, "--probe-words -3 must be at least 1"),
    ("negative probe tokens", "evaluate {run} --probe-tokens=-1", 2, "--probe-tokens -1 must be 0 (all rows)"),
    (
        "probe label without a JSONL corpus",
        "evaluate {run} --suite probing --probe-label topic",
        2,
        "--probe-label reads a JSONL corpus file",
    ),
    ("bad batch size", "interpret {run} --batch-size 0", 2, "--batch-size 0 must be at least 1"),
    ("interpret: --score with no test share", "interpret {run} --score detection --test-share 0", 2, "keeps none"),
    ("interpret: test share out of range", "interpret {run} --test-share 1", 2, "--test-share 1.0 must be in [0, 1)"),
    ("interpret: NaN setting", "interpret {run} --max-cost nan", 2, "--max-cost nan must be 0 or more"),
    ("interpret: too few resamples", "interpret {run} --bootstrap 0", 2, "--bootstrap 0 must be between 100 and"),
    ("interpret: fuzzing threshold", "interpret {run} --fuzz-threshold 0", 2, "--fuzz-threshold 0.0 must be in (0, 1]"),
    ("interpret: hard share", "interpret {run} --score-hard 1.5", 2, "--score-hard 1.5 must be in [0, 1]"),
    (
        "interpret: nothing to score on",
        "interpret {run} --score detection --max-tokens 10",
        2,
        "so none can go to the scorers",
    ),
    ("unknown explainer", "interpret {run} --explainer claude", 2, "unknown explainer 'claude'"),
    ("unknown scorer", "interpret {run} --score detection,simulation", 2, "unknown scorer(s) simulation"),
    ("estimate above --max-cost", "interpret {run} --score detection --max-cost 0.00001", 2, "is above --max-cost"),
    ("steer: latent out of range", "steer {run} --feature 500=scale:0 --prompt hi", 2, "latent 500 is out of range"),
    ("steer: unknown edit kind", "steer {run} --feature 5=boost:2 --prompt hi", 2, "unknown edit kind 'boost'"),
    ("steer: strength not finite", "steer {run} --feature 5=add:nan --prompt hi", 2, "must be a finite number"),
    ("steer: soft-routed run", "steer {soft} --feature 5=scale:0 --prompt hi", 2, "uses soft routing: its code mixes"),
    (
        "steer: evaluated latent out of range",
        "steer {run} --evaluate --eval-feature 500",
        2,
        "--eval-features [500] out of range",
    ),
    (
        "steer: sampling at temperature 0",
        "steer {run} --feature 5=add:2 --prompt hi --sample --temperature 0",
        2,
        "--temperature 0 cannot sample",
    ),
    (
        "steer: sampling at temperature NaN",
        "steer {run} --feature 5=add:2 --prompt hi --sample --temperature nan",
        2,
        "--temperature nan cannot sample",
    ),
    ("steer: negative seed", "steer {run} --feature 5=add:2 --prompt hi --seed=-1", 2, "--seed -1 is out of range"),
    (
        "steer: no new tokens",
        "steer {run} --feature 5=add:2 --prompt hi --max-new-tokens 0",
        2,
        "--max-new-tokens must be at least 1",
    ),
    ("steer: empty prompt", "steer {run} --feature 5=add:2 --prompt=", 2, "--prompt is empty"),
    ("steer: empty prompts file", "steer {run} --feature 5=add:2 --prompts-file {steer_empty}", 2, "holds no prompt"),
    (
        "steer: prompts file not UTF-8",
        "steer {run} --feature 5=add:2 --prompts-file {steer_latin1}",
        2,
        "is not UTF-8 text",
    ),
    (
        "steer: negative position",
        "steer {run} --feature 5=add:2 --prompt hi --positions=-1",
        2,
        "positions count from 0",
    ),
    (
        "steer: position past the text",
        "steer {run} --feature 5=add:2 --prompt hi --positions 40 --max-new-tokens 3",
        2,
        "edits no position of the prompt",
    ),
    (
        "steer: generated positions, one new token",
        "steer {run} --feature 5=add:2 --prompt hi --positions generated --max-new-tokens 1",
        2,
        "edits no position of the prompt",
    ),
    (
        "steer: edit overflows the model",
        "steer {run} --feature 5=add:1e308 --prompt hi",
        2,
        "overflows the model's numbers",
    ),
    (
        "steer: feature table not parquet",
        "steer {run} --feature 5=add:2 --prompt hi --feature-table {badparams}",
        2,
        "is not a parquet file",
    ),
    (
        "steer: evaluation prompt is the selection prompt",
        "steer {run} --evaluate --prompts-file {steer_selection}",
        2,
        "the prompt features are selected on by output score",
    ),
    (
        "steer: evaluated latent without output score",
        "steer {run} --evaluate --eval-feature 7 --feature-table {steer_table}",
        2,
        "has no output score in the run's feature table",
    ),
    (
        "steer: evaluated strength not finite",
        "steer {run} --evaluate --strength nan",
        2,
        "--strengths must list finite numbers",
    ),
    ("steer: NaN max-cost", "steer {run} --evaluate --max-cost nan", 2, "--max-cost nan must be a finite number"),
    ("steer: negative max-cost", "steer {run} --evaluate --max-cost=-1", 2, "--max-cost -1 must be a finite number"),
    ("steer: no features to evaluate", "steer {run} --evaluate --n-features 0", 2, "--n-features must be at least 1"),
    (
        "steer: --out holds something else",
        "steer {run} --evaluate --eval-feature 3 --out {full}",
        2,
        "is not a steering result",
    ),
    ("unknown export format", "export {run} --format onnx --out {tmp}/x", 2, "unknown export format 'onnx'"),
    ("export RouteSAE", "export {route} --format saelens --out {tmp}/y", 2, "RouteSAEs cannot be exported"),
    ("export into a full folder", "export {run} --format sparsify --out {full}", 2, "exists and is not empty"),
    (
        "export: sparsify of a non-TopK SAE",
        "export {imported} --format sparsify --out {tmp}/z",
        2,
        "sparsify holds TopK SAEs only",
    ),
    ("fit: inference-only architecture", "fit --cache {cache} --arch relu", 2, "is inference-only here"),
    ("import: not a checkpoint", "import {empty} --model {tiny}", 2, "holds no SAE checkpoint"),
    (
        "import: neither folder nor repo id",
        "import /no/such/dir",
        2,
        "is neither a checkpoint folder nor a hub repo id",
    ),
    ("import: hub download fails", "import nobody/none", 2, "cannot download 'nobody/none' from the hub"),
    ("import: unknown format", "import {good_sl} --format onnx", 2, "unknown --format 'onnx'"),
    ("import: other format", "import {good_sl} --format sparsify", 2, "is a saelens checkpoint, not sparsify"),
    ("import: bad config", "import {badjson}", 2, "is not a readable JSON config"),
    ("import: incomplete config", "import {nodin}", 2, "lacks d_in, d_sae"),
    ("import: missing tensor", "import {no_bdec}", 2, "lacks tensor(s) b_dec"),
    ("import: unknown tensor", "import {extra}", 2, "that sae-pipe does not know how to apply"),
    ("import: wrong shape", "import {shape}", 2, "but its config implies (64, 128)"),
    ("import: unknown architecture", "import {arch}", 2, "has architecture 'batchtopk'; sae-pipe imports"),
    ("import: non-residual hook", "import {mlp}", 2, "which is not the residual stream between blocks"),
    ("import: attention heads", "import {hookz}", 2, "reads attention heads (hook_z)"),
    ("import: non-block hookpoint", "import {mlpsp}", 2, "which is not a block's output"),
    ("import: NaN weights", "import {nan}", 2, "holds NaN or infinite values"),
    ("import: pickle", "import {pickle}", 2, "(a pickle) instead of sae_weights.safetensors"),
    ("import: renamed pickle", "import {renamed}", 2, "is not a safetensors file"),
    ("import: unmapped normalization", "import {cnr}", 2, "which has no exact equivalent in sae-pipe"),
    ("import: scaling factor missing", "import {avg}", 2, "but has no scaling factor"),
    ("import: transcoder", "import {transcoder}", 2, "is a transcoder (transcode: true)"),
    ("import: skip connection", "import {skip}", 2, "is an SAE with a skip connection"),
    ("import: model mismatch", "import {gpt2} --model {tiny}", 2, "was trained on 'gpt2', not"),
    ("import: no model named", "import {nomodel}", 2, "names no model; pass --model"),
    ("import: several SAEs", "import {several}", 2, "choose one with --hookpoint"),
    ("import: width mismatch", "import {narrow}", 2, "it belongs to another model"),
    ("import: last block's output", "import {last}", 2, "the output of the last block"),
    ("import into a full folder", "import {good_sl} --out {full}", 2, "exists and is not empty"),
    (
        "import: hookpoint not there",
        "import {several} --hookpoint c",
        2,
        "has no SAE at --hookpoint 'c'; it holds a, b",
    ),
    (
        "import: sparsify hookpoint not there",
        "import {sprun} --hookpoint layers.2",
        2,
        "has no SAE at --hookpoint 'layers.2'; it holds layers.0",
    ),
    ("import: non-numeric size", "import {textdin}", 2, "is 'wide', not a whole number"),
    ("import: fractional k", "import {halfk}", 2, "is 8.5, not a whole number"),
    ("import: sparsify fractional k", "import {sphalfk}", 2, "is 2.5, not a whole number"),
    ("import: size not positive", "import {zerosae}", 2, "is 0; it must be at least 1"),
    ("import: unknown config field", "import {unknownfield}", 2, "that sae-pipe does not know for SAELens"),
    ("import: model loaded otherwise", "import {revision}", 2, "loaded its model with revision"),
    ("import: centring not stated", "import {uncentred}", 2, "does not say whether its GPT2LMHeadModel was loaded"),
    ("imported run without a cache", "evaluate {imported}", 2, "was imported and has no activation cache of its own"),
    ("imported run, cache it cannot read", "evaluate {imported} --cache {cache} --metrics nmse", 2, "cannot read:"),
    ("hand-edited k of an imported SAE", "evaluate {badk}", 2, "k=-1 must be between 0 and the number of latents"),
    ("imported run, other model's cache", "evaluate {imported} --cache {synthetic}", 2, "give a cache of that model"),
    ("circuit: no run", "circuit --task sva", 2, "no run given: pass one SAE run folder per layer"),
    ("circuit: RouteSAE run", "circuit {route}", 2, "circuits are found over single-layer runs"),
    ("circuit: runs of two models", "circuit {run} {synthrun}", 2, "the runs come from caches of different models"),
    ("circuit: two runs at one layer", "circuit {run} {run}", 2, "give one run per layer"),
    ("circuit: layer without a run", "circuit {run} --layers 3", 2, "have no run among those given"),
    ("circuit: unknown method", "circuit {run} --method mask,shap", 2, "unknown --method shap"),
    ("circuit: unknown ablation", "circuit {run} --ablation resample", 2, "unknown --ablation 'resample'"),
    ("circuit: seeds without the mask", "circuit {run} --method ig --seeds 0,1", 2, "re-runs the mask method"),
    ("circuit: negative lambda", "circuit {run} --lambdas=-1", 2, "must be one or more finite non-negative"),
    ("circuit: not a number list", "circuit {run} --lambdas x", 2, "must be comma-separated floats"),
    ("circuit: zero steps", "circuit {run} --steps 0", 2, "--sizes must be at least 1"),
    ("circuit: bad test share", "circuit {run} --test-share 1", 2, "--test-share 1.0 must each be between 0 and 1"),
    ("circuit: NaN test share", "circuit {run} --test-share nan", 2, "--test-share nan must each be between 0 and 1"),
    ("circuit: shares leave no train pairs", "circuit {run} --val-share 0.5", 2, "leave pairs to train on"),
    ("circuit: NaN lambda", "circuit {run} --lambdas nan", 2, "must be one or more finite non-negative numbers"),
    ("circuit: infinite lambda", "circuit {run} --lambdas 0.01,inf", 2, "must be one or more finite non-negative"),
    ("circuit: negative t-max", "circuit {run} --t-max -5", 2, "--t-max -5.0 must be a finite number of at least 1"),
    ("circuit: NaN t-max", "circuit {run} --t-max nan", 2, "--t-max nan must be a finite number of at least 1"),
    ("circuit: infinite t-max", "circuit {run} --t-max inf", 2, "--t-max inf must be a finite number of at least 1"),
    ("circuit: negative lr", "circuit {run} --lr -1", 2, "--lr -1.0 must be a finite number above 0"),
    ("circuit: zero lr", "circuit {run} --lr 0", 2, "--lr 0.0 must be a finite number above 0"),
    ("circuit: NaN lr", "circuit {run} --lr nan", 2, "--lr nan must be a finite number above 0"),
    ("circuit: negative steps", "circuit {run} --steps -3", 2, "--sizes must be at least 1"),
    ("circuit: zero ig steps", "circuit {run} --ig-steps 0", 2, "--sizes must be at least 1"),
    ("circuit: zero size", "circuit {run} --sizes 0,5", 2, "--sizes must be at least 1"),
    ("circuit: negative min gap", "circuit {run} --min-gap -1", 2, "--min-gap -1.0 must be a finite number"),
    ("circuit: NaN min gap", "circuit {run} --min-gap nan", 2, "--min-gap nan must be a finite number"),
    ("circuit: unknown task", "circuit {run} --task parity", 2, "unknown task 'parity'"),
    ("circuit: task the tokenizer cannot take", "circuit {run} --task ioi", 2, "yields only 0 pair(s) whose answers"),
    ("circuit: missing task file", "circuit {run} --task {tmp}/none.jsonl", 2, "does not exist; give sva, ioi, code"),
    ("circuit: task line not JSON", "circuit {run} --task {task_notjson}", 2, "is not a JSON object; each line holds"),
    (
        "circuit: task line lacks a field",
        "circuit {run} --task {task_nofield}",
        2,
        "lacks the text field(s) patch_answer",
    ),
    ("circuit: multi-token answer", "circuit {run} --task {task_long}", 2, "is 3 tokens, not one"),
    ("circuit: prefixes of two lengths", "circuit {run} --task {task_unequal}", 2, "they must be equally long"),
    ("circuit: the same answer twice", "circuit {run} --task {task_same}", 2, "are the same token"),
    ("circuit: one-pair task file", "circuit {run} --task {task_one}", 2, "and test splits need at least 3"),
    ("circuit: empty prefix", "circuit {run} --task {task_noprefix}", 2, ":2: clean_prefix is empty; give both"),
    ("circuit: blank prefixes", "circuit {run} --task {task_blank}", 2, "clean_prefix and patch_prefix are empty"),
    ("circuit: non-UTF-8 task file", "circuit {run} --task {task_latin1}", 2, "is not UTF-8 text (byte"),
]

GOOD_PAIR = {"clean_prefix": "The pilot", "patch_prefix": "The pilots", "clean_answer": " is", "patch_answer": " are"}
TASK_FILES = {  # a good line, then the bad one (the tiny tokenizer: " were" is 3 tokens, "The cats" one more)
    "task_notjson": "not json",
    "task_nofield": json.dumps({k: v for k, v in GOOD_PAIR.items() if k != "patch_answer"}),
    "task_long": json.dumps({**GOOD_PAIR, "patch_answer": " were"}),
    "task_unequal": json.dumps({**GOOD_PAIR, "clean_prefix": "The cat", "patch_prefix": "The cats"}),
    "task_same": json.dumps({**GOOD_PAIR, "patch_answer": " is"}),
    "task_one": "",
    "task_noprefix": json.dumps({**GOOD_PAIR, "clean_prefix": ""}),
    "task_blank": json.dumps({**GOOD_PAIR, "clean_prefix": " ", "patch_prefix": "\t"}),
}


def steer_files(tmp: Path) -> dict[str, str]:
    """Files for the steer cases: empty and non-UTF-8 prompt files, the output-score prompt, and a feature table
    whose latent 7 never fired (no output score)."""
    (tmp / "steer_empty").write_text("\n \n")
    (tmp / "steer_latin1").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    (tmp / "steer_selection").write_text("I think that\n")
    table = {"latent": [3, 7], "max_act": [2.0, 0.0], "output_score": [0.5, None]}
    pq.write_table(pa.table(table), tmp / "steer_table")
    return {name: str(tmp / name) for name in ("steer_empty", "steer_latin1", "steer_selection", "steer_table")}


@pytest.fixture(scope="module")
def places(tiny_llama: Path, jsonl_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad")
    base = {"model": str(tiny_llama), "ctx_len": 32, "max_tokens": 1200, "cache_root": str(tmp), "device": "cpu"}
    cache = extract.run(ExtractConfig(**base, layers="1", backend="memmap")).folder
    multi = extract.run(ExtractConfig(**base, layers="1,3")).folder
    out = str(tmp / "saes")
    run = fit.run(FitConfig(cache=cache.url, latents=128, k=4, batch_size=256, out=out, device="cpu")).runs[0]
    route = fit.run(
        FitConfig(cache=multi.url, arch="route", latents=128, k=4, batch_size=256, out=out, device="cpu")
    ).runs[0]
    soft = fit.run(
        FitConfig(cache=multi.url, arch="route", routing="soft", latents=128, k=4, batch_size=256, out=out)
    ).runs[0]
    edges = extract.run(
        ExtractConfig(**{**base, "max_tokens": 300}, layers="0,3")
    ).folder  # one layer of the 1..3 route range
    unheld_cache = extract.run(ExtractConfig(**base, layers="1", heldout=0.0)).folder
    unheld = fit.run(FitConfig(cache=unheld_cache.url, latents=128, k=4, batch_size=256, out=out, device="cpu")).runs[0]
    corrupt = tmp / "corrupt"
    shutil.copytree(cache.local(), corrupt)
    act = corrupt / "shards" / "000000" / "train" / "act.npy"
    act.write_bytes(act.read_bytes()[:-16])
    flipped = tmp / "flipped"
    shutil.copytree(cache.local(), flipped)
    values = np.load(flipped / "shards" / "000000" / "train" / "act.npy", mmap_mode="r+")  # (L, n, D)
    values[:, 0, 0] += 1  # every layer's first row: whole size, wrong bytes
    values.flush()
    mixed = tmp / "mixed"
    shutil.copytree(cache.local(), mixed)
    mixed_act = mixed / "shards" / "000000" / "train" / "act.npy"
    np.save(mixed_act, np.load(mixed_act).astype(np.int8))  # an int8 shard in a float16 cache's folder
    incomplete = tmp / "incomplete"
    shutil.copytree(cache.local(), incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "status": "in_progress"}))
    (tmp / "small.txt").write_text("Too short.")
    (tmp / "bad.yaml").write_text("extract:\n  layer: 3\n")
    (tmp / "full").mkdir()
    (tmp / "full" / "mine.txt").write_text("keep me")
    checkpoints = bad_checkpoints(tmp / "checkpoints", str(tiny_llama))
    imported = import_checkpoint(checkpoints["jumprelu"], cache_root=str(tmp))
    synthetic = synthetic_cache(tmp / "synthetic", [200], layers=(1,), d=64)
    badk = tmp / "badk"
    shutil.copytree(imported.local(), badk)
    edited = json.loads((badk / "cfg.json").read_text())
    (badk / "cfg.json").write_text(json.dumps({**edited, "sae": {**edited["sae"], "k": -1}}))
    synthrun = fit.run(FitConfig(cache=synthetic.url, latents=128, k=4, batch_size=64, out=out, device="cpu")).runs[0]
    for name, line in TASK_FILES.items():
        (tmp / f"{name}.jsonl").write_text(json.dumps(GOOD_PAIR) + "\n" + line + "\n")
    latin1 = json.dumps({**GOOD_PAIR, "clean_prefix": "Caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    (tmp / "task_latin1.jsonl").write_bytes(latin1)
    return {
        **{name: str(tmp / f"{name}.jsonl") for name in TASK_FILES},
        "task_latin1": str(tmp / "task_latin1.jsonl"),
        "synthrun": synthrun.url,
        **checkpoints,
        "imported": imported.url,
        "synthetic": synthetic.url,
        "badk": str(badk),
        "tiny": str(tiny_llama),
        "jsonl": str(jsonl_corpus),
        "small": str(tmp / "small.txt"),
        "badparams": str(tmp / "bad.yaml"),
        "tmp": str(tmp),
        "cache": cache.url,
        "corrupt": str(corrupt),
        "flipped": str(flipped),
        "incomplete": str(incomplete),
        "mixed": str(mixed),
        "run": run.url,
        "route": route.url,
        "soft": soft.url,
        "edges": edges.url,
        "unheld": unheld.url,
        "full": str(tmp / "full"),
        **steer_files(tmp),
    }


@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_user_error(
    name: str,
    argv: str,
    code: int,
    message: str,
    places: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(places["tmp"])  # commands without --cache-root write under ./cache: not the checkout's
    monkeypatch.setenv("OPENAI_API_KEY", "sk-bad-inputs")  # interpret would ask; nothing listens on port 9
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setattr(sys, "argv", ["sae-pipe", *argv.format(**places).split()])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert exit_info.value.code == code, err
    assert flat.count("error:") == 1 and message in flat.split("error:", 1)[1], err
    assert "Traceback" not in err and "╭" not in err


def test_readme_lists_every_error() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    table = readme.split("When something is wrong", 1)[1]
    for name, _, code, message in CASES:
        row = re.search(rf"\| {re.escape(name)} \|[^|]*\| {code} \|[^|]*{re.escape(message)}", table)
        assert row, f"README table lacks: {name} / exit {code} / {message}"


def test_a_bad_probe_label_fails_before_any_run_is_evaluated(
    places: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The label column is checked up front: no metrics.json of a half-done evaluation is left behind."""
    out = Path(places["tmp"]) / "probe-label-out"
    argv = f"evaluate {places['run']} --metrics nmse --suite probing --probe-label topic --out {out}"
    monkeypatch.setattr(sys, "argv", ["sae-pipe", *argv.split()])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2, capsys.readouterr().err
    assert not out.exists()
