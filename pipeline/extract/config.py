"""The settings of `sae-pipe extract` (params.yaml: model, data, extract), one doc per field."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.infra import settings
from pipeline.infra.params import setting


@dataclass
class ExtractConfig:
    """Everything `sae-pipe extract` needs; every field also lives in params.yaml."""

    model: str = setting("smollm2-135m", "built-in alias, .gguf file, model folder or hub id")
    revision: str | None = setting(None, "hub revision of the model")
    dataset: str = setting("builtin", '"builtin", a hub dataset id or a local file/folder')
    split: str = setting("train", "dataset split")
    text_column: str = setting("text", "column with the document text")
    dataset_config: str | None = setting(None, "hub dataset configuration name")
    layers: str = setting("12", "6 | 3,7,11 | 3:11 | all | route")
    sites: str = setting("resid", "resid, plus mlp_in and/or mlp_out (an MLP's input and output: transcoders)")
    ctx_len: int = setting(256, "tokens per packed sequence")
    max_tokens: int = setting(20_000, "stored rows in total (0 = the whole corpus)")
    batch_size: int = setting(8, "sequences per forward pass")
    normalize: str = setting("standardize", "standardize | scale | none")
    dtype: str = setting("float16", "stored dtype: float16 | float32 | int8 (1 byte per value + a scale per token)")
    backend: str = setting("zarr", "zarr | memmap")
    heldout: float = setting(0.05, "share of sequences held out from training")
    shard_mb: float = setting(256.0, "target size of one shard")
    cache_root: str = settings.cache_root()
    device: str = settings.device()
    compute_dtype: str = setting("auto", "model precision: auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16")
    trust_remote_code: bool = setting(False, "allow model code from the hub (off unless you trust it)")
