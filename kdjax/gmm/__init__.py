"""The Gaussian-mixture distillation study: mixtures, EM, the vectorized sweep, its plots."""
