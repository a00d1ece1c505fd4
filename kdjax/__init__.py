"""kdjax: knowledge distillation for generative models, in JAX.

Subpackages: `kdjax.gmm` (the Gaussian-mixture study), `kdjax.llm` (the SmolLM2 study),
`kdjax.objectives` (KD losses on densities and on logits), `kdjax.metrics` (precision / recall).
"""

__version__ = "0.1.0"
