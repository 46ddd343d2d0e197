"""One module per SAE architecture; each registers itself (pipeline.sae.interface.register) on import."""

from pipeline.sae.archs import batchtopk, gated, jumprelu, matryoshka, relu, route, topk, transcoder  # noqa: F401
