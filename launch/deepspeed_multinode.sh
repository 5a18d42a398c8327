#!/usr/bin/env bash
# The deepspeed launcher across the hosts of a hostfile (pdsh over passwordless ssh by default).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed_multinode.sh --model moe/ --data train.txt --out runs/d \
#       --ep-size 4 --ds-config ds_configs/zero2_bf16.json
#   HOSTFILE=hosts DS_LAUNCHER=openmpi launch/deepspeed_multinode.sh ...   # mpirun instead of pdsh
#
# Remote ranks get the variables named in ./.deepspeed_env (KEY=VALUE lines), e.g. DS_ACCELERATOR=cpu.
# DRY_RUN=1 prints the command. All variables: launch/train.sh.
set -euo pipefail
if [[ -z "${HOSTFILE:-}" ]]; then
    echo "launch/deepspeed_multinode.sh: error: set HOSTFILE to a file of 'hostname slots=N' lines (see launch/hostfile.example)" >&2
    exit 2
fi
LAUNCHER=deepspeed exec "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$@"
