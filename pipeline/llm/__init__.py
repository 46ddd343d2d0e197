"""The language model: loading (hub id, folder, GGUF, built-in SmolLM2), the hub's offline cache,
block discovery for any architecture, and the layer hooks every stage uses."""
