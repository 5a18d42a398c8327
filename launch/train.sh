#!/usr/bin/env bash
# Launch `factorllm-ds train` with torchrun, the deepspeed launcher or mpirun; all settings from env.
#
#   launch/train.sh --model MOE --data train.txt --out runs/x --ep-size 2 --ds-config ds_configs/zero2.json
#   LAUNCHER=mpirun NPROC=2 launch/train.sh ...           # OpenMPI; ranks found through mpi4py
#   LAUNCHER=deepspeed HOSTFILE=hosts launch/train.sh ... # multi-node deepspeed launcher (pdsh/ssh)
#   DRY_RUN=1 launch/train.sh ...                         # print the command, run nothing
#
# LAUNCHER   torchrun (default) | deepspeed | mpirun | srun | python
# NPROC      processes per node (default: the GPUs nvidia-smi lists; 1 on CPU)
# NNODES     nodes (default 1; with HOSTFILE, the hosts in it)   NODE_RANK  this node (torchrun, default 0)
# MASTER_ADDR / MASTER_PORT  rendezvous (default 127.0.0.1, or the first HOSTFILE host / 29500)
# HOSTFILE   "host slots=N" lines (deepspeed, mpirun); see launch/hostfile.example
# DEVICE     auto (default) | gpu | cpu. On CPU: DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 per rank
# DS_LAUNCHER  the deepspeed launcher's multi-node backend: pdsh (default), openmpi, slurm, ...
#            (remote nodes get the variables listed in ./.deepspeed_env or ~/.deepspeed_env, KEY=VALUE lines)
# DS_FORCE_MULTI=1  take the deepspeed launcher's multi-node path even for a one-host HOSTFILE
# RDZV_ID    torchrun rendezvous id on several nodes    MPI_ARGS  extra mpirun flags
# VENV, PYTHON, CHECK, DRY_RUN: see launch/common.sh. Defaults and the command: factorllm_ds/launcher.py.
set -euo pipefail
SCRIPT=launch/train.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z "${NPROC:-}" && -z "${HOSTFILE:-}" ]]; then NPROC="$(default_nproc)"; fi  # HOSTFILE: the first host's slots
OPTS=(--launcher "${LAUNCHER:-}" --nproc "${NPROC:-}" --nnodes "${NNODES:-}" --node-rank "${NODE_RANK:-}"
      --master-addr "${MASTER_ADDR:-}" --master-port "${MASTER_PORT:-}" --rdzv-id "${RDZV_ID:-}"
      --hostfile "${HOSTFILE:-}" --ds-launcher "${DS_LAUNCHER:-}" --force-multi="${DS_FORCE_MULTI:-0}"
      --mpi-args="${MPI_ARGS:-}")
LINE="$(launch_line "${OPTS[@]}" -- train "$@")"
check_train "$(launch_line "${OPTS[@]}" --print world)" "$@"
launch "$LINE"
