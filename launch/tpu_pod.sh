#!/usr/bin/env bash
# Set up kdjax on every worker of a Cloud TPU VM pod slice and run COMMAND on all of them at once.
#
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--skip_setup] [--dry_run] \
#     [--] COMMAND [ARGS...]
#   bash launch/tpu_pod.sh --tpu=kd-v4-32 --zone=us-central2-b --dry_run python -m \
#     experiments.train_lm --flagfile=experiments/flags/multihost_smoke.flags \
#     --mesh=data=16 --workdir=/tmp/kd   (a shared workdir, e.g. a mounted bucket, for a real run)
#
# Setup (skipped with --skip_setup): `git archive` of this checkout's HEAD is copied to every worker
# (gcloud ... scp --worker=all), unpacked into ~/kdjax and pip-installed with jax[tpu] at the
# version installed here (KDJAX_JAX_SPEC overrides). Run: gcloud ... ssh --worker=all starts
# COMMAND in ~/kdjax on every worker with KDJAX_CLUSTER=tpu, so kdjax.distributed.initialize()
# lets jax find the other workers through the TPU metadata server.
# --dry_run (or DRY_RUN=1) prints every command, shell-quoted, instead of running it.
# Defaults from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT.
set -euo pipefail

usage="usage: bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--skip_setup] [--dry_run] [--] COMMAND [ARGS...]"
tpu="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
dry_run="${DRY_RUN:-0}"
setup=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --skip_setup) setup=0 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    --*) echo "error: unknown option $1; $usage" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if [[ -z "$tpu" ]]; then echo "error: --tpu (or TPU_NAME) is required; $usage" >&2; exit 2; fi
if [[ -z "$zone" ]]; then echo "error: --zone (or TPU_ZONE) is required; $usage" >&2; exit 2; fi
if [[ $# -lt 1 ]]; then echo "error: no COMMAND given; $usage" >&2; exit 2; fi
if [[ "$dry_run" != 0 && "$dry_run" != 1 ]]; then
  echo "error: DRY_RUN=$dry_run: expected 0 or 1" >&2; exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir="kdjax"
jax_spec="${KDJAX_JAX_SPEC:-}"
if [[ -z "$jax_spec" ]]; then
  jax_version="$("${PYTHON:-python3}" -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null || true)"
  jax_spec="jax[tpu]${jax_version:+==$jax_version}"
fi
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi

q() {  # one argument, shell-quoted readably: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote() {  # several arguments, shell-quoted into one string (a remote --command, a printed line)
  local out="" arg
  for arg in "$@"; do out+=" $(q "$arg")"; done
  printf '%s' "${out# }"
}

run() {  # print (dry run) or execute one command
  if ((dry_run)); then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

if ((setup)); then
  tarball="/tmp/kdjax-${tpu}.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  run "${gcloud_tpu[@]}" scp "$tarball" "${tpu}:kdjax.tar.gz" "${where[@]}" --worker=all
  remote_setup="rm -rf $(quote "$remote_dir") && mkdir -p $(quote "$remote_dir") && tar -xzf kdjax.tar.gz -C $(quote "$remote_dir") && python3 -m pip install -q -e $(quote "./$remote_dir") $(quote "$jax_spec")"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command "$remote_setup"
fi
remote_run="cd $(quote "$remote_dir") && KDJAX_CLUSTER=tpu $(quote "$@")"
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command "$remote_run"
