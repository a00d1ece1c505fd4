"""Weights in and out: GGUF / HF conversion and loading by spec."""
