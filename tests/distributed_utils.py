"""Launch ``python -m factorllm_ds ...`` in N real processes the way users do, and collect the output.

``run(launcher, nproc, args)`` starts torchrun, the deepspeed launcher, mpirun, or a plain
single process, waits with a timeout and returns a :class:`Result` (exit code, the combined
stdout+stderr, seconds). A launch that outlives its timeout has its whole process tree
killed, so a hung collective fails one test instead of hanging the suite.
``start(...)`` returns a :class:`Job` for tests that act on a running job (kill a rank).

Every worker gets ``DS_ACCELERATOR=cpu`` and ``OMP_NUM_THREADS=1`` (two ranks each using
every core run several times slower), offline Hugging Face, the venv's ``bin`` first on
``PATH`` and one stable ``TORCH_EXTENSIONS_DIR``, so DeepSpeed's shared-memory comm op is
JIT-built once per machine (about 30 s), not once per launch.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from factorllm_ds.launcher import Launch, command as launch_command, train_argv

BIN = Path(sys.executable).parent
# The tests' own build folder (an exported TORCH_EXTENSIONS_DIR wins): shared with processes that
# find another ninja first on PATH, the op would be rebuilt at every launch (see worker_env).
EXTENSIONS_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR")
                      or Path.home() / ".cache" / "factorllm_ds" / "torch_extensions_tests")
DEFAULT_TIMEOUT = 300  # seconds; a 2-rank tiny run takes ~15 s once the comm op is built

# Rank/rendezvous variables of an enclosing launcher must not leak into the jobs we start.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE")
_LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "TORCHELASTIC_")


def mpi_missing() -> str | None:
    """Why mpirun launches cannot run here, or None (checked without initialising MPI in this process)."""
    import importlib.util
    import shutil

    if shutil.which("mpirun") is None:
        return "OpenMPI's mpirun is not installed (apt-get install openmpi-bin)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py)"
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # The venv's bin first, as for a user with the venv activated: its ninja (1.13) and Debian's
    # (1.11) hash build commands differently, so mixing them rebuilds the comm op on every launch.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


def command(launcher: str, nproc: int, args: list[str], port: int, env: dict[str, str] | None = None,
            mpi_discovery: bool = False) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) a user would run for ``python -m factorllm_ds ARGS`` on ``nproc`` ranks."""
    spec = Launch(launcher, nproc=nproc, master_port=port, device="cpu", bin_dir=BIN, python=sys.executable,
                  mpi_args=["--oversubscribe"] if launcher == "mpirun" else [], mpi_discovery=mpi_discovery)
    return launch_command(spec, list(map(str, args)), environ=env)


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    output: str  # stdout and stderr of the launcher and every rank, interleaved
    seconds: float

    def tail(self, chars: int = 6000) -> str:
        return f"$ {' '.join(self.cmd)}\n[exit {self.returncode} after {self.seconds:.1f}s]\n" + self.output[-chars:]

    def check(self) -> Result:
        assert self.returncode == 0, self.tail()
        return self


def _kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything below it."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class Job:
    """A running launch; use as a context manager so it never outlives the test."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None, port: int | None = None):
        self.cmd, self.port = cmd, port
        self._log = tempfile.TemporaryFile(mode="w+b")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env, cwd=cwd, start_new_session=True)

    def workers(self) -> list[psutil.Process]:
        """The rank processes (``python -m factorllm_ds``) below the launcher."""
        found = []
        try:
            below = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # the launcher has exited
            return []
        for proc in below:
            try:
                cmdline = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if any(a == "-m" and b == "factorllm_ds" for a, b in zip(cmdline, cmdline[1:])):
                found.append(proc)
        return found

    def rank_of(self, proc: psutil.Process) -> int:
        env = proc.environ()
        return int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", -1)))

    def listening_ports(self) -> set[int]:
        """TCP ports the ranks listen on now (rank 0 holds the rendezvous store on MASTER_PORT)."""
        ports = set()
        for proc in self.workers():
            try:
                ports |= {c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                continue
        return ports

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> Result:
        try:
            self.popen.wait(timeout=timeout)
            code = self.popen.returncode
        except subprocess.TimeoutExpired:
            _kill_tree(self.popen.pid)
            self.popen.wait()
            code = -int(signal.SIGKILL)
            self._log.write(f"\n[distributed_utils: killed after the {timeout}s timeout]\n".encode())
        return Result(self.cmd, code, self.output(), time.monotonic() - self.started)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        if self.popen.poll() is None:
            _kill_tree(self.popen.pid)
            self.popen.wait()
        self._log.close()


def start(launcher: str, nproc: int, args: list[str], *, env: dict[str, str] | None = None,
          cwd: Path | None = None, mpi_discovery: bool = False) -> Job:
    """Start ``python -m factorllm_ds ARGS`` on ``nproc`` ranks through ``launcher``, on a free port."""
    port = free_port()
    full_env = worker_env(env)
    # mpirun: MASTER_PORT is exported (a free port, not DeepSpeed's fixed 29500), and MASTER_ADDR
    # unless rank 0's address is to come from DeepSpeed's mpi4py discovery.
    cmd, extra = command(launcher, nproc, args, port, full_env, mpi_discovery)
    return Job(cmd, {**full_env, **extra}, cwd, port)


def run_command(cmd: list[str], *, timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Result:
    """Run an arbitrary command line with the workers' environment, the timeout and the tree kill."""
    with Job(list(map(str, cmd)), worker_env(env), cwd) as job:
        return job.wait(timeout)


def run(launcher: str, nproc: int, args: list[str], *, timeout: float = DEFAULT_TIMEOUT,
        env: dict[str, str] | None = None, cwd: Path | None = None, mpi_discovery: bool = False) -> Result:
    """Launch, wait (killing the tree after ``timeout`` seconds) and return the result."""
    with start(launcher, nproc, args, env=env, cwd=cwd, mpi_discovery=mpi_discovery) as job:
        return job.wait(timeout)


def train_args(model: Path, data: Path, out: Path, *, steps: int, ep_size: int, micro_batch_size: int = 1,
               global_batch_size: int = 2, seq_len: int = 64, lr: float = 1e-2, ds_config: Path | None = None,
               extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``train`` flags for the tiny model: no warm-up, no progress bar, explicit batch sizes."""
    return train_argv(dict(model=model, data=[data], out=out, seq_len=seq_len, steps=steps, lr=lr, warmup_steps=0,
                           micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                           ep_size=ep_size, progress=False, ds_config=ds_config)) + [str(a) for a in extra]


def read_metrics(out: Path) -> list[dict[str, float | None]]:
    """``metrics.csv`` rows as numbers (empty cells -> None)."""
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def checkpoint_problems(out: Path, step: int, num_layers: int, num_experts: int, world: int,
                        optim_prefix: str = "") -> list[str]:
    """What is missing from ``out/checkpoints/step{step}`` (DeepSpeed's MoE layout, docs/method.md §5).

    ``optim_prefix``: "bf16_" for bf16 runs, whose ZeRO files are ``bf16_zero_pp_rank_*``.
    """
    ckpt = Path(out) / "checkpoints"
    tag = ckpt / f"step{step}"
    expected = {"mp_rank_00_model_states.pt"}
    expected |= {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
                 for layer in range(num_layers) for e in range(num_experts)}
    expected |= {f"{optim_prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)}
    problems = [f"missing {tag.name}/{name}" for name in sorted(expected) if not (tag / name).is_file()]
    latest = ckpt / "latest"
    if not latest.is_file() or latest.read_text().strip() != tag.name:
        problems.append(f"checkpoints/latest does not name {tag.name}")
    return problems
