"""What each stage of the study will do, from model configs alone (never loading weights): sequences,
tokens, FLOPs and a memory formula per stage (the plan `--dry_run` prints), and the sampling batch
sized from device memory (`--sample_batch_size=0`). kdjax/llm/study/hardware.py prices the plan on
named chips from compiled programs."""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax

from kdjax.cli import UserError, require
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.study import inputs, kinds
from kdjax.llm.study.config import StudyConfig, validate
from kdjax.llm.study.layout import Layout
from kdjax.llm.train.batches import own_rows
from kdjax.sharding import parse_mesh


def _mesh_size(mesh: str) -> int:
  """Devices the mesh spans; data=-1 (the default) takes all local devices."""
  data, fsdp, tensor = parse_mesh(mesh)
  if data == -1:
    data = max(1, jax.device_count() // (fsdp * tensor))
  return data * fsdp * tensor


def _sampling(c: LlamaConfig, sequences: int, seq_len: int, rows: int, dtype: str):
  """(tokens, flops, memory per device): `rows` = --sample_batch_size, each device's rows."""
  tokens = sequences * seq_len
  flops = tokens * c.forward_flops_per_token(seq_len // 2)
  kv = c.kv_cache_bytes(rows, seq_len, "bfloat16" if dtype == "bfloat16" else "float32")
  logits = rows * c.vocab_size * 4 * 3  # logits, probabilities, cumulative sum
  memory = c.param_bytes("float32") + kv + logits  # params replicated, `rows` rows per device
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


def student_budget(cfg: StudyConfig, name: str, student: LlamaConfig, teacher: LlamaConfig,
                   seq_len: int) -> dict:
  """One student's training budget (matched across kinds: the same steps and sequences): steps,
  sequences, tokens (sequences x seq_len), train_flops (its forward + backward, and its share of
  the teacher's forward passes: token-level students of a seed share one per batch) and, on-policy,
  sampling_flops (its own batches, sampled each step). `data_passes`: how many times it reads its
  training set."""
  kind, n_temps = kinds.get(name), len(cfg.temperatures)
  sequences = cfg.student_steps * cfg.batch_size
  tokens = sequences * seq_len
  flops = tokens * student.flops_per_token(seq_len)
  if kind.teacher_forwards:
    share = 1.0 / n_temps if kind.teacher_forwards == 1 else 1.0
    flops += share * tokens * teacher.forward_flops_per_token(seq_len // 2)
  data = {"pstar": cfg.num_train, "teacher_samples": cfg.teacher_num_train}.get(kind.data)
  return {"steps": cfg.student_steps, "sequences": sequences, "tokens": tokens,
          "train_flops": flops,
          "sampling_flops": tokens * student.forward_flops_per_token(seq_len // 2)
          * own_rows(kind.student_fraction, cfg.batch_size) / cfg.batch_size
          if kind.onpolicy else 0.0,
          "data_passes": sequences / data if data else None}


def _student_kind(cfg: StudyConfig, name: str, student, teacher, seq_len: int, devices: int):
  """(tokens, flops, memory, label) of one kind's training run of a seed (kinds.KINDS)."""
  kind = kinds.get(name)
  copies = sum(len(cfg.student_grid(k, knob)) for k, knob in cfg.student_runs() if k == name)
  # one per T and truncation knob value (and per rate of a sweep)
  b = student_budget(cfg, name, student, teacher, seq_len)
  mem = _training(student, b["sequences"], seq_len, 1, cfg.batch_size, devices, cfg.dtype,
                  copies=copies)[2]
  passes = f", {b['data_passes']:.3g} passes over its data" if b["data_passes"] else ""
  label = (name if copies == 1 else f"{name} x{copies}") + f" ({b['steps']} steps{passes})"
  return (copies * b["tokens"], copies * (b["train_flops"] + b["sampling_flops"]), mem, label)


def num_scored(cfg: StudyConfig) -> int:
  """Students sampled and scored over the seeds (--score_rates=chosen: one rate of each)."""
  return sum(cfg.num_scored(len(g)) for _, g in cfg.student_groups()) * cfg.num_seeds


def _scoring(cfg: StudyConfig, gt, student, seq_len: int, devices: int):
  """(tokens, flops, memory) of stage 5: sample every scored student, score under p* and the
  student; with a sweep, every rate's student on p*'s select split too."""
  n_students = num_scored(cfg)
  s_tok, s_flops, s_mem = _sampling(student, cfg.num_eval_samples * n_students, seq_len,
                                    cfg.sample_batch_size, cfg.dtype)
  p_tok = cfg.num_eval_samples * n_students * seq_len
  p_flops = p_tok * gt.forward_flops_per_token(seq_len // 2)
  selected = len(cfg.student_names()) * cfg.num_seeds if cfg.lr_sweep else 0
  r_tok = (cfg.num_val * n_students + cfg.num_select * selected) * seq_len
  r_flops = r_tok * student.forward_flops_per_token(seq_len // 2)
  score_mem = (gt.param_bytes("float32") * devices
               + cfg.eval_batch_size * seq_len * gt.vocab_size * 4 * 2)  # params replicated
  return s_tok + p_tok + r_tok, s_flops + p_flops + r_flops, max(s_mem, score_mem / devices)


def _models(cfg: StudyConfig, describe: Callable[[str], LlamaConfig]):
  gt, teacher, student = describe(cfg.ground_truth), describe(cfg.teacher), describe(cfg.student)
  if cfg.dtype == "bfloat16":
    teacher, student = (c.replace(dtype="bfloat16") for c in (teacher, student))
  for name, c in (("teacher", teacher), ("student", student)):
    require(c.vocab_size == gt.vocab_size,
            f"--{name}={getattr(cfg, name)!r}: vocabulary {c.vocab_size} differs from the ground "
            f"truth's {gt.vocab_size}")
  return gt, teacher, student


def make_plan(cfg: StudyConfig, describe: Callable[[str], LlamaConfig],
              prompt_len: Optional[int] = None) -> dict:
  """What each stage will do, from model configs alone. `describe(spec)` -> LlamaConfig."""
  validate(cfg)
  gt, teacher, student = _models(cfg, describe)
  devices = _mesh_size(cfg.mesh)
  seq_len = (prompt_len or 1) + cfg.max_new_tokens
  n_temps, n_seeds = len(cfg.temperatures) + len(cfg.knob_values), cfg.num_seeds
  stages = []

  def add(name, what, sequences, est):
    tokens, flops, memory = est
    stages.append({"stage": name, "what": what, "sequences": int(sequences), "tokens": int(tokens),
                   "flops": float(flops), "memory_per_device_bytes": int(memory)})

  n_pstar, n_teachers = Layout(cfg).sample_sets_and_teachers()  # by --seed_scope
  n = (cfg.num_train + cfg.num_val + cfg.num_select) * n_pstar
  add("1_sample_ground_truth", f"sample p* ({cfg.ground_truth}) at T=1: {cfg.num_train} train + "
      f"{cfg.num_val} validation (recall) + {cfg.num_select} teacher selection"
      + (f", x{n_pstar} seeds" if n_pstar > 1 else ""), n,
      _sampling(gt, n, seq_len, cfg.sample_batch_size, cfg.dtype))
  tok, flops, mem = _training(teacher, cfg.num_train, seq_len, cfg.teacher_epochs,
                              cfg.batch_size, devices, cfg.dtype)
  add("2_train_teacher", f"train teacher {cfg.teacher} from scratch, {cfg.teacher_epochs:g} "
      f"epochs, best checkpoint on the {cfg.num_select} selection samples"
      + (f", x{n_teachers} seeds (--seed_scope={cfg.seed_scope})" if n_teachers > 1 else ""),
      cfg.num_train * n_teachers, (tok * n_teachers, flops * n_teachers, mem))
  n = (cfg.teacher_num_train + cfg.teacher_num_val) * n_temps * n_seeds
  knob = (f" and {cfg.teacher_knob} in {list(cfg.knob_values)} at T=1" if cfg.knob_values
          else "")
  add("3_sample_teacher", f"sample the teacher at T in {list(cfg.temperatures)}{knob} x "
      f"{n_seeds} seeds",
      n, _sampling(teacher, n, seq_len, cfg.sample_batch_size, cfg.dtype))
  ests = [_student_kind(cfg, k, student, teacher, seq_len, devices) for k in cfg.students]
  add("4_train_students", f"train the students {cfg.student} per seed, matched budgets of "
      f"{cfg.student_steps * cfg.batch_size} sequences each: {', '.join(e[3] for e in ests)} "
      f"(each kind's temperatures vmapped together)", sum(e[0] for e in ests) // seq_len * n_seeds,
      (n_seeds * sum(e[0] for e in ests), n_seeds * sum(e[1] for e in ests),
       max(e[2] for e in ests)))
  n_students = num_scored(cfg)
  chosen = (f" (the chosen rate's of {len(cfg.student_learning_rates)}, each rate's on the "
            f"{cfg.num_select} select samples)" if cfg.scores_chosen_only else "")
  add("5_score_students", f"sample each student{chosen} ({cfg.num_eval_samples} at T=1), score "
      f"them under p* (precision); score p* validation under each student (recall)",
      (cfg.num_eval_samples + cfg.num_val) * n_students, _scoring(cfg, gt, student, seq_len, devices))
  stages.append({"stage": "6_results", "what": "results.json, results.csv, figures",
                 "sequences": 0, "tokens": 0, "flops": 0.0, "memory_per_device_bytes": 0})
  models = {name: {"spec": getattr(cfg, name), "params": c.num_params(), "hidden": c.hidden_size,
                   "layers": c.num_layers, "vocab": c.vocab_size}
            for name, c in (("ground_truth", gt), ("teacher", teacher), ("student", student))}
  return {"devices": devices, "seq_len": seq_len, "seeds": cfg.seeds,
          "students": cfg.student_names(), "models": models, "stages": stages,
          "total_flops": sum(s["flops"] for s in stages)}


AUTO_SAMPLE_BATCH_CPU = 64      # --sample_batch_size=0 where devices report no memory (CPU)
AUTO_SAMPLE_BATCH_MAX = 1024    # rows per device; decode is memory-bound: past this the KV reads
#                                 dominate anyway
AUTO_SAMPLE_MEMORY_FRACTION = 0.7  # of a device's memory for the weights, cache and logits


def auto_sample_batch(config: LlamaConfig, max_len: int, device_bytes: Optional[float]) -> int:
  """--sample_batch_size=0: the most rows per device (at most AUTO_SAMPLE_BATCH_MAX) whose
  weights, KV cache (both in the compute dtype) and float32 logits fit
  AUTO_SAMPLE_MEMORY_FRACTION of a device's memory; AUTO_SAMPLE_BATCH_CPU when the device reports
  no memory. The rows per device shape the random draws (not the device count): give
  --sample_batch_size to make samples the same on hardware with other memory."""
  if not device_bytes:
    return AUTO_SAMPLE_BATCH_CPU
  weights = config.param_bytes(config.dtype)
  per_row = config.kv_cache_bytes(1, max_len) + 2 * config.vocab_size * 4
  rows = int((AUTO_SAMPLE_MEMORY_FRACTION * device_bytes - weights) // per_row)
  require(rows >= 1, f"--sample_batch_size=0: {config.num_params() / 1e6:.0f}M parameters and one "
          f"row's {max_len}-slot KV cache do not fit {device_bytes / 1e9:.0f} GB per device")
  return min(AUTO_SAMPLE_BATCH_MAX, rows)


def dry_run_plan(cfg: StudyConfig, ground_truth_preset: str = "") -> dict:
  """make_plan from model configs only (no weights). When the ground truth's files are not on this
  machine, `ground_truth_preset` names its architecture (e.g. the paper's hf:DIR of SmolLM2-1.7B)."""
  validate(cfg)
  notes = []
  plan = make_plan(cfg, lambda spec: inputs.describe(
      spec, ground_truth_preset if spec == cfg.ground_truth else "", notes),
      inputs.prompt_len_or_one(cfg, notes))
  plan["notes"] = notes
  return plan


def study_sample_batch(cfg: StudyConfig, device_bytes: Optional[float],
                       ground_truth_preset: str = "") -> int:
  """--sample_batch_size=0: auto_sample_batch for p* (the largest model sampled) at the study's
  sequence length, from one device's memory (None: the CPU default)."""
  gt = inputs.describe(cfg.ground_truth, ground_truth_preset)
  max_len = inputs.prompt_len_or_one(cfg) + cfg.max_new_tokens
  return auto_sample_batch(gt.replace(dtype=cfg.dtype), max_len, device_bytes)


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

