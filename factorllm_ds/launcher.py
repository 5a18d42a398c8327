"""The command that starts `python -m factorllm_ds ARGS` on N ranks: one builder for every launcher.

``command(Launch(...), args)`` -> (argv, environment additions) for torchrun, the deepspeed
launcher, mpirun, srun (one task per rank) or one python process; ``args`` is the factorllm_ds
argv, or a ``TrainConfig`` / dict rendered as ``train`` flags. From a shell,
``python -m factorllm_ds.launcher --launcher torchrun --nproc 2 -- train --model ...`` prints
``VAR=value ... argv``, shell-quoted. Standard library only: launch/common.sh runs this file with
``python -I``, so a dry run does not wait for torch to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun", "python")
# mpirun starts remote ranks with its own environment: these go to every rank (-x NAME) when set.
MPI_FORWARD = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
               "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR",
               "FACTORLLM_DS_CACHE", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "PYTHONUNBUFFERED")


def _opt(help: str, default: Any = None) -> Any:
    return field(default_factory=list, metadata={"help": help}) if default == [] else \
        field(default=default, metadata={"help": help})


@dataclass
class Launch:
    """Where and how the ranks start."""

    launcher: str = _opt("torchrun | deepspeed | mpirun | srun (one task per rank) | python (one process)", "torchrun")
    nproc: int | None = _opt("processes per node (default: the first hostfile host's slots, else 1)")
    nnodes: int | None = _opt("nodes (default: the hosts in --hostfile, else 1)")
    node_rank: int = _opt("this node's rank (torchrun, one node)", 0)
    master_addr: str | None = _opt("rendezvous host (default: the first hostfile host, else 127.0.0.1)")
    master_port: int = _opt("rendezvous port", 29500)
    rdzv_id: str = _opt("torchrun's c10d rendezvous id on several nodes", "factorllm")
    hostfile: Path | None = _opt("'hostname slots=N' lines (deepspeed, mpirun); see launch/hostfile.example")
    device: str = _opt("gpu | cpu (adds DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 to the environment)", "gpu")
    ds_launcher: str = _opt("the deepspeed launcher's multi-node backend: pdsh, openmpi, slurm, ...", "pdsh")
    force_multi: bool = _opt("deepspeed: take the multi-node path even for a one-host hostfile", False)
    mpi_args: list[str] = _opt("extra mpirun flags (on the command line: one string, split as a shell would)", [])
    mpi_discovery: bool = _opt("mpirun: MASTER_ADDR from DeepSpeed's mpi4py discovery, not exported", False)
    per_node_srun: bool = _opt("torchrun on every node of a SLURM allocation (srun, one task per node)", False)
    python: str = _opt("the interpreter mpirun, srun and python start", "python")
    bin_dir: Path | None = _opt("the folder of torchrun and deepspeed (default: found on PATH)")

    def hosts(self) -> list[tuple[str, int]]:
        """(host, slots) for each line of the hostfile."""
        if not Path(self.hostfile).is_file():
            raise ValueError(f"--hostfile {self.hostfile}: no such file. Write one 'hostname slots=N' line per node "
                             "(see launch/hostfile.example), or leave it out for a single node")
        lines = [line.split() for line in Path(self.hostfile).read_text().splitlines()]
        hosts = [(w[0], next((int(x[6:]) for x in w[1:] if x.startswith("slots=")), 1))
                 for w in lines if w and not w[0].startswith("#")]
        if not hosts:
            raise ValueError(f"--hostfile {self.hostfile} lists no hosts ('hostname slots=N' lines)")
        return hosts

    def resolved(self) -> Launch:
        """A copy with nproc, nnodes and master_addr filled in; ValueError naming every bad setting."""
        hosts = self.hosts() if self.hostfile else [("127.0.0.1", 1)]
        out = dataclasses.replace(self, nproc=hosts[0][1] if self.nproc is None else self.nproc,
                                  nnodes=len(hosts) if self.nnodes is None else self.nnodes,
                                  master_addr=self.master_addr or hosts[0][0])
        problems = [f"--{name} {getattr(out, name)}: expected one of {', '.join(allowed)}"
                    for name, allowed in (("launcher", LAUNCHERS), ("device", ("gpu", "cpu")))
                    if getattr(out, name) not in allowed]
        problems += [f"--{name} {getattr(out, name)}: expected a positive number of {what}"
                     for name, what in (("nproc", "processes per node"), ("nnodes", "nodes")) if getattr(out, name) < 1]
        if out.launcher == "python" and out.nproc * out.nnodes != 1:
            problems.append(f"--launcher python starts one process, not {out.nproc * out.nnodes}")
        if out.launcher == "deepspeed" and out.nnodes > 1 and not self.hostfile:
            problems.append("--launcher deepspeed on several nodes needs --hostfile (it would start every rank here)")
        if out.per_node_srun and out.launcher != "torchrun":
            problems.append("--per-node-srun starts torchrun on each node; --launcher srun starts one task per rank")
        if problems:
            raise ValueError("; ".join(problems))
        return out


def launcher_argv(spec: Launch, environ: Mapping[str, str]) -> list[str]:
    """The command up to ``-m factorllm_ds`` (``spec`` resolved; ``environ``: what mpirun may forward)."""
    program = (lambda name: str(Path(spec.bin_dir) / name)) if spec.bin_dir else (lambda name: name)
    module = ["-m", "factorllm_ds"]
    if spec.launcher == "torchrun":
        cmd = [program("torchrun"), "--nnodes", str(spec.nnodes), "--nproc_per_node", str(spec.nproc)]
        if spec.nnodes > 1:  # c10d rendezvous on the first node: every node runs the same command
            cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{spec.master_addr}:{spec.master_port}",
                    "--rdzv_id", spec.rdzv_id]
        else:
            cmd += ["--node_rank", str(spec.node_rank), "--master_addr", spec.master_addr,
                    "--master_port", str(spec.master_port)]
        srun = ["srun", "--nodes", str(spec.nnodes), "--ntasks", str(spec.nnodes), "--ntasks-per-node", "1",
                "--kill-on-bad-exit=1"]
        return (srun if spec.per_node_srun else []) + cmd + module
    if spec.launcher == "deepspeed":
        # --no_local_rank: the launcher would otherwise put --local_rank=N before the subcommand.
        cmd = [program("deepspeed"), "--no_local_rank", "--master_port", str(spec.master_port)]
        if not spec.hostfile:
            return cmd + ["--num_gpus", str(spec.nproc), "--module", "factorllm_ds"]  # on CPU: not NUMA nodes
        cmd += ["--hostfile", str(spec.hostfile), "--master_addr", spec.master_addr, "--num_nodes", str(spec.nnodes),
                "--num_gpus", str(spec.nproc), "--launcher", spec.ds_launcher]
        # It checks passwordless ssh to the first host even when that is this machine alone.
        here = ("localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0])
        if spec.nnodes == 1 and spec.hosts()[0][0] in here:
            cmd.append("--no_ssh_check")
        return cmd + (["--force_multi"] if spec.force_multi else []) + ["--module", "factorllm_ds"]
    if spec.launcher == "mpirun":
        cmd = ["mpirun", "-np", str(spec.nnodes * spec.nproc), "--bind-to", "none"]
        if spec.hostfile:
            cmd += ["--hostfile", str(spec.hostfile), "--npernode", str(spec.nproc)]
        if os.getuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [x for name in MPI_FORWARD if environ.get(name) for x in ("-x", name)]
        return cmd + list(spec.mpi_args) + [spec.python, *module]
    if spec.launcher == "srun":
        # --mpi=none: with a PMI plugin the tasks would carry PMI_RANK and look like an mpirun job.
        return ["srun", "--ntasks", str(spec.nnodes * spec.nproc), "--mpi=none", "--kill-on-bad-exit=1", spec.python,
                *module]
    return [spec.python, *module]


def launch_env(spec: Launch, environ: Mapping[str, str]) -> dict[str, str]:
    """What the ranks need in their environment; a value already in ``environ`` wins (not MASTER_*)."""
    # On CPU, several ranks each using every core run several times slower than one thread each.
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if spec.device == "cpu" else {}
    env["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's threads would warn after each fork
    env = {k: environ.get(k, v) for k, v in env.items()}
    if spec.launcher in ("mpirun", "srun"):  # their ranks read the rendezvous from the environment
        env["MASTER_PORT"] = str(spec.master_port)
        if not spec.mpi_discovery:
            env["MASTER_ADDR"] = spec.master_addr
    return env


def command(spec: Launch, args: Sequence[str] | Mapping[str, Any] | Any,
            environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) that start ``python -m factorllm_ds ARGS`` as ``spec`` says.

    ``args``: a list (the factorllm_ds argv), or a TrainConfig / dict (see :func:`train_argv`).
    ``environ``: the environment the command will run in (default ``os.environ``).
    """
    spec, environ = spec.resolved(), os.environ if environ is None else environ
    env = launch_env(spec, environ)
    argv = list(args) if isinstance(args, (list, tuple)) else train_argv(args)
    return launcher_argv(spec, {**environ, **env}) + [str(a) for a in argv], env


