"""sae-pipe: run an LLM once into a sharded activation cache, then train many SAEs from it."""

__version__ = "0.1.0"
