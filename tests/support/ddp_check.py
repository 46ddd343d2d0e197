"""Run under torchrun by test_distributed: a fit, then each rank writes a hash of its members' final weights.

torchrun --nproc_per_node 2 -m tests.support.ddp_check CACHE OUT ddp|spread

``ddp`` fits one SAE (all ranks train it together); ``spread`` a 4-member sweep (whole members per rank).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from pipeline.fit import stage as fit
from pipeline.fit import stage as fit_module
from pipeline.fit.config import FitConfig
from pipeline.infra.distributed import Ranks

real_loop = fit_module._loop


def recording_loop(members: list, *args: object, **kwargs: object) -> fit_module.LoopTime:
    spent = real_loop(members, *args, **kwargs)
    ranks = Ranks.from_env()
    digests = {
        m.folder.name: hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.model.parameters())).hexdigest()
        for m in members
    }
    (Path(sys.argv[2]) / f"rank{ranks.rank}.json").write_text(
        json.dumps({"steps": [m.step for m in members], "weights": digests})
    )
    return spent


def sweep_config(cache: str, out: str, spread: bool) -> FitConfig:
    """The fit both modes run (also run by the test in one process, to compare with)."""
    return FitConfig(
        cache=cache,
        layer=0,
        latents=64,
        k=4,
        batch_size=128,
        max_tokens=6400,
        device="cpu",
        precision="float32",
        out=out,
        sweep={"k": [4, 8], "seed": [0, 1]} if spread else {},
    )


if __name__ == "__main__":
    fit_module._loop = recording_loop
    Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    fit.run(sweep_config(sys.argv[1], str(Path(sys.argv[2]) / "saes"), spread=sys.argv[3] == "spread"))
