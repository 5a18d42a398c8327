# shellcheck shell=bash
# Sourced by launch/train.sh and slurm/launch.sh (which set SCRIPT): errors, VENV, GPU or CPU, the
# pre-flight check and the launch. The command line itself comes from factorllm_ds/launcher.py.
#
# VENV    a virtualenv whose bin/ goes first on PATH    PYTHON  its interpreter (default: python)
# DEVICE  auto (default) | gpu | cpu                    DRY_RUN=1  print the command, run nothing
# CHECK=0 skip `factorllm-ds train --check` (flags, DeepSpeed JSON, model folder; before any rank starts)

FACTORLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

if [[ -n "${VENV:-}" ]]; then export PATH="$VENV/bin:$PATH"; fi
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: not found; set VENV (launch/install.sh makes .venv) or PYTHON"

DEVICE="${DEVICE:-auto}"
if [[ "$DEVICE" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
[[ "$DEVICE" == gpu || "$DEVICE" == cpu ]] || die "DEVICE=$DEVICE: expected auto, gpu or cpu"
# The default ranks per node: the GPUs nvidia-smi lists, 1 on CPU.
default_nproc() { if [[ "$DEVICE" == gpu ]]; then nvidia-smi -L | grep -c '^GPU'; else echo 1; fi; }

# Launcher options -> the command line (VAR=value ... argv, shell-quoted), or with --print world the
# rank count. python -I runs the file alone: a dry run need not wait for torch to import.
launch_line() { "$PYTHON" -I "$FACTORLLM_ROOT/factorllm_ds/launcher.py" --device "$DEVICE" --python "$PYTHON" "$@"; }

check_train() {  # world size, train flags...
    if [[ "${CHECK:-1}" == 0 ]]; then return 0; fi
    WORLD_SIZE="$1" "$PYTHON" -m factorllm_ds train --check "${@:2}" >&2 || exit 2
}

launch() {  # a line from launch_line
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$1"; exit 0; fi
    eval "exec env $1"
}

# A line from launch_line, run so that a preempted job comes back: SIGUSR1/SIGTERM to this shell are
# passed to the launcher (srun gives them to its tasks); when train then exits with a requeue code
# (138 SIGUSR1, 143 SIGTERM: preemption.REQUEUE_EXIT_CODES) or the launcher fails after such a signal
# (torchrun reports its own code), the SLURM job is requeued. Exits with the launcher's code.
launch_preemptible() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$1"; exit 0; fi
    local pid rc again signalled=0
    eval "env $1 &"
    pid=$!
    trap 'signalled=1; kill -USR1 "$pid" 2>/dev/null' USR1
    trap 'signalled=1; kill -TERM "$pid" 2>/dev/null' TERM
    while :; do
        wait "$pid"; rc=$?
        # wait returns early (128 + n) when a trapped signal arrives: go on waiting while the launcher runs
        kill -0 "$pid" 2>/dev/null || break
    done
    wait "$pid" 2>/dev/null; again=$?
    if (( again != 127 )); then rc=$again; fi
    trap - USR1 TERM
    if [[ $rc == 138 || $rc == 143 ]] || (( signalled && rc != 0 && rc != 2 )); then
        if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
            echo "$SCRIPT: preempted (exit $rc): requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint" >&2
            scontrol requeue "$SLURM_JOB_ID"
        else
            echo "$SCRIPT: preempted (exit $rc); run the same command again to resume from the last checkpoint" >&2
        fi
    fi
    exit "$rc"
}
