#!/usr/bin/env bash
# The body every slurm/*.sbatch runs: check the job against the allocation, then srun the ranks.
#
# MODE=torchrun  one task per node; each runs launch/train.sh (torchrun, NPROC ranks), first node = master
# MODE=tasks     one task per rank (per GPU); ranks come from SLURM_PROCID / SLURM_NTASKS
#
# MODEL (required)  converted FactorLLM folder       DATA (required)  training text file(s), space-separated
# OUT               run directory (default runs/slurm-$SLURM_JOB_ID)
# DS_CONFIG         DeepSpeed JSON (default ds_configs/zero2_bf16.json on GPU, ds_configs/zero2.json on CPU)
# EP_SIZE           expert-parallel size (default 1)     NPROC  ranks per node in MODE=torchrun (default: GPUs)
# MASTER_PORT       rendezvous port (default 20000 + job id % 20000)
# REPO              the factorllm_ds checkout (default: where sbatch was run)   VENV  virtualenv to put on PATH
# DRY_RUN=1         print the srun command instead of running it (works outside an allocation too)
# Extra arguments are passed to `factorllm-ds train`.
set -euo pipefail

die() { echo "slurm/launch.sh: error: $*" >&2; exit 2; }

MODE="${MODE:-torchrun}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
if [[ -n "${VENV:-}" ]]; then export PATH="$VENV/bin:$PATH"; fi
[[ -x "$REPO/launch/train.sh" ]] || die "REPO=$REPO has no launch/train.sh; submit from the factorllm_ds checkout or set REPO"
cd "$REPO"

if [[ -z "${SLURM_JOB_ID:-}" && "${DRY_RUN:-0}" != 1 ]]; then
    die "not inside a SLURM allocation: submit with sbatch (or set DRY_RUN=1 to see the command)"
fi
JOB_ID="${SLURM_JOB_ID:-0}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${NNODES:-1}}}"
if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
    HEAD_NODE="${HEAD_NODE:-$(hostname -s)}"
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
EP_SIZE="${EP_SIZE:-1}"
OUT="${OUT:-runs/slurm-$JOB_ID}"
if [[ "$DEVICE" == gpu ]]; then DS_CONFIG="${DS_CONFIG:-ds_configs/zero2_bf16.json}"; else DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"; fi

case "$MODE" in
    torchrun)
        NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-}}"
        if [[ -z "$NPROC" ]]; then
            if [[ "$DEVICE" == gpu ]]; then NPROC="$(nvidia-smi -L | grep -c '^GPU')"; else NPROC=1; fi
        fi
        WORLD=$((NNODES * NPROC))
        WHAT="$NNODES node(s) x NPROC=$NPROC" ;;
    tasks)
        WORLD="${SLURM_NTASKS:-${NTASKS:-1}}"
        WHAT="SLURM_NTASKS=$WORLD task(s)" ;;
    *) die "MODE=$MODE: expected torchrun or tasks" ;;
esac

# Everything checkable is checked here, before any rank starts: one message per problem.
problems=()
[[ -n "${MODEL:-}" ]] || problems+=("MODEL is not set: export MODEL=/path/to/converted_moe (factorllm-ds convert)")
[[ -n "${DATA:-}" ]] || problems+=("DATA is not set: export DATA=/path/to/train.txt")
[[ "$EP_SIZE" =~ ^[1-9][0-9]*$ ]] || problems+=("EP_SIZE=$EP_SIZE: expected a positive integer")
if [[ -n "${MODEL:-}" ]]; then
    if [[ ! -f "$MODEL/config.json" ]]; then
        problems+=("MODEL=$MODEL: no config.json there (a folder made by factorllm-ds convert)")
    elif [[ "$EP_SIZE" =~ ^[1-9][0-9]*$ ]]; then
        EXPERTS="$(sed -n 's/^[[:space:]]*"num_experts":[[:space:]]*\([0-9]*\).*/\1/p' "$MODEL/config.json" | head -n 1)"
        if [[ -n "$EXPERTS" ]] && (( EXPERTS % EP_SIZE )); then
            problems+=("EP_SIZE=$EP_SIZE does not divide the model's $EXPERTS experts ($MODEL/config.json)")
        fi
    fi
fi
for f in ${DATA:-}; do
    if [[ "$f" == /* || "$f" == ./* || "$f" == *.* ]] && [[ ! -e "$f" ]]; then problems+=("DATA: $f: no such file"); fi
done
[[ -f "$DS_CONFIG" ]] || problems+=("DS_CONFIG=$DS_CONFIG: no such file (see ds_configs/)")
if [[ "$EP_SIZE" =~ ^[1-9][0-9]*$ ]] && (( WORLD % EP_SIZE )); then
    problems+=("EP_SIZE=$EP_SIZE does not divide the job's $WORLD ranks ($WHAT): request a multiple of $EP_SIZE ranks (e.g. sbatch --ntasks=$(( (WORLD / EP_SIZE + 1) * EP_SIZE ))) or set EP_SIZE to a divisor of $WORLD")
fi
if (( ${#problems[@]} )); then
    printf 'slurm/launch.sh: error: %s\n' "${problems[@]}" >&2
    exit 2
fi

# shellcheck disable=SC2206  # DATA is a space-separated list of files
TRAIN=(--model "$MODEL" --data $DATA --out "$OUT" --ds-config "$DS_CONFIG" --ep-size "$EP_SIZE" --no-progress "$@")
export MASTER_ADDR="$HEAD_NODE" MASTER_PORT
if [[ "$DEVICE" == cpu ]]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

if [[ "$MODE" == torchrun ]]; then
    # One task per node; each runs torchrun with NPROC ranks (c10d rendezvous on the head node).
    CMD=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
         env LAUNCHER=torchrun NNODES="$NNODES" NPROC="$NPROC" RDZV_ID="$JOB_ID" launch/train.sh "${TRAIN[@]}")
else
    # One task per rank; --mpi=none so no PMI variables make the ranks look like an mpirun job.
    CMD=(srun --ntasks "$WORLD" --mpi=none --kill-on-bad-exit=1 python -m factorllm_ds train "${TRAIN[@]}")
fi

echo "job ${JOB_ID}: $WHAT = $WORLD ranks, ep_size $EP_SIZE, $DEVICE, master $MASTER_ADDR:$MASTER_PORT" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    ENV_SHOWN="MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT "
    [[ "$DEVICE" == cpu ]] && ENV_SHOWN+="DS_ACCELERATOR=cpu OMP_NUM_THREADS=$OMP_NUM_THREADS "
    echo "${ENV_SHOWN}$(printf '%q ' "${CMD[@]}" | sed 's/ $//')"
    exit 0
fi
exec "${CMD[@]}"
