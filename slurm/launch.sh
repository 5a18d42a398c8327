#!/usr/bin/env bash
# The body every slurm/*.sbatch runs: check the job against the allocation, then srun the ranks.
#
# MODE=torchrun  one task per node; each runs torchrun with NPROC ranks, c10d rendezvous on the first node
# MODE=tasks     one task per rank (per GPU); ranks come from SLURM_PROCID / SLURM_NTASKS
#
# MODEL (required)  converted FactorLLM folder       DATA (required)  training text file(s), space-separated
# OUT               run directory (default runs/slurm-$SLURM_JOB_ID)
# DS_CONFIG         DeepSpeed JSON (default ds_configs/zero2_bf16.json on GPU, ds_configs/zero2.json on CPU)
# EP_SIZE           expert-parallel size (default 1)     NPROC  ranks per node in MODE=torchrun (default: GPUs)
# MASTER_PORT       rendezvous port (default 20000 + job id % 20000)
# REPO              the factorllm_ds checkout (default: where sbatch was run)
# DRY_RUN=1         print the srun command instead of running it (works outside an allocation too)
# VENV, PYTHON, DEVICE, CHECK: see launch/common.sh. Extra arguments are passed to `factorllm-ds train`.
#
# Preemption and requeue (the sbatch scripts ask for --signal=B:USR1@120 and --requeue): SIGUSR1 or
# SIGTERM to this script goes to srun, which passes it to its tasks; torchrun passes it on to the ranks
# (TORCHELASTIC_SIGNALS_TO_HANDLE below) and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 110) seconds
# for their save. Every rank finishes its step, a checkpoint is saved and train exits 138 (USR1) or 143
# (TERM); this script then runs `scontrol requeue`. A job that starts with a run in OUT (a requeued one: OUT
# defaults to runs/slurm-$SLURM_JOB_ID, which a requeue keeps) passes --resume when it holds a finished
# checkpoint, else --restart (it died before its first one).
set -euo pipefail
SCRIPT=slurm/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

MODE="${MODE:-torchrun}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$FACTORLLM_ROOT}}"
[[ -d "$REPO/factorllm_ds" ]] || die "REPO=$REPO is not the factorllm_ds checkout; submit from it or set REPO"
cd "$REPO"

[[ -n "${SLURM_JOB_ID:-}" || "${DRY_RUN:-0}" == 1 ]] ||
    die "not inside a SLURM allocation: submit with sbatch (or set DRY_RUN=1 to see the command)"
JOB_ID="${SLURM_JOB_ID:-0}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${NNODES:-1}}}"
if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
HEAD_NODE="${HEAD_NODE:-$(hostname -s)}"
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
EP_SIZE="${EP_SIZE:-1}"
OUT="${OUT:-runs/slurm-$JOB_ID}"
if [[ "$DEVICE" == gpu ]]; then DS_CONFIG="${DS_CONFIG:-ds_configs/zero2_bf16.json}"; else DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"; fi

case "$MODE" in
    torchrun)
        NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-$(default_nproc)}}"
        WORLD=$((NNODES * NPROC))
        WHAT="$NNODES node(s) x NPROC=$NPROC"
        OPTS=(--launcher torchrun --per-node-srun --nnodes "$NNODES" --nproc "$NPROC" --rdzv-id "$JOB_ID") ;;
    tasks)
        WORLD="${SLURM_NTASKS:-${NTASKS:-1}}"
        WHAT="SLURM_NTASKS=$WORLD task(s)"
        OPTS=(--launcher srun --nproc "$WORLD") ;;
    *) die "MODE=$MODE: expected torchrun or tasks" ;;
esac

# What only the allocation can tell, checked here with SLURM's words; the rest by train --check.
problems=()
[[ -n "${MODEL:-}" ]] || problems+=("MODEL is not set: export MODEL=/path/to/converted_moe (factorllm-ds convert)")
[[ -n "${DATA:-}" ]] || problems+=("DATA is not set: export DATA=/path/to/train.txt")
if [[ ! "$EP_SIZE" =~ ^[1-9][0-9]*$ ]]; then
    problems+=("EP_SIZE=$EP_SIZE: expected a positive integer")
elif (( WORLD % EP_SIZE )); then
    problems+=("EP_SIZE=$EP_SIZE does not divide the job's $WORLD ranks ($WHAT): request a multiple of $EP_SIZE ranks (e.g. sbatch --ntasks=$(( (WORLD / EP_SIZE + 1) * EP_SIZE ))) or set EP_SIZE to a divisor of $WORLD")
fi
if (( ${#problems[@]} )); then
    printf '%s\n' "${problems[@]/#/$SCRIPT: error: }" >&2
    exit 2
fi

# shellcheck disable=SC2206  # DATA is a space-separated list of files
TRAIN=(--model "$MODEL" --data $DATA --out "$OUT" --ds-config "$DS_CONFIG" --ep-size "$EP_SIZE" --no-progress "$@")
# A run in OUT: this job was requeued (or resubmitted with the same OUT). With a finished checkpoint (latest, or a
# tag whose checksums.json rank 0 wrote last) it goes on with --resume, which verifies it first; a run that died
# before its first one starts again with --restart (train's rules: only its own files are replaced, and it is
# refused if a checkpoint appeared). Flags of the user's that pick either are left as given.
finished() { [[ -f "$OUT/checkpoints/latest" ]] || compgen -G "$OUT/checkpoints/*/checksums.json" >/dev/null; }
picked=' --(resume|resume-tag|restart)[ =]'
if [[ -f "$OUT/run.json" && ! " $* " =~ $picked ]]; then
    if finished; then TRAIN+=(--resume); else TRAIN+=(--restart); fi
fi
check_train "$WORLD" "${TRAIN[@]}"
LINE="$(launch_line "${OPTS[@]}" --master-addr "$HEAD_NODE" --master-port "$MASTER_PORT" -- train "${TRAIN[@]}")"
echo "job ${JOB_ID}: $WHAT = $WORLD ranks, ep_size $EP_SIZE, $DEVICE, master $HEAD_NODE:$MASTER_PORT" >&2
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}"
launch_preemptible "$LINE"
