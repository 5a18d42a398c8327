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
gpu_count() { nvidia-smi -L | grep -c '^GPU'; }

# Launcher options -> the command line (VAR=value ... argv, shell-quoted), or with --print world the
# rank count. python -I runs the file alone: a dry run need not wait for torch to import.
launch_line() { "$PYTHON" -I "$FACTORLLM_ROOT/factorllm_ds/launcher.py" --device "$DEVICE" --python "$PYTHON" "$@"; }

check_train() {  # world size, train flags...
    if [[ "${CHECK:-1}" == 0 ]]; then return 0; fi
    local world="$1"; shift
    WORLD_SIZE="$world" "$PYTHON" -m factorllm_ds train --check "$@" >&2 || exit 2
}

launch() {  # a line from launch_line
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$1"; exit 0; fi
    eval "exec env $1"
}
