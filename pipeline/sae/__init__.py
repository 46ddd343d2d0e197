"""Sparse autoencoders and nothing else: the interface every architecture implements and its registry
(interface.py), one module per architecture (archs/), their fused kernels, reconstruction quality and the
run folder (cfg.json + sae.safetensors)."""

# Every architecture registers itself (pipeline.sae.interface.register) when its module is imported.
from pipeline.sae import archs  # noqa: F401
