#!/usr/bin/env bash
# OpenMPI mpirun: NNODES x NPROC ranks; each finds its rank through mpi4py (DeepSpeed's MPI discovery).
#
#   NPROC=2 DEVICE=cpu launch/mpirun.sh --model moe/ --data train.txt --out runs/m --ep-size 2 --ds-config ds_configs/zero2.json
#   HOSTFILE=hosts NPROC=8 launch/mpirun.sh ...          # "host slots=8" lines; MASTER_ADDR = first host
#   MPI_ARGS="--mca btl_tcp_if_include eth0" launch/mpirun.sh ...
#
# Needs mpi4py (pip install 'factorllm-ds[mpi]') and the same Python environment on every host.
# DRY_RUN=1 prints the command. All variables: launch/train.sh.
set -euo pipefail
LAUNCHER=mpirun exec "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$@"
