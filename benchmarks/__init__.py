"""Side-by-side performance harness: `python -m benchmarks.run` writes benchmarks/RESULTS.md."""
