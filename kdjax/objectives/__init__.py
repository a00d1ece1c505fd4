"""KD objectives, in two namespaces sharing one vocabulary (forward KL, reverse KL, JSD, ...):

  kdjax.objectives.density  losses between Gaussian mixtures by Monte Carlo (the GMM study)
  kdjax.objectives.tokens   losses between next-token distributions on logits (the LLM study)
"""

from kdjax.objectives import density, tokens  # noqa: F401
