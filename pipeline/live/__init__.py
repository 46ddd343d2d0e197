"""An SAE inside the running LLM: a run with its model and caches, live routing, and logit effects."""
