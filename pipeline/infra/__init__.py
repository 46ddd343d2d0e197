"""Shared infrastructure: errors, files and folders (local or fsspec), locks, console output,
params.yaml, device and precision choice, torch.distributed ranks, DVC receipts. Imports nothing
else from the package."""
