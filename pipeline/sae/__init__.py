"""Sparse autoencoders and nothing else: the TopK SAE and RouteSAE modules, the inference-only dense SAEs,
their fused kernels, reconstruction quality and the run folder (cfg.json + sae.safetensors)."""
