"""Llama model: config, layers, targets, sampling, scoring, embeddings."""
