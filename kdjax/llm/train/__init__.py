"""Training: the loop, its config, step, state, evaluation, logging, batches, fused heads."""
