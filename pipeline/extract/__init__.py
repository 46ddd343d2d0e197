"""Stage `extract`: corpus -> packed token rows -> one LLM forward -> normalized activations in a
cache. The entry point is :func:`pipeline.extract.stage.run`."""
