"""Helpers shared by the tests: synthetic caches, the import graph, processes killed on cue, a
loopback OpenAI stand-in and the DDP check script run under torchrun."""
