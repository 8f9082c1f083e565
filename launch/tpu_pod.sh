#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM pod slice: the same command on every worker, over gcloud ssh.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE [REPO_URL]       clone or update the repo, install it
#                                                          with jax[tpu] on all workers
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [main.py flags...]
#                                                          run main.py on all workers
#   launch/tpu_pod.sh stop TPU_NAME ZONE                   SIGTERM to main.py on all workers: each
#                                                          saves a checkpoint at the current step
#
# jax.distributed finds the workers by itself (mtp_jax/parallel/distributed.py). WORKDIR must be
# storage every worker sees, e.g. gs://BUCKET/runs/NAME; rerunning the same command resumes from
# its latest checkpoint (after a preemption, a maintenance event or `stop`). The ssh sessions stay
# attached: start the run inside tmux/screen on the machine you launch from.
#
# Environment (all optional):
#   PROJECT           gcloud project (default: gcloud's configured one)
#   REMOTE_DIR        the repo on each worker (default ~/mtp_jax)
#   REPO_URL          setup: git URL (default: this checkout's `origin` remote)
#   REPO_REF          setup: branch, tag or commit to check out (default: the remote's default branch)
#   PYTHON_BIN        setup: interpreter that creates the venv (default python3.11)
#   JAX_VERSION       setup: version of jax[tpu] (default: jax's pin in requirements/lock.txt, else 0.10.2)
#   REMOTE_PYTHON     interpreter on the workers, relative to REMOTE_DIR or absolute (default .venv/bin/python)
#   REMOTE_ENV        VAR=value words set before main.py on every worker, e.g. "TF_CPP_MIN_LOG_LEVEL=0"
#   PID_FILE          where each worker records main.py's pid, for `stop` (default /tmp/mtp_jax_main.pid)
#   GCLOUD            gcloud binary (default gcloud)
#   GCLOUD_SSH_FLAGS  extra flags for `gcloud ... ssh`, word-split, e.g. "--tunnel-through-iap"
#   DRY_RUN=1         print the gcloud command instead of running it
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [main.py flags...]
       launch/tpu_pod.sh setup TPU_NAME ZONE [REPO_URL]
       launch/tpu_pod.sh stop TPU_NAME ZONE
  e.g. launch/tpu_pod.sh setup my-v4-64 us-central2-b https://github.com/ORG/mtp_jax.git
       launch/tpu_pod.sh my-v4-64 us-central2-b configs/pretrain/mtp_vit_b_rvsa.py gs://BUCKET/runs/vit_b
EOF
  exit 2
}

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REMOTE_DIR="${REMOTE_DIR:-~/mtp_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-.venv/bin/python}"
REMOTE_ENV="${REMOTE_ENV:-}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
PID_FILE="${PID_FILE:-/tmp/mtp_jax_main.pid}"
GCLOUD="${GCLOUD:-gcloud}"
GCLOUD_SSH_FLAGS="${GCLOUD_SSH_FLAGS:-}"
if [[ -z "${JAX_VERSION:-}" ]]; then
  JAX_VERSION="$(sed -n 's/^jax==//p' "$script_dir/../requirements/lock.txt" 2>/dev/null | head -n 1)"
  JAX_VERSION="${JAX_VERSION:-0.10.2}"
fi

# A path for the remote shell: `~/x` keeps its tilde expansion there, anything else is quoted.
# shellcheck disable=SC2016,SC2088  # $HOME and ~ are meant literally: they expand on the worker
remote_path() {
  if [[ "$1" == "~" ]]; then printf '"$HOME"'
  elif [[ "$1" == "~/"* ]]; then printf '"$HOME"/%q' "${1#"~/"}"
  else printf '%q' "$1"
  fi
}

# A single-quoted word for any POSIX shell (unlike printf %q, which may write bash-only $'...').
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# on_all_workers TPU_NAME ZONE REMOTE_COMMAND: runs REMOTE_COMMAND (a bash line) on every worker.
on_all_workers() {
  local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$1" --zone "$2" --worker=all)
  [[ -z "${PROJECT:-}" ]] || cmd+=(--project "$PROJECT")
  local extra_flags=()
  [[ -z "$GCLOUD_SSH_FLAGS" ]] || read -r -a extra_flags <<<"$GCLOUD_SSH_FLAGS"
  cmd+=(${extra_flags[@]+"${extra_flags[@]}"} --command "$3")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

dir="$(remote_path "$REMOTE_DIR")"
case "${1:-}" in
  setup)
    (($# == 3 || $# == 4)) || usage
    tpu="$2" zone="$3" url="${4:-${REPO_URL:-}}"
    if [[ -z "$url" ]]; then url="$(git -C "$script_dir" remote get-url origin 2>/dev/null || true)"; fi
    # Clone if missing (needs a URL), else fast-forward; then venv + locked install + jax[tpu].
    remote="set -euo pipefail
if [[ ! -d $dir/.git ]]; then
  [[ -n $(printf %q "$url") ]] || { echo 'error: no repo at '$dir' and no REPO_URL given' >&2; exit 2; }
  git clone $(printf %q "$url") $dir
fi
cd $dir
git fetch --quiet origin
ref=$(printf %q "${REPO_REF:-}")
if [[ -n \$ref ]]; then git checkout --quiet \"\$ref\"; fi
if git symbolic-ref -q HEAD >/dev/null; then git pull --quiet --ff-only; fi
[[ -x .venv/bin/python ]] || $(printf %q "$PYTHON_BIN") -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c requirements/lock.txt -e .
.venv/bin/pip install --quiet $(printf %q "jax[tpu]==$JAX_VERSION")
echo \"\$(hostname): \$(git rev-parse --short HEAD)\" \$(.venv/bin/pip list 2>/dev/null | grep -iE '^(jax|jaxlib|libtpu) ' || true)"
    on_all_workers "$tpu" "$zone" "bash -c $(sq "$remote")"
    ;;
  stop)
    (($# == 3)) || usage
    pid_file="$(remote_path "$PID_FILE")"
    on_all_workers "$2" "$3" "if [ -f $pid_file ]; then kill -TERM \"\$(cat $pid_file)\" && echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): no $PID_FILE\"; fi"
    ;;
  ''|-h|--help) usage ;;
  *)
    (($# >= 4)) || usage
    tpu="$1" zone="$2" config="$3" workdir="$4"
    shift 4
    main=("$config" "$workdir" "$@")
    python="$(remote_path "$REMOTE_PYTHON")"
    # Every argument quoted with printf %q; `exec` keeps the pid, so PID_FILE names main.py.
    remote="cd $dir && echo \$\$ > $(remote_path "$PID_FILE") && exec env PYTHONUNBUFFERED=1 $REMOTE_ENV $python main.py --config $(printf %q "${main[0]}") --workdir $(printf %q "${main[1]}")"
    for a in "${main[@]:2}"; do remote+=" $(printf %q "$a")"; done
    on_all_workers "$tpu" "$zone" "$remote"
    ;;
esac
