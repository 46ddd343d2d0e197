"""`sae-pipe circuit`: the few SAE latents a task needs, found with learned binary masks (and gradient
attributions to compare against), measured on a held-out split."""
