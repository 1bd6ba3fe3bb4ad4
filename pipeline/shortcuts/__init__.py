"""Is the classifier cheating? Counterfactual probes (colour, texture, shape) and their verdicts."""
