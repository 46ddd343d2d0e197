"""`sae-pipe finetune`: a trained run trained further inside the running LLM, on the model's own KL or CE."""
