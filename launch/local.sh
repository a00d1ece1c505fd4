#!/usr/bin/env bash
# Run COMMAND as N cooperating JAX processes on this machine, each with its own fake CPU devices.
#
#   bash launch/local.sh N COMMAND [ARGS...]
#   bash launch/local.sh 2 python -m experiments.train_lm \
#     --flagfile=experiments/flags/multihost_smoke.flags --workdir=/tmp/smoke
#
# Process i gets KDJAX_COORDINATOR=127.0.0.1:PORT (a free port), KDJAX_NUM_PROCESSES=N,
# KDJAX_PROCESS_ID=i and KDJAX_LOCAL_DEVICE_COUNT=D fake CPU devices (D from the environment's
# KDJAX_LOCAL_DEVICE_COUNT, default 2); kdjax.distributed.initialize() joins them over gloo.
# Output lines are prefixed [p0], [p1], ... (stdout to stdout, stderr to stderr). If one process
# fails, the others are stopped and this script exits with the failed process's status; it exits 0
# when all succeed.
set -euo pipefail

usage="usage: bash launch/local.sh N COMMAND [ARGS...]  (N processes, 1..64)"
if [[ $# -lt 2 ]]; then
  echo "error: $usage" >&2
  exit 2
fi
num_processes="$1"
shift
if ! [[ "$num_processes" =~ ^[0-9]+$ ]] || ((10#$num_processes < 1 || 10#$num_processes > 64)); then
  echo "error: N=$num_processes: expected an integer in 1..64; $usage" >&2
  exit 2
fi
num_processes=$((10#$num_processes))
devices="${KDJAX_LOCAL_DEVICE_COUNT:-2}"
if ! [[ "$devices" =~ ^[0-9]+$ ]] || ((10#$devices < 1 || 10#$devices > 256)); then
  echo "error: KDJAX_LOCAL_DEVICE_COUNT=$devices: expected an integer in 1..256" >&2
  exit 2
fi
devices=$((10#$devices))

python_bin="${PYTHON:-python3}"
port="$("$python_bin" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"

# Drop any fake-device count inherited from the caller (e.g. a test run with 8), then set ours.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"

set -m  # each process (with its output filter) in its own process group, so it can be stopped whole
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  # JAX treats SIGTERM as a preemption notice and keeps running, so after 2 s: SIGKILL.
  for _ in $(seq 20); do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export KDJAX_COORDINATOR="127.0.0.1:${port}" KDJAX_NUM_PROCESSES="$num_processes"
    export KDJAX_PROCESS_ID="$i" KDJAX_LOCAL_DEVICE_COUNT="$devices" KDJAX_CLUSTER=env
    export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:${port}" JAX_PLATFORMS=cpu
    export XLA_FLAGS="$xla_flags"
    # stdout and stderr stay apart (each prefixed): merged, a native library's stderr logging
    # from another thread could land in the middle of a line the program prints
    "$@" 2> >(sed -u "s/^/[p${i}] /" >&2) | sed -u "s/^/[p${i}] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done
set +m  # groups are assigned; no job-control chatter from here on

# Wait for every process; on the first failure, stop the rest.
remaining=("${pids[@]}")
while ((${#remaining[@]} > 0)); do
  still=()
  for idx in "${!remaining[@]}"; do
    pid="${remaining[$idx]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0)); then
      for ((p = 0; p < num_processes; p++)); do
        if [[ "${pids[$p]}" == "$pid" ]]; then rank="$p"; fi
      done
      echo "[local.sh] process ${rank:-?} exited with status $rc; stopping the others" >&2
      stop_all
      wait || true
      exit "$rc"
    fi
  done
  remaining=("${still[@]}")
  ((${#remaining[@]} == 0)) || sleep 0.2
done
echo "[local.sh] all $num_processes processes succeeded" >&2
