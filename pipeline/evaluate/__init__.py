"""Stage `evaluate`: reconstruction metrics on held-out rows, and KL / CE with the SAE spliced into
the running LLM. The entry point is :func:`pipeline.evaluate.stage.run`."""
