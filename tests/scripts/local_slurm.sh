#!/usr/bin/env bash
# A real SLURM on this machine: install Debian's slurm-wlm + munge, run slurmctld and slurmd on
# localhost, submit the sbatch scripts for 2-rank expert-parallel CPU jobs, wait, check each trained
# and checkpointed, and check that a job whose task count does not fit EP_SIZE fails clearly.
#
#   sudo tests/scripts/local_slurm.sh            # Debian/Ubuntu, root; about 2-4 minutes
#   KEEP_SLURM=1 tests/scripts/local_slurm.sh    # leave the daemons running afterwards
#
# WORK (default /tmp/factorllm_slurm_test) holds the tiny model, the data, the job logs and runs.
# PYTHON: the interpreter with factorllm_ds installed (default: python on PATH).
# Not a CI test: it installs system packages and starts daemons (see docs/cluster.md).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${WORK:-/tmp/factorllm_slurm_test}"
PYTHON="${PYTHON:-$(command -v python)}"
STEPS="${STEPS:-4}"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || fail "run as root: it installs packages and starts slurmctld/slurmd"
"$PYTHON" -c "import factorllm_ds" 2>/dev/null || fail "PYTHON=$PYTHON cannot import factorllm_ds (set PYTHON or VENV)"

# One run at a time on a machine: a second would restart the first one's daemons under it.
mkdir -p /run/lock && exec 9>/run/lock/factorllm_slurm_test.lock
flock -w 900 9 || fail "another tests/scripts/local_slurm.sh is still running"

MARK="written by factorllm_ds"
if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q "$MARK" /etc/slurm/slurm.conf; then
    fail "/etc/slurm/slurm.conf exists and is not ours: this script would replace it. Run it on a scratch machine."
fi

# ---------------------------------------------------------------- install (idempotent)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }; then
        echo "could not install slurm-wlm and munge with apt-get" >&2
        exit 3  # not a SLURM failure: tests/test_slurm_scripts.py skips on it
    fi
fi
say "$(slurmctld -V), munge $(munged --version 2>&1 | awk '{print $2; exit}')"

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
STARTED_MUNGE=0
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged 9>&-  # daemons must not inherit the lock
    STARTED_MUNGE=1
    sleep 1
fi
munge -n | unmunge >/dev/null || fail "munge does not work (see /var/log/munge/munged.log)"
say "munge is up"

# ---------------------------------------------------------------- slurm.conf for one node: this host
HOST="$(hostname -s)"
CPUS="$(nproc --all)"  # plain nproc follows OMP_NUM_THREADS
MEM_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
# $MARK: one node, this host, no cgroups, no accounting
ClusterName=factorllm-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# ---------------------------------------------------------------- daemons (restarted with this config)
for daemon in slurmd slurmctld; do
    if [[ -f /run/$daemon.pid ]] && kill -0 "$(cat /run/$daemon.pid)" 2>/dev/null; then
        kill "$(cat /run/$daemon.pid)"
        sleep 1
    fi
done
slurmctld -i 9>&-
slurmd 9>&-
cleanup() {
    if [[ "${KEEP_SLURM:-0}" != 1 ]]; then
        scontrol shutdown >/dev/null 2>&1 || true
        if [[ "$STARTED_MUNGE" == 1 && -f /run/munge/munged.pid ]]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # run the cleanup on Ctrl-C / kill too
for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
    sleep 1
done
sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)' || { sinfo -N; tail -20 /var/log/slurm/slurmd.log; fail "the node did not come up"; }
say "slurm is up: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"

# ---------------------------------------------------------------- a tiny converted model and data
rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$REPO" && "$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import tiny
work = Path(sys.argv[1])
dense = tiny.build_dense(work / "dense", "llama")
tiny.build_tiny_moe(work / "moe", dense)
tiny.write_calibration_text(work / "train.txt")
EOF
)
say "tiny model converted to $WORK/moe (E=4, k=2)"

# ---------------------------------------------------------------- jobs
COMMON=(MODEL="$WORK/moe" DATA="$WORK/train.txt" EP_SIZE=2 REPO="$REPO" PATH="$(dirname "$PYTHON"):$PATH")
TRAIN_FLAGS=(--seq-len 64 --steps "$STEPS" --lr 1e-3 --warmup-steps 0 --micro-batch-size 1 --global-batch-size 2)

