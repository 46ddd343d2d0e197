"""Stage `interpret`: feature tables, GPT-4o explanations and an HTML report for one run. The
entry point is :func:`pipeline.interpret.stage.run`."""
