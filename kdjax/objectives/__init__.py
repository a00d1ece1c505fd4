"""KD objectives: on densities (the GMM study) and on logits (the LLM study)."""
