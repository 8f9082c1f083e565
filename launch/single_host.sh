#!/usr/bin/env bash
# Pretraining on one machine.
#
#   launch/single_host.sh CONFIG WORKDIR [main.py flags...]
#       one process on all the local accelerators (TPU chips, GPUs) or the CPU;
#   launch/single_host.sh --processes K CONFIG WORKDIR [main.py flags...]
#       K processes joined by jax.distributed on 127.0.0.1 (a rehearsal of a multi-host job):
#       the local GPUs split evenly between them (CUDA_VISIBLE_DEVICES), or without GPUs the CPU
#       with CPU_DEVICES simulated devices per process. SIGTERM/SIGINT (Ctrl-C) go to every
#       process as SIGTERM (each saves a checkpoint and exits 143); the script waits for all and
#       exits with the first non-zero exit code. If one process fails, the others get SIGTERM and,
#       KILL_AFTER seconds later, SIGKILL.
#
# Paths are read from the current directory, as by `python main.py`: run it from the repository
# root (the configs' data.dir is relative to it). Environment (all optional):
#   PYTHON            interpreter (default: <repo>/.venv/bin/python, else python3)
#   PROCESSES         same as --processes (default 1)
#   PLATFORM          auto | gpu | cpu (default auto: the GPUs nvidia-smi lists; with K > 1 and no
#                     GPU, the CPU; with K = 1 whatever JAX finds)
#   CPU_DEVICES       simulated CPU devices per process (XLA_FLAGS
#                     --xla_force_host_platform_device_count); implies PLATFORM=cpu under auto
#   COORDINATOR_PORT  port of process 0's coordinator (default: a free one)
#   LOG_DIR           K > 1: write process i's output to LOG_DIR/process_<i>.log instead of the
#                     terminal
#   KILL_AFTER        seconds between SIGTERM and SIGKILL after a process failed (default 120)
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/single_host.sh [--processes K] CONFIG WORKDIR [main.py flags...]
  e.g. launch/single_host.sh configs/pretrain/quickstart.py workdirs/quickstart --set train.num_steps=50
       CPU_DEVICES=4 launch/single_host.sh --processes 2 configs/pretrain/quickstart.py /tmp/q2 \
           --set data.batch_per_subset=8 --set eval.batch_per_subset=8 --set "data.dir='DIR'"
       (K processes need data converted with --num-shards >= K: see launch/README.md)
EOF
  exit 2
}

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo_dir/.venv/bin/python" ]]; then PYTHON="$repo_dir/.venv/bin/python"; else PYTHON=python3; fi
fi
PROCESSES="${PROCESSES:-1}"
PLATFORM="${PLATFORM:-auto}"
CPU_DEVICES="${CPU_DEVICES:-}"
LOG_DIR="${LOG_DIR:-}"
KILL_AFTER="${KILL_AFTER:-120}"

# --processes K / --processes=K may stand anywhere; every other argument goes to main.py.
args=()
while (($#)); do
  case "$1" in
    --processes) (($# >= 2)) || usage; PROCESSES="$2"; shift 2 ;;
    --processes=*) PROCESSES="${1#*=}"; shift ;;
    -h|--help) usage ;;
    *) args+=("$1"); shift ;;
  esac
done
((${#args[@]} >= 2)) || usage
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --processes must be a positive integer, got '$PROCESSES'" >&2; exit 2; }
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "error: CPU_DEVICES must be a positive integer" >&2; exit 2; }
config="${args[0]}" workdir="${args[1]}"
extra=("${args[@]:2}")
main_args=(main.py --config "$config" --workdir "$workdir")
[[ -f main.py ]] || main_args[0]="$repo_dir/main.py"   # launched from elsewhere: still find main.py

# Which devices: a list of GPU ids to split, or the CPU.
gpus=()
if [[ "$PLATFORM" == auto && -n "$CPU_DEVICES" ]]; then PLATFORM=cpu; fi
if [[ "$PLATFORM" == auto || "$PLATFORM" == gpu ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
  fi
  if ((${#gpus[@]})); then PLATFORM=gpu
  elif [[ "$PLATFORM" == gpu ]]; then echo "error: PLATFORM=gpu but no GPU found" >&2; exit 2
  elif ((PROCESSES > 1)); then PLATFORM=cpu   # K processes cannot share one TPU host's chips
  fi
fi
case "$PLATFORM" in auto|gpu|cpu) ;; *) echo "error: PLATFORM must be auto, gpu or cpu" >&2; exit 2 ;; esac
if [[ "$PLATFORM" == cpu ]]; then
  export JAX_PLATFORMS=cpu
  if [[ -n "$CPU_DEVICES" ]]; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CPU_DEVICES"
  fi
fi

# One process: replace this shell, so signals and the exit code are main.py's own.
if ((PROCESSES == 1)); then
  exec "$PYTHON" "${main_args[@]}" ${extra[@]+"${extra[@]}"}
fi

per_gpu=0
if [[ "$PLATFORM" == gpu ]]; then
  if ((${#gpus[@]} % PROCESSES)); then
    echo "error: ${#gpus[@]} GPUs (${gpus[*]}) do not split evenly over $PROCESSES processes" >&2; exit 2
  fi
  per_gpu=$((${#gpus[@]} / PROCESSES))
fi
if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  COORDINATOR_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
                      2>/dev/null || echo $((12000 + RANDOM % 4096)))"
fi
[[ -z "$LOG_DIR" ]] || mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < PROCESSES; i++)); do
  child_env=()
  if ((per_gpu)); then
    ids=("${gpus[@]:i*per_gpu:per_gpu}")
    child_env+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]}")")
  fi
  cmd=(env ${child_env[@]+"${child_env[@]}"} "$PYTHON" "${main_args[@]}"
       --coordinator_address "127.0.0.1:$COORDINATOR_PORT" --num_processes "$PROCESSES" --process_id "$i"
       ${extra[@]+"${extra[@]}"})
  if [[ -n "$LOG_DIR" ]]; then "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else "${cmd[@]}" &
  fi
  pids+=("$!")   # env execs python: this is main.py's pid
done
echo "single_host.sh: $PROCESSES processes (${PLATFORM}), coordinator 127.0.0.1:$COORDINATOR_PORT, pids ${pids[*]}" >&2

signal_all() {  # signal_all SIG: send SIG to every child still running
  local p
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done
}
stopping=0
trap 'stopping=1; signal_all TERM' TERM INT HUP

# Collect exit codes as the processes end (polled: works with any bash >= 4).
rcs=() first_rc=0 left=$PROCESSES kill_at=0
while ((left)); do
  for i in "${!pids[@]}"; do
    [[ -z "${rcs[i]:-}" ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue   # still running
    rc=0; wait "${pids[i]}" || rc=$?
    rcs[i]=$rc; left=$((left - 1))
    echo "single_host.sh: process $i exited with $rc" >&2
    if ((rc && !first_rc)); then
      first_rc=$rc
      if ((!stopping)); then   # a failure, not our SIGTERM: the others would wait for it forever
        stopping=1; signal_all TERM; kill_at=$((SECONDS + KILL_AFTER))
      fi
    fi
  done
  if ((kill_at && SECONDS >= kill_at)); then signal_all KILL; kill_at=0; fi
  if ((left)); then sleep 1; fi
done
exit "$first_rc"
