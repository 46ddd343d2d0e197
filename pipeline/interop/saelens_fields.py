"""Every field a SAELens checkpoint's config can hold, and what `sae-pipe import` does with each.

Read from sae-lens 6.54.12 (its SAEConfig, architecture and training configs, SAEMetadata, and the runner
fields that versions before 6 saved flat into cfg.json) and transformer-lens 3.9.0 (the model keywords).
A field in no table is refused by :func:`pipeline.interop.saelens.read_saelens`: it could change what the SAE
computes.
"""

from __future__ import annotations

OWN = "sae_pipe_normalization"  # sae-pipe's exports record their exact normalization in metadata
APPLIED = frozenset(  # read by read_saelens: mapped exactly, or refused for a value without an exact equivalent
    {
        "architecture", "d_in", "d_sae", "k", "activation_fn", "activation_fn_str", "activation_fn_kwargs",
        "apply_b_dec_to_input", "rescale_acts_by_decoder_norm", "normalize_activations", "reshape_activations",
        "hook_name", "hook_point", "hook_layer", "hook_point_layer", "hook_head_index", "hook_point_head_index",
        "hook_name_out", "hook_head_index_out", "hf_hook_name", "hf_hook_name_out", "model_name",
        "model_class_name", "model_from_pretrained_kwargs", "model_kwargs", "finetuning_scaling_factor", "dtype",
        "metadata", "sae_lens_version", "context_size", OWN,
    }
)  # fmt: skip
TRAINING = frozenset(  # how the weights were found (losses, optimizer, schedules, init, dead-latent upkeep,
    # checkpoints, logging): their effect is in the stored weights; SAELens's inference forward never reads them
    {
        "l1_coefficient", "lp_norm", "l1_warm_up_steps", "l0_coefficient", "l0_warm_up_steps", "target_l0",
        "pre_act_loss_coefficient", "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
        "jumprelu_tanh_scale", "jumprelu_ste_to_input", "aux_loss_coefficient", "decoder_init_norm",
        "b_dec_init_method", "expansion_factor", "from_pretrained_path", "lr", "lr_scheduler_name",
        "lr_warm_up_steps", "lr_end", "lr_decay_steps", "n_restart_cycles", "adam_beta1", "adam_beta2",
        "train_batch_size", "train_batch_size_tokens", "training_tokens", "total_training_tokens",
        "use_ghost_grads", "feature_sampling_window", "feature_sampling_method", "resample_batches",
        "feature_reinit_scale", "dead_feature_window", "dead_feature_estimation_method", "dead_feature_threshold",
        "mse_loss_normalization", "scale_sparsity_penalty_by_decoder_norm", "decoder_heuristic_init",
        "init_encoder_as_decoder_transpose", "normalize_sae_decoder", "noise_scale", "decoder_orthogonal_init",
        "n_checkpoints", "checkpoint_path", "save_final_checkpoint", "output_path", "resume_from_checkpoint",
        "log_to_wandb", "wandb_project", "wandb_entity", "wandb_id", "wandb_log_frequency",
        "eval_every_n_wandb_logs", "logger", "run_name", "n_eval_batches", "eval_batch_size_prompts", "hook_eval",
        "hook_point_eval", "n_batches_for_norm_estimate", "sae_lens_training_version", "seed", "verbose",
        # the trainer of an SAE saved in inference form (BatchTopK, Matryoshka BatchTopK as jumprelu) and its settings
        "training_architecture", "training_architecture_details",
        # what SAETrainer.fit records of the trained SAE at its end (the last batch's L0, its dead count): facts
        "l0", "num_dead_features",
    }
)  # fmt: skip
DATA = frozenset(  # which text fed the model while training (dataset, packing, BOS, special tokens, positions):
    # the map from an activation to a code and back does not read them; kept in source_cfg.json. sae-pipe feeds
    # its own packed rows and skips special-token positions in every metric.
    {
        "dataset_path", "dataset_trust_remote_code", "streaming", "is_dataset_tokenized", "use_cached_activations",
        "cached_activations_path", "prepend_bos", "exclude_special_tokens", "seqpos_slice", "use_chat_formatting",
        "disable_concat_sequences", "sequence_separator_token", "activations_mixing_fraction",
        "n_batches_in_buffer", "store_batch_size", "store_batch_size_prompts", "tokens_per_buffer",
    }
)  # fmt: skip
RUNTIME = frozenset(  # where and how fast SAELens ran (our SAE computes in float32 on the device asked for)
    {
        "device", "llm_device", "act_store_device", "prefetch_llm_batches", "autocast", "autocast_lm",
        "compile_llm", "llm_compilation_mode", "compile_sae", "sae_compilation_mode", "use_sparse_activations",
    }
)  # fmt: skip
LABELS = frozenset({"neuronpedia_id", "exported_by", "sae_pipe_cache_key"})  # names and provenance only
KNOWN = APPLIED | TRAINING | DATA | RUNTIME | LABELS
# TransformerLens's from_pretrained(_no_processing) keywords that leave the residual stream between blocks as it is:
# fold_ln moves LayerNorm gains into the next layer, center_unembed shifts all logits by one constant,
# fold_value_biases moves value biases into the output bias (attention weights sum to 1),
# refactor_factored_attn_matrices re-factors W_Q W_K^T and W_V W_O keeping the products; the rest choose the
# device, precision, context and tokenizer defaults. center_writing_weights is applied; any other keyword
# (revision, checkpoint_index, checkpoint_value: other weights of the model) is refused.
SAME_STREAM = frozenset(
    {
        "fold_ln", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices", "device", "n_devices",
        "move_to_device", "dtype", "torch_dtype", "default_prepend_bos", "default_padding_side", "first_n_layers",
        "n_ctx", "trust_remote_code",
    }
)  # fmt: skip
CENTRE = "center_writing_weights"
# Hugging Face model types (config.model_type) whose architecture TransformerLens 3.9 loads with LayerNorm ("LN"),
# so that it centres their writing weights when asked; it leaves an RMSNorm model (no mean removed anywhere) as is.
TL_LAYER_NORM = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "gptj": "GPTJForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "phi": "PhiForCausalLM",
    "olmo": "OlmoForCausalLM",
}
# SAELens's pretrained registry (pretrained_saes.yaml) overrides these repos' configs with center_writing_weights
# true; their own cfg.json files do not say it.
REGISTRY_CENTRED = frozenset(
    {"jbloom/GPT2-Small-SAEs-Reformatted", "jbloom/GPT2-Small-Feature-Splitting-Experiment-Layer-8"}
)
