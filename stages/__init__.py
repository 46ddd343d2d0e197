"""DVC stages: one thin module per stage, reading params.yaml and calling the pipeline library."""

import os

# The stages report progress themselves; tqdm bars of libraries (GGUF de-quantization) stay quiet.
# tqdm reads this when first imported, which `import torch` already does, so it is set here, first.
os.environ.setdefault("TQDM_DISABLE", "1")
