#!/usr/bin/env bash
# torchrun: one node, or several with a c10d rendezvous on MASTER_ADDR (run the same line on every node).
#
#   NPROC=8 launch/torchrun.sh --model moe/ --data train.txt --out runs/a --ep-size 4 --ds-config ds_configs/zero2_bf16.json
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 launch/torchrun.sh ...      # on node0 and on node1
#   DEVICE=cpu NPROC=2 launch/torchrun.sh ... --ep-size 2 --ds-config ds_configs/zero2.json
#
# DRY_RUN=1 prints the command. All variables: launch/train.sh.
set -euo pipefail
LAUNCHER=torchrun exec "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$@"
