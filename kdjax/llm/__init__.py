"""The SmolLM2 (Llama) family in JAX: model, weights in/out, sampling, training, evaluation."""

from kdjax.llm.config import LlamaConfig, PRESETS, get_preset
from kdjax.llm.model import Llama, KVCache, forward, init_params, token_logprobs
from kdjax.llm.targets import target_mask
from kdjax.llm.convert import save_hf
from kdjax.llm.loading import describe_spec, load_model, load_tokenizer
