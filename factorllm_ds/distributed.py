"""Process-group set-up for the deepspeed launcher, torchrun, mpirun (mpi4py) and SLURM srun.

One place decides the rank: launcher env vars (RANK/WORLD_SIZE/LOCAL_RANK) first, then
SLURM's (one task per GPU), then MPI through DeepSpeed's mpi4py discovery. Rank 0 logs;
the others stay quiet unless they fail.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from factorllm_ds.errors import UserError

log = logging.getLogger("factorllm_ds")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def detect() -> DistInfo:
    """Work out rank and world from the environment without touching any process group."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), launcher)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
        world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1)))
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", world)))
        require_mpi4py()
        return DistInfo(rank, world, local, local_world, "mpi")
    # Only srun-started tasks carry SLURM_STEP_ID: the batch script itself also sees SLURM_PROCID=0 and
    # the job's SLURM_NTASKS, and would wait forever for ranks nobody started.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or env["SLURM_NTASKS"]
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                        int(per_node.split("(")[0].split(",")[0]), "slurm")  # e.g. "8(x2)" or "8,4"
    return DistInfo(0, 1, 0, 1, "single")


def require_mpi4py() -> None:
    """Under mpirun without an exported MASTER_ADDR, rank 0's address comes from DeepSpeed's mpi4py discovery
    (:func:`init`): say how to install mpi4py, here, before any work, instead of a ModuleNotFoundError after it."""
    import importlib.util

    if "MASTER_ADDR" in os.environ:
        return
    try:
        if importlib.util.find_spec("mpi4py") is not None:
            return
    except (ImportError, ValueError):  # an import hook that refuses it, a half-removed install
        pass
    raise UserError("started by mpirun (OMPI_COMM_WORLD_RANK / PMI_RANK is set), which needs mpi4py to find rank 0, "
                    "and mpi4py is not installed: pip install mpi4py (or pip install 'factorllm-ds[mpi]'); "
                    "or export rank 0's address to every rank: mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=29500 ...")


def init(timeout_s: int) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for whichever launcher started us."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = detect()
    ranks = dict(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if info.launcher == "single":
        ranks.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
        for name, value in ranks.items():
            os.environ.setdefault(name, value)
    # mpi: DeepSpeed's MPI discovery would replace a MASTER_ADDR the user exported (mpirun -x) with
    # `hostname -I` of rank 0: with all rank variables set it is skipped.
    if info.launcher == "slurm" or (info.launcher == "mpi" and "MASTER_ADDR" in os.environ):
        os.environ.update(ranks)
        if "MASTER_ADDR" not in os.environ:  # slurm: the job's first node
            os.environ["MASTER_ADDR"] = _first_slurm_host()
        os.environ.setdefault("MASTER_PORT", "29500")
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one host each grabbing every core run several times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info.local_world_size)))
    # distributed_port: DeepSpeed's MPI discovery sets MASTER_PORT to it (29500 unless MASTER_PORT says otherwise).
    deepspeed.init_distributed(auto_mpi_discovery=info.launcher == "mpi",
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    # DeepSpeed creates its expert and data-parallel groups with torch's default timeout (30 min
    # gloo, 10 min NCCL), not the one above: make --dist-timeout the default for every later group.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=timeout_s)
    if not on_cpu:
        # srun --gpus-per-task=1 leaves each task one visible GPU: its local rank is not a device id.
        get_accelerator().set_device(info.local_rank % max(1, get_accelerator().device_count()))
    release_shm_names(info)
    setup_logging(info.rank)
    return info


SHM_DIR = Path("/dev/shm")


def shm_buffer_names(rank: int | str = "*", addr: str | None = None, port: int | str | None = None) -> list[Path]:
    """The /dev/shm segments of DeepSpeed's CPU shared-memory all-reduce for a job (default: this process's
    MASTER_ADDR/PORT), one per rank: ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (deepspeed ops/csrc/cpu/comm). ``"*"`` matches any value."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"))


def release_shm_names(info: DistInfo) -> None:
    """Unlink this rank's shared-memory all-reduce segment as soon as every rank has mapped it.

    DeepSpeed's CPU backend (all ranks on one host, ``LOCAL_SIZE`` = world size, as the deepspeed launcher
    sets it) maps one ~66 MB /dev/shm segment per rank and never unlinks it: every run, finished or killed,
    left them behind in RAM-backed /dev/shm. After the barrier every rank holds its mappings of all segments,
    so the names are no longer needed; the memory stays mapped and the kernel frees it when the ranks exit,
    however they exit.
    """
    from deepspeed.comm import comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(info.world_size):
        return  # no segments (every rank takes the same branch: the condition is the C++ op's own)
    import torch.distributed as dist

    dist.barrier()
    for path in shm_buffer_names(info.rank):
        path.unlink(missing_ok=True)


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only at WARNING and above."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format=f"[rank{rank}] %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):  # "DeepSpeed": deepspeed.utils.logger
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def hard_exit(code: int) -> None:
    """End a worker deliberately: torch 2.13's gloo teardown can abort a rank at exit.

    Under mpirun the MPI runtime must hear how the rank ended: MPI_Finalize after success
    (an exit without it makes mpirun fail the job), MPI_Abort after a failure (so the other
    ranks are ended rather than left waiting in a collective).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        if code == 0:
            mpi.Finalize()
        else:
            mpi.COMM_WORLD.Abort(code)
    os._exit(code)


def started() -> bool:
    """Whether this process joined a process group or an MPI job (then it must end via hard_exit)."""
    import torch.distributed as dist

    mpi = sys.modules.get("mpi4py.MPI")
    return (dist.is_available() and dist.is_initialized()) or (mpi is not None and mpi.Is_initialized())
