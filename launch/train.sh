#!/usr/bin/env bash
# Launch `factorllm-ds train` with torchrun, the deepspeed launcher or mpirun; all settings from env.
#
#   launch/train.sh --model MOE --data train.txt --out runs/x --ep-size 2 --ds-config ds_configs/zero2.json
#   LAUNCHER=mpirun NPROC=2 launch/train.sh ...           # OpenMPI; ranks found through mpi4py
#   LAUNCHER=deepspeed HOSTFILE=hosts launch/train.sh ... # multi-node deepspeed launcher (pdsh/ssh)
#   DRY_RUN=1 launch/train.sh ...                         # print the command, run nothing
#
# LAUNCHER   torchrun (default) | deepspeed | mpirun
# NPROC      processes per node (default: the GPUs nvidia-smi lists; 1 on CPU)
# NNODES     nodes (default 1; with HOSTFILE, the hosts in it)   NODE_RANK  this node (torchrun, default 0)
# MASTER_ADDR / MASTER_PORT  rendezvous (default 127.0.0.1, or the first HOSTFILE host / 29500)
# HOSTFILE   "host slots=N" lines (deepspeed, mpirun); see launch/hostfile.example
# DEVICE     auto (default) | gpu | cpu. On CPU: DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 per rank
# DS_LAUNCHER  the deepspeed launcher's multi-node backend: pdsh (default), openmpi, slurm, ...
#            (remote nodes get the variables listed in ./.deepspeed_env or ~/.deepspeed_env, KEY=VALUE lines)
# DS_FORCE_MULTI=1  take the deepspeed launcher's multi-node path even for a one-host HOSTFILE
# MPI_ARGS   extra mpirun flags      VENV  a virtualenv whose bin/ goes first on PATH
set -euo pipefail

LAUNCHER="${LAUNCHER:-torchrun}"
DEVICE="${DEVICE:-auto}"
HOSTFILE="${HOSTFILE:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -n "${VENV:-}" ]]; then export PATH="$VENV/bin:$PATH"; fi

die() { echo "launch/train.sh: error: $*" >&2; exit 2; }

if [[ -n "$HOSTFILE" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: no such file. Write one 'hostname slots=N' line per node (see launch/hostfile.example), or unset HOSTFILE for a single node."
    mapfile -t HOSTS < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
    [[ ${#HOSTS[@]} -gt 0 ]] || die "HOSTFILE=$HOSTFILE lists no hosts ('hostname slots=N' lines)"
    NNODES="${NNODES:-${#HOSTS[@]}}"
    MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
    # Processes per node: the first host's slots unless NPROC says otherwise.
    NPROC="${NPROC:-$(awk '!/^[[:space:]]*(#|$)/ {n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); print n; exit}' "$HOSTFILE")}"
fi

if [[ "$DEVICE" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
case "$DEVICE" in
    gpu) NPROC="${NPROC:-$(nvidia-smi -L | grep -c '^GPU')}" ;;
    cpu) NPROC="${NPROC:-1}"
         # Several ranks each using every core run several times slower than one thread each.
         export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ;;
    *) die "DEVICE=$DEVICE: expected auto, gpu or cpu" ;;
esac
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: expected a positive number of processes per node"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: expected a positive number of nodes"

case "$LAUNCHER" in
    torchrun)
        CMD=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC")
        if [[ "$NNODES" -gt 1 ]]; then
            # c10d rendezvous on the first node: every node runs the same command, no node ranks needed.
            CMD+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-factorllm}")
        else
            CMD+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        fi
        CMD+=(-m factorllm_ds train) ;;
    deepspeed)
        # --no_local_rank: the launcher would otherwise put --local_rank=N before the subcommand.
        CMD=(deepspeed --no_local_rank --master_port "$MASTER_PORT")
        if [[ -n "$HOSTFILE" ]]; then
            CMD+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --num_nodes "$NNODES" --num_gpus "$NPROC"
                  --launcher "${DS_LAUNCHER:-pdsh}")
            # The launcher checks passwordless ssh to the first host even when it is this machine alone.
            if [[ "$NNODES" == 1 && "${HOSTS[0]}" =~ ^(localhost|127\.0\.0\.1|$(hostname -s)|$(hostname))$ ]]; then
                CMD+=(--no_ssh_check)
            fi
            # DS_FORCE_MULTI=1 takes the multi-node path (pdsh/openmpi backend) even for one host: a rehearsal.
            if [[ "${DS_FORCE_MULTI:-0}" == 1 ]]; then CMD+=(--force_multi); fi
        else
            CMD+=(--num_gpus "$NPROC")  # on CPU it would otherwise count NUMA nodes
        fi
        CMD+=(--module factorllm_ds train) ;;
    mpirun)
        CMD=(mpirun -np "$((NNODES * NPROC))" --bind-to none)
        if [[ -n "$HOSTFILE" ]]; then CMD+=(--hostfile "$HOSTFILE" --npernode "$NPROC"); fi
        if [[ "$(id -u)" == 0 ]]; then CMD+=(--allow-run-as-root); fi
        # mpirun starts remote ranks with its own environment: forward what the ranks need.
        export MASTER_ADDR MASTER_PORT
        for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS \
                   HF_HOME HF_HUB_OFFLINE TORCH_EXTENSIONS_DIR FACTORLLM_DS_CACHE CUDA_VISIBLE_DEVICES NCCL_DEBUG; do
            if [[ -n "${!var:-}" ]]; then CMD+=(-x "$var"); fi
        done
        # shellcheck disable=SC2206  # MPI_ARGS is a list of flags
        CMD+=(${MPI_ARGS:-} "${PYTHON:-python}" -m factorllm_ds train) ;;
    *) die "LAUNCHER=$LAUNCHER: expected torchrun, deepspeed or mpirun" ;;
esac
CMD+=("$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    ENV_SHOWN=""
    for var in DS_ACCELERATOR OMP_NUM_THREADS; do
        if [[ -n "${!var:-}" ]]; then ENV_SHOWN+="$var=${!var} "; fi
    done
    echo "${ENV_SHOWN}$(printf '%q ' "${CMD[@]}" | sed 's/ $//')"
    exit 0
fi
exec "${CMD[@]}"
