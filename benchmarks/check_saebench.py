"""Validate every SAEBench-format result file that `sae-pipe evaluate --suite` wrote with sae-bench's own
output classes (run with the peers' python, where sae-bench 0.6.0 is installed; `make check-peers`).

  core               sae-bench's CoreEvalOutput (evals/core/eval_output.py), as its own writer builds it
  absorption_first_letter  its AbsorptionEvalOutput (evals/absorption/eval_output.py)
  sparse_probing     its SparseProbingEvalOutput (evals/sparse_probing/eval_output.py)
  sae_pipe_geometry  a family SAEBench does not have: declared here on sae-bench's base classes
                     (BaseEvalOutput, BaseEvalConfig, BaseMetricCategories, BaseMetrics, BaseResultDetail),
                     so their validators (flat metrics, categories of metrics, epoch millis) apply

pydantic ignores fields a class does not declare, so each file's keys are also compared with the fields of
the object it validated into: a misspelled or extra field fails too. With --every-family (`make check-peers`),
each family must also have a file with details somewhere under the roots, the only place a detail's fields
are checked: a suite that skipped every run, or wrote no detail, fails.

    .bench-venv/bin/python benchmarks/check_saebench.py [--every-family] [ROOT ...]   (default: cache/evaluate)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, TypeAdapter
from pydantic.dataclasses import dataclass
from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput
from sae_bench.evals.base_eval_output import (
    BaseEvalConfig,
    BaseEvalOutput,
    BaseMetricCategories,
    BaseMetrics,
    BaseResultDetail,
)
from sae_bench.evals.core.eval_output import CoreEvalOutput
from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput


@dataclass
class GeometryEvalConfig(BaseEvalConfig):
    duplicate_cutoff: float = Field(description="decoder cosine above which two latents are near duplicates")
    quantiles: list[float] = Field(description="quantiles reported for each distribution")


@dataclass
class DecoderMetrics(BaseMetrics):
    max_decoder_cosine_sim_mean: float
    max_decoder_cosine_sim_p10: float
    max_decoder_cosine_sim_p50: float
    max_decoder_cosine_sim_p90: float
    max_decoder_cosine_sim_p99: float


@dataclass
class EncoderMetrics(BaseMetrics):
    max_encoder_cosine_sim_mean: float
    max_encoder_cosine_sim_p10: float
    max_encoder_cosine_sim_p50: float
    max_encoder_cosine_sim_p90: float
    max_encoder_cosine_sim_p99: float


@dataclass
class AlignmentMetrics(BaseMetrics):
    encoder_decoder_cosine_sim_mean: float
    encoder_decoder_cosine_sim_p10: float
    encoder_decoder_cosine_sim_p50: float
    encoder_decoder_cosine_sim_p90: float
    encoder_decoder_cosine_sim_p99: float


@dataclass
class DuplicateMetrics(BaseMetrics):
    frac_near_duplicate: float
    cutoff: float


@dataclass
class GeometryCategories(BaseMetricCategories):
    decoder: DecoderMetrics
    encoder: EncoderMetrics
    encoder_decoder: AlignmentMetrics
    duplicates: DuplicateMetrics


@dataclass
class GeometryDetail(BaseResultDetail):
    index: int
    max_decoder_cosine_sim: float
    nearest_latent: int
    encoder_decoder_cosine_sim: float


@dataclass
class GeometryEvalOutput(BaseEvalOutput[GeometryEvalConfig, GeometryCategories, GeometryDetail]):
    eval_config: GeometryEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: GeometryCategories
    eval_result_details: list[GeometryDetail] = Field(default_factory=list)
    eval_type_id: str = Field(default="sae_pipe_geometry")


SCHEMAS: dict[str, Any] = {
    "core": CoreEvalOutput,
    "absorption_first_letter": AbsorptionEvalOutput,
    "sparse_probing": SparseProbingEvalOutput,
    "sae_pipe_geometry": GeometryEvalOutput,
}


def unknown_fields(doc: dict[str, Any], parsed: Any) -> list[str]:
    """Keys of ``doc`` (top level, metric categories, their metrics, the first detail) the class lacks."""
    known = dataclasses.asdict(parsed)
    bad = [k for k in doc if k not in known]
    for name, metrics in doc.get("eval_result_metrics", {}).items():
        bad += [f"{name}.{k}" for k in metrics if k not in known["eval_result_metrics"].get(name, {})]
    details = doc.get("eval_result_details") or []
    if details:
        bad += [f"details.{k}" for k in details[0] if k not in known["eval_result_details"][0]]
    return bad


def check(path: Path, detailed: set[str]) -> str:
    """One line: what ``path`` validated as, or why not (adds its eval type to ``detailed`` when it has details,
    the only place a detail's field names can be checked)."""
    doc = json.loads(path.read_text())
    schema = SCHEMAS.get(doc.get("eval_type_id"))
    if schema is None:
        return f"FAIL {path}: no schema for eval_type_id {doc.get('eval_type_id')!r}"
    try:
        parsed = TypeAdapter(schema).validate_python(doc)
    except Exception as error:  # pydantic's ValidationError, or a base class's own ValueError
        return f"FAIL {path}: {schema.__name__} refused it: {error}"
    extra = unknown_fields(doc, parsed)
    if extra:
        return f"FAIL {path}: fields {schema.__name__} does not declare: {', '.join(extra)}"
    if parsed.eval_result_details:
        detailed.add(doc["eval_type_id"])
    return f"ok   {path}: {schema.__name__}, {len(parsed.eval_result_details or [])} details"


def main(roots: list[str], every_family: bool = False) -> int:
    files = sorted(f for root in roots for f in Path(root).glob("**/saebench/*/*_eval_results.json"))
    if not files:
        suites = "core,absorption,probing,geometry"
        print(f"no SAEBench result files under {', '.join(roots)}: run `sae-pipe evaluate --suite {suites}`")
        return 1
    detailed: set[str] = set()
    lines = [check(f, detailed) for f in files]
    failed = sum(line.startswith("FAIL") for line in lines)
    missing = [kind for kind in SCHEMAS if every_family and kind not in detailed]
    lines += [f"FAIL no {kind} file with details under {', '.join(roots)}" for kind in missing]
    print("\n".join(lines))
    print(f"{len(files) - failed} of {len(files)} SAEBench result files validate with sae-bench's classes")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="*", default=["cache/evaluate"])
    parser.add_argument("--every-family", action="store_true", help="fail unless each family has a detailed file")
    args = parser.parse_args()
    sys.exit(main(args.roots, args.every_family))
