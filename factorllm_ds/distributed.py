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

import torch

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
        return DistInfo(rank, world, local, local_world, "mpi")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                        int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]), "slurm")
    return DistInfo(0, 1, 0, 1, "single")


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init(timeout_s: int) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for whichever launcher started us."""
    import deepspeed

    info = detect()
    if info.launcher == "slurm":
        os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", "29500")
    if info.launcher == "single":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if on_cpu() and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one host each grabbing every core run several times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info.local_world_size)))
    deepspeed.init_distributed(auto_mpi_discovery=info.launcher == "mpi",
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    if not on_cpu():
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(info.local_rank)
    setup_logging(info.rank)
    return info


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only at WARNING and above."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format=f"[rank{rank}] %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def hard_exit(code: int) -> None:
    """End a worker deliberately: torch 2.13's gloo teardown can abort a rank at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
