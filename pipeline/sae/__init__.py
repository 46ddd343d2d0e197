"""Sparse autoencoders and nothing else: the TopK SAE and RouteSAE modules, the inference-only dense SAEs,
their fused kernels, reconstruction quality and the run folder (cfg.json + sae.safetensors)."""

# Every architecture registers itself (pipeline.sae.interface.register) when its module is imported.
from pipeline.sae import dense, route, topk  # noqa: E402, F401