def train_argv(settings: Mapping[str, Any] | Any) -> list[str]:
    """``["train", flags...]`` from a TrainConfig (the fields that differ from their defaults) or a dict.

    Flag names from ``config.flag_of`` (or the key: ``eval_every`` -> ``--eval-every``); None is left
    out, a bool is ``--x`` / ``--no-x``, a list ``--x a b``.
    """
    if dataclasses.is_dataclass(settings):
        from factorllm_ds.config import flag_of

        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(settings) if "help" in f.metadata}
        items = [(flag_of(f), getattr(settings, f.name)) for f in dataclasses.fields(settings)
                 if f.name in defaults and getattr(settings, f.name) != defaults[f.name]]
    else:
        items = [("--" + key.replace("_", "-"), value) for key, value in settings.items()]
    argv = ["train"]
    for flag, value in items:
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m factorllm_ds.launcher", usage="%(prog)s [--launcher L] [--nproc N] [...] -- ARGS...",
        description="Print the command (VAR=value ... argv, shell-quoted) that starts `python -m factorllm_ds ARGS`."
                    " An empty value (--nproc '') means the default; a switch takes =0 or =1 too.")
    parser.add_argument("--print", choices=("command", "world"), default="command", dest="what",
                        help="the command, or the number of ranks it starts (default: command)")
    for f in dataclasses.fields(Launch):
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "list[str]": shlex.split}.get(
            f.type, int if f.type.startswith("int") else str)
        opts = dict(nargs="?", const=True) if f.type == "bool" else {}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=f.metadata["help"],
                            type=lambda s, kind=kind: kind(s) if s != "" else None, **opts)
    ns = vars(parser.parse_args(ours))
    what = ns.pop("what")
    try:
        spec = Launch(**{k: v for k, v in ns.items() if v is not None})
        if what == "world":
            spec = spec.resolved()
            print(spec.nnodes * spec.nproc)
            return 0
        if not args:
            raise ValueError("nothing to launch: put the factorllm_ds arguments after --, e.g. -- train --model MOE")
        cmd, env = command(spec, args)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(" ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in cmd]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
