"""`python -m pipeline.cli ...` (as torchrun runs it) is `sae-pipe ...`."""

from pipeline.cli import main

main()
