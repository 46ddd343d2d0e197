"""How many tokens SAEBench's LLM forwards take for core, absorption and sparse probing on N SAEs of one layer,
counted from the sae-bench installed here (run in this venv; never imports sae-pipe):

    .bench-venv/bin/python benchmarks/peers/saebench_forwards.py [--saes 6] [--layer 12]

Read from sae-bench 0.6.0's code (the numbers of its configs are imported, the rules below are its code's):
  core (evals/core/main.py)  per SAE, n_eval_reconstruction_batches x batch_size_prompts sequences of
      context_size tokens, each run three times through the whole model (clean, SAE spliced in, zero ablation:
      get_recons_loss), and n_eval_sparsity_variance_batches x batch_size_prompts sequences run to the SAE's
      layer (run_with_cache, stop_at_layer = layer + 1). Two settings: CoreEvalConfig's defaults, and the
      command in the module's own __main__ docstring (200 and 2,000 batches), which its published runs use.
  absorption (evals/absorption)  once per model and layer, the letter probe's data: one in-context prompt per
      alpha token of the vocabulary (get_alpha_tokens; max_icl_examples 10), through the whole model
      (gen_and_save_df_acts_probing: run_with_cache with no stop). Per SAE, the feature absorption
      calculator runs each held-out word the probe calls positive through the whole model again
      (calculate_absorption); counted here as every held-out word (train_test_fraction 0.8), an upper bound.
  sparse_probing (evals/sparse_probing)  once per model and layer with save_activations (its default), else
      per SAE: for each dataset, each chosen class's probe_train_set_size // 2 + probe_test_set_size // 2
      texts (every dataset loader halves the sizes per class), padded to context_length, run to the layer.

The vocabulary and prompt length are SmolLM2-135M's (--vocab-words: its alpha tokens as sae-pipe's
letters.alpha_tokens counts them; --prompt-tokens: sae-pipe's 10-example prompt of SAEBench's template),
since reading them here would need the GGUF reader this venv lacks. Hours at --tok-per-s: SmolLM2-135M's bare
forward on this 2-core CPU, 499-543 tok/s in benchmarks/RESULTS.md's evaluate-speed sections (~880 when quiet).
"""

from __future__ import annotations

import argparse

from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig
from sae_bench.sae_bench_utils.dataset_info import chosen_classes_per_dataset

PUBLISHED_CORE = (200, 2000)  # evals/core/main.py __main__: --n_eval_reconstruction_batches, sparsity_variance
TRAIN_SHARE = 0.8  # evals/absorption/probing.py create_dataset_probe_training's train_test_fraction


def core_tokens(batches: tuple[int, int], batch: int, context: int, layer: int, n_layers: int) -> float:
    """Full-model token forwards of core for one SAE (layer-stopped forwards counted as their share)."""
    reconstruction, sparsity = batches
    return 3 * reconstruction * batch * context + sparsity * batch * context * (layer + 1) / n_layers


def probing_tokens(cfg: SparseProbingEvalConfig, layer: int, n_layers: int) -> tuple[int, float]:
    """Tokens read and their full-model equivalent for sparse probing's activations at one layer."""
    texts = sum(
        len(chosen_classes_per_dataset[name]) * (cfg.probe_train_set_size // 2 + cfg.probe_test_set_size // 2)
        for name in cfg.dataset_names
    )
    tokens = texts * cfg.context_length
    return tokens, tokens * (layer + 1) / n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saes", type=int, default=6, help="SAEs of one layer")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--n-layers", type=int, default=30, help="the model's blocks (SmolLM2-135M: 30)")
    parser.add_argument("--vocab-words", type=int, default=47078, help="alpha tokens of the vocabulary")
    parser.add_argument("--prompt-tokens", type=int, default=87, help="tokens of one 10-example prompt")
    parser.add_argument("--tok-per-s", type=float, default=500, help="whole-model forward speed (RESULTS.md: ~500)")
    args = parser.parse_args()
    core, probing = CoreEvalConfig(), SparseProbingEvalConfig()
    per_sae: dict[str, float] = {}
    for name, batches in (
        ("core, CoreEvalConfig defaults", (core.n_eval_reconstruction_batches, core.n_eval_sparsity_variance_batches)),
        ("core, published runs' settings", PUBLISHED_CORE),
    ):
        per_sae[name] = core_tokens(batches, core.batch_size_prompts, core.context_size, args.layer, args.n_layers)
    probe_data = args.vocab_words * args.prompt_tokens  # once per layer, whole model
    per_sae["absorption, held-out words (upper bound)"] = (1 - TRAIN_SHARE) * probe_data
    read, probing_full = probing_tokens(probing, args.layer, args.n_layers)
    print(f"sae-bench's LLM forwards for {args.saes} SAEs at layer {args.layer} of {args.n_layers} (tokens; 'full' "
          f"= whole-model equivalents, a forward to layer L counting (L + 1) / {args.n_layers}):")  # fmt: skip
    for name, tokens in per_sae.items():
        print(f"  {name:44} per SAE {tokens:>13,.0f} full   x {args.saes} = {tokens * args.saes:>14,.0f}")
    print(f"  {'absorption probe data, once per layer':44} {probe_data:>21,.0f} full")
    print(f"  {'sparse probing, once per layer':44} {read:>21,.0f} read to the layer = {probing_full:,.0f} full")
    print(f"    ({len(probing.dataset_names)} datasets, {probing.context_length} tokens a text; per SAE when "
          "save_activations is off)")  # fmt: skip
    for core_name in [name for name in per_sae if name.startswith("core")]:
        total = args.saes * (per_sae[core_name] + per_sae["absorption, held-out words (upper bound)"])
        total += probe_data + probing_full
        hours = total / args.tok_per_s / 3600
        speed = f"{hours:.1f} h at {args.tok_per_s:g} tok/s"
        print(f"total with {core_name}: {total:,.0f} full-model token forwards, {speed}")


if __name__ == "__main__":
    main()
