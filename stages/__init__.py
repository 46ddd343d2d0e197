"""DVC stages: one thin module per stage, reading params.yaml and calling the pipeline library."""
