"""The SmolLM2 (Llama) family in JAX: model, weights in/out, sampling, training, evaluation."""

from kdjax.llm.model.config import LlamaConfig, PRESETS, get_preset
from kdjax.llm.model.llama import Llama, forward, init_params, token_logprobs
from kdjax.llm.model.targets import target_mask
from kdjax.llm.weights.convert import save_hf
from kdjax.llm.weights.loading import describe_spec, load_model, load_tokenizer