submit() {  # name, sbatch options..., -- , env...
    local name="$1"; shift
    local opts=() envs=()
    while [[ "$1" != -- ]]; do opts+=("$1"); shift; done; shift
    envs=("$@")
    say "sbatch ${opts[*]} (${envs[*]})"
    local job state reason rc log deadline=$(( $(date +%s) + ${JOB_TIMEOUT:-600} ))
    job="$(cd "$REPO" && env "${COMMON[@]}" OUT="$WORK/run_$name" "${envs[@]}" \
        sbatch --parsable --job-name="$name" --output="$WORK/$name-%j.out" "${opts[@]}" "${TRAIN_FLAGS[@]}")"
    while :; do  # wait for the job, but never forever: a job SLURM cannot place stays PENDING
        read -r state reason < <(squeue -h -j "$job" -o '%T %r' 2>/dev/null || true)
        [[ -z "${state:-}" ]] && break
        if (( $(date +%s) > deadline )); then
            scancel "$job"
            fail "job $job still $state ($reason) after ${JOB_TIMEOUT:-600} s"
        fi
        sleep 2
    done
    rc="$(scontrol show job "$job" | sed -n 's/.* ExitCode=\([0-9]*\):.*/\1/p')"
    [[ -n "$rc" ]] || fail "no exit code for job $job"
    log="$WORK/$name-$job.out"
    echo "----- $log (exit $rc) -----"
    grep -vE 'FutureWarning|return func|^\s*$' "$log" | tail -n 15
    echo "-----"
    return $rc
}

check_run() {  # run dir
    local run="$1" ckpt="$1/checkpoints/step$STEPS"
    [[ -f "$run/checkpoints/latest" && "$(cat "$run/checkpoints/latest")" == "step$STEPS" ]] || fail "$run: no checkpoint step$STEPS"
    for f in mp_rank_00_model_states.pt zero_pp_rank_0_mp_rank_00_optim_states.pt zero_pp_rank_1_mp_rank_00_optim_states.pt \
             layer_0_expert_0_mp_rank_00_model_states.pt layer_1_expert_3_mp_rank_00_model_states.pt; do
        [[ -f "$ckpt/$f" ]] || fail "$ckpt/$f is missing"
    done
    local rows
    rows="$(($(wc -l < "$run/metrics.csv") - 1))"
    [[ "$rows" == "$STEPS" ]] || fail "$run/metrics.csv has $rows rows, expected $STEPS"
    grep -q '"world_size": 2' "$run/run.json" || fail "$run/run.json: not a 2-rank run"
    grep -q '"ep_size": 2' "$run/run.json" || fail "$run/run.json: not ep_size 2"
    say "OK $run: $rows steps logged, checkpoint $(ls "$ckpt" | wc -l) files, $(tail -n 1 "$run/metrics.csv" | cut -d, -f1-4)"
}

# 1. one task per rank: 2 SLURM tasks, ranks from SLURM_PROCID
submit tasks --ntasks=2 --cpus-per-task=1 slurm/train_tasks.sbatch -- || fail "the 2-task job failed"
check_run "$WORK/run_tasks"

# 2. one task per node running torchrun with 2 ranks (the 1-node x N-GPU script, N=2 on CPU)
submit torchrun --nodes=1 --ntasks-per-node=1 --cpus-per-task="$CPUS" slurm/train_1node.sbatch -- NPROC=2 \
    || fail "the torchrun job failed"
check_run "$WORK/run_torchrun"

# 3. bad input: 3 tasks cannot be split into expert-parallel groups of 2; the job must say so and fail
if submit badtasks --ntasks=3 --cpus-per-task=1 --overcommit slurm/train_tasks.sbatch --; then
    fail "a 3-task job with EP_SIZE=2 succeeded"
fi
grep -q "EP_SIZE=2 does not divide the job's 3 ranks" "$WORK"/badtasks-*.out || fail "no clear message for 3 tasks / EP_SIZE=2"
say "OK a 3-task job with EP_SIZE=2 fails before starting any rank, with: $(grep -o "EP_SIZE=2 does not divide.*" "$WORK"/badtasks-*.out)"

say "all SLURM checks passed"
