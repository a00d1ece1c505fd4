"""Issue 6's list of bad inputs, walked across every entry point: each gives exactly one `error:`
line on stderr that names the flag or file, a non-zero exit, and no traceback."""

import pytest

from tests.helpers import entry_point_runs, error_line

pytestmark = pytest.mark.slow  # every case starts an entry point in a subprocess


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  not_a_dataset = d / "not_a_dataset"
  not_a_dataset.mkdir()
  (not_a_dataset / "notes.txt").write_text("hello")
  truncated = d / "truncated.gguf"
  truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 24)  # a header and nothing after
  return {"workdir": str(d / "work"), "not_a_dataset": str(not_a_dataset),
          "truncated": str(truncated), "missing": str(d / "missing.gguf")}


CASES = [
    # (entry point, arguments, what the message must name)
    ("gmm", ["--num_betas=0"], "--num_betas"),
    ("gmm", ["--beta_min=-1"], "--beta_min"),
    ("gmm", ["--n_eval=abc"], "--n_eval"),
    ("gmm", ["--objectives=direct,bogus"], "bogus"),
    ("gmm", ["--flagfile=/nonexistent/gmm.flags"], "/nonexistent/gmm.flags"),
    ("llm", ["--temperatures=0.8,0"], "--temperatures"),
    ("llm", ["--ground_truth=gguf:{missing}"], "{missing}"),
    ("llm", ["--ground_truth=gguf:{truncated}"], "{truncated}"),
    ("llm", ["--flagfile=/nonexistent/llm.flags"], "/nonexistent/llm.flags"),
    ("train_lm", ["--model=preset:no-such-preset", "--train_data=synthetic:8", "--steps=2"],
     "no-such-preset"),
    ("train_lm", ["--model=preset:test-tiny", "--train_data={not_a_dataset}", "--steps=2"],
     "{not_a_dataset}"),
    ("train_lm", ["--model=gguf:{truncated}", "--train_data=synthetic:8", "--steps=2"],
     "{truncated}"),
    ("train_lm", ["--model=preset:test-tiny", "--train_data=synthetic:8", "--steps=-3"], "--steps"),
    ("train_lm", ["--model=preset:test-tiny", "--train_data=synthetic:8", "--steps=2",
                  "--objective=nope", "--teacher=preset:test-tiny"], "nope"),
    ("bench_sampling", ["--model=gguf:{missing}"], "{missing}"),
    ("bench_sampling", ["--model=preset:test-tiny", "--temperature=0"], "--temperature"),
    ("bench_sampling", ["--model=preset:no-such-preset"], "no-such-preset"),
    ("bench_train", ["--batch=0"], "--batch"),
    ("bench_train", ["--preset=no-such-preset"], "no-such-preset"),
    ("bench_gmm", ["--num_betas=0"], "--num_betas"),
]


@pytest.mark.parametrize("entry", sorted({e for e, _, _ in CASES}))
def test_bad_input_is_one_line_naming_the_cause(files, entry):
  """An entry point's cases in one process (helpers.entry_point_runs: as cli.run runs main)."""
  cases = [([a.format(**files) for a in args], named.format(**files))
           for e, args, named in CASES if e == entry]
  if not entry.startswith("bench_"):
    cases = [([*args, f"--workdir={files['workdir']}/{entry}"], named) for args, named in cases]
  procs = entry_point_runs(f"experiments.{entry}", [args for args, _ in cases])
  for (args, named), r in zip(cases, procs):
    assert named in error_line(r), (args, r.stderr[-3000:])
