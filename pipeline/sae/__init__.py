"""Sparse autoencoders: the TopK SAE and RouteSAE modules, their fused kernels, the run folder
(cfg.json + sae.safetensors), loading a run with its cache for downstream stages, and export."""
