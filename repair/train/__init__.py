"""Training: the objective, the zero-shot surrogates and the loop."""
