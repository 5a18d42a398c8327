"""factorllm_ds.launcher's commands, and one 2-rank EP=2 training run through each launcher users have.

The builder: the argv of every launcher kind, its environment, its refusals, and ``train`` flags
rendered from a TrainConfig (only what differs from the defaults; they parse back to the same
config). The launches (torchrun, deepspeed, mpirun) must train, checkpoint and exit 0, and all of
them must compute the same losses (the launcher decides only where rank numbers and the
rendezvous address come from).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import distributed_utils as du
import tiny
from factorllm_ds.config import arg, from_namespace
from factorllm_ds.launcher import Launch, command, main, train_argv

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--model", "m o e", "--ep-size", "2"]


def argv(environ: dict[str, str] | None = None, **spec) -> list[str]:
    return command(Launch(**spec), TRAIN, environ={} if environ is None else environ)[0]


# ----------------------------------------------------------------------------- the builder


def test_torchrun_one_node_and_several():
    assert argv(nproc=2) == ["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--node_rank", "0",
                             "--master_addr", "127.0.0.1", "--master_port", "29500", "-m", "factorllm_ds", *TRAIN]
    # Several nodes: a c10d rendezvous, so every node runs the identical command.
    assert argv(nproc=8, nnodes=4, master_addr="node0", master_port=1234, rdzv_id="77", bin_dir=Path("/v/bin")) == [
        "/v/bin/torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
        "node0:1234", "--rdzv_id", "77", "-m", "factorllm_ds", *TRAIN]
    assert argv(nproc=8, nnodes=2, per_node_srun=True)[:10] == [
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "torchrun",
        "--nnodes"]


def test_deepspeed_one_node_and_hostfile(tmp_path):
    assert argv(launcher="deepspeed", nproc=4) == [
        "deepspeed", "--no_local_rank", "--master_port", "29500", "--num_gpus", "4", "--module", "factorllm_ds", *TRAIN]
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\nnode-a slots=4\n\nnode-b slots=4\n")
    assert argv(launcher="deepspeed", hostfile=hosts) == [
        "deepspeed", "--no_local_rank", "--master_port", "29500", "--hostfile", str(hosts), "--master_addr", "node-a",
        "--num_nodes", "2", "--num_gpus", "4", "--launcher", "pdsh", "--module", "factorllm_ds", *TRAIN]
    hosts.write_text("localhost slots=2\n")
    words = argv(launcher="deepspeed", hostfile=hosts, ds_launcher="openmpi", force_multi=True)
    assert words[words.index("--num_gpus") + 1] == "2" and words[words.index("--launcher") + 1] == "openmpi"
    assert "--no_ssh_check" in words and "--force_multi" in words  # one local host: nothing to ssh to


def test_mpirun_forwards_the_environment(tmp_path):
    cmd, env = command(Launch("mpirun", nproc=2, device="cpu", mpi_args=["--mca", "btl", "tcp"], python="py"), TRAIN,
                       environ={"PATH": "/bin", "HF_HOME": "/h", "UNRELATED": "1"})
    assert cmd[:5] == ["mpirun", "-np", "2", "--bind-to", "none"]
    forwarded = {cmd[i + 1] for i, word in enumerate(cmd) if word == "-x"}
    assert forwarded == {"PATH", "HF_HOME", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS",
                         "TOKENIZERS_PARALLELISM"}
    assert ("--allow-run-as-root" in cmd) == (os.getuid() == 0)
    assert cmd[-len(TRAIN) - 6:] == ["--mca", "btl", "tcp", "py", "-m", "factorllm_ds", *TRAIN]
    assert env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "MASTER_PORT": "29500", "MASTER_ADDR": "127.0.0.1"}
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    cmd, env = command(Launch("mpirun", hostfile=hosts, mpi_discovery=True), TRAIN, environ={})
    assert cmd[:3] == ["mpirun", "-np", "16"] and cmd[cmd.index("--npernode") + 1] == "8"
    assert "MASTER_ADDR" not in env  # rank 0's address from DeepSpeed's mpi4py discovery


def test_srun_and_python():
    assert argv(launcher="srun", nproc=16) == ["srun", "--ntasks", "16", "--mpi=none", "--kill-on-bad-exit=1",
                                               "python", "-m", "factorllm_ds", *TRAIN]
    assert argv(launcher="python", python="/v/python") == ["/v/python", "-m", "factorllm_ds", *TRAIN]


def test_environment_additions():
    _, env = command(Launch(device="gpu"), TRAIN, environ={})
    assert env == {"TOKENIZERS_PARALLELISM": "false"}
    _, env = command(Launch(device="cpu"), TRAIN, environ={"OMP_NUM_THREADS": "4"})
    assert env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false"}
    _, env = command(Launch("srun", nproc=4, master_addr="node0", master_port=20001), TRAIN, environ={})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node0", "20001")


@pytest.mark.parametrize("spec, message", [
    (dict(nproc=0), "--nproc 0: expected a positive number of processes per node"),
    (dict(launcher="slurm"), "--launcher slurm: expected one of torchrun, deepspeed, mpirun, srun, python"),
    (dict(device="tpu"), "--device tpu: expected one of gpu, cpu"),
    (dict(launcher="python", nproc=2), "--launcher python starts one process, not 2"),
    (dict(launcher="deepspeed", nnodes=2), "needs --hostfile"),
    (dict(hostfile=Path("/no/such/hostfile")), "--hostfile /no/such/hostfile: no such file"),
    (dict(launcher="srun", per_node_srun=True), "--per-node-srun starts torchrun"),
])
def test_refusals(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        command(Launch(**spec), TRAIN, environ={})


def test_train_config_renders_only_what_differs_from_the_defaults():
    from factorllm_ds.train import TrainConfig

    cfg = TrainConfig(model=Path("moe"), data=["a.txt", "b.txt"], out=Path("run"), ep_size=2, lr=1e-3,
                      resume=True, progress=False, eval_data=["held.txt"])
    rendered = train_argv(cfg)
    assert rendered == ["train", "--model", "moe", "--data", "a.txt", "b.txt", "--out", "run", "--ep-size", "2",
                        "--lr", "0.001", "--eval-data", "held.txt", "--resume", "--no-progress"]
    # What the ranks parse is the config we started from.
    from factorllm_ds.cli import build_parser

    parsed = from_namespace(TrainConfig, build_parser(only="train").parse_args(rendered))
    assert parsed == dataclasses.replace(cfg, model=Path("moe"), out=Path("run"))
    assert train_argv(dataclasses.replace(cfg, resume=False, progress=True, data=["x"])) == [
        "train", "--model", "moe", "--data", "x", "--out", "run", "--ep-size", "2", "--lr", "0.001",
        "--eval-data", "held.txt"]


def test_flag_names_come_from_the_fields():
    @dataclasses.dataclass
    class Settings:
        plain_name: int = arg("an int", default=1)
        renamed: bool | None = arg("a bool with its own flag", flag="--other-name", default=None)
        items: list[str] = arg("a list", default_factory=list)
        internal: int = 5  # not a flag (no help)

    assert train_argv(Settings()) == ["train"]
    assert train_argv(Settings(plain_name=2, renamed=False, items=["a", "b"], internal=6)) == [
        "train", "--plain-name", "2", "--no-other-name", "--items", "a", "b"]
    assert train_argv({"seq_len": 64, "steps": None, "progress": False, "data": ["a", "b"]}) == [
        "train", "--seq-len", "64", "--no-progress", "--data", "a", "b"]


def test_command_line(capsys):
    assert main(["--launcher", "", "--nproc", "2", "--device", "cpu", "--force-multi=0", "--mpi-args=", "--",
                 *TRAIN]) == 0
    assert shlex.split(capsys.readouterr().out) == [
        "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", "TOKENIZERS_PARALLELISM=false", *argv(nproc=2)]
    assert main(["--print", "world", "--nproc", "4", "--nnodes", "2"]) == 0
    assert capsys.readouterr().out == "8\n"
    assert main(["--nproc", "0", "--", *TRAIN]) == 2
    assert "--nproc 0: expected a positive number" in capsys.readouterr().err
    assert main(["--nproc", "2"]) == 2 and "nothing to launch" in capsys.readouterr().err


def test_python_m_launcher():
    res = subprocess.run([sys.executable, "-m", "factorllm_ds.launcher", "--launcher", "torchrun", "--nproc", "2",
                          "--", *TRAIN], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout)[1:] == argv(nproc=2)


# ----------------------------------------------------------------------------- real launches

NUM_EXPERTS, NUM_LAYERS, STEPS = 4, 2, 3
# name -> (launcher, how mpirun finds rank 0: None | "env" (MASTER_ADDR/PORT exported) | "mpi4py")
LAUNCHES = {
    "torchrun": ("torchrun", None),
    "deepspeed": ("deepspeed", None),
    "mpirun": ("mpirun", "env"),
    "mpirun-mpi4py": ("mpirun", "mpi4py"),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return tiny.write_calibration_text(tmp_path_factory.mktemp("text") / "botchan.txt")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_moe_dir, text):
    """``launched(name)`` -> (out dir, Result, ports rank processes listened on), each launched once."""
    root = tmp_path_factory.mktemp("launch")
    done: dict[str, tuple[Path, du.Result, set[int], int]] = {}

    def get(name: str):
        if name not in done:
            launcher, rendezvous = LAUNCHES[name]
            if launcher == "mpirun" and du.mpi_missing():
                pytest.skip(du.mpi_missing())
            out = root / name
            args = du.train_args(tiny_moe_dir, text, out, steps=STEPS, ep_size=2)
            with du.start(launcher, 2, args, mpi_discovery=rendezvous == "mpi4py") as job:
                ports = watch_listening_ports(job)
                result = job.wait(du.DEFAULT_TIMEOUT)
            done[name] = (out, result, ports, job.port)
        return done[name]

    return get


def watch_listening_ports(job: du.Job) -> set[int]:
    """Collect, in the background, the ports the ranks listen on while the job runs."""
    ports: set[int] = set()

    def poll() -> None:
        while job.popen.poll() is None:
            ports.update(job.listening_ports())
            time.sleep(0.1)

    threading.Thread(target=poll, daemon=True).start()
    return ports


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launcher_trains_and_checkpoints(launched, name: str) -> None:
    out, result, _, _ = launched(name)
    assert result.returncode == 0, result.tail()
    rows = du.read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["eval_loss"] is not None
    assert du.checkpoint_problems(out, STEPS, NUM_LAYERS, NUM_EXPERTS, world=2) == []
    manifest = json.loads((out / "run.json").read_text())
    assert (manifest["world_size"], manifest["ep_size"]) == (2, 2)
    # Rank 0 logs; the others stay quiet unless they fail.
    assert "[rank0] done: step 3" in result.output and "[rank1]" not in result.output


@pytest.mark.dist
@pytest.mark.parametrize("name", ["mpirun", "mpirun-mpi4py"])
def test_mpirun_uses_the_exported_master_port(launched, name: str) -> None:
    """DeepSpeed's MPI discovery would set MASTER_PORT to a fixed 29500; an exported one must win."""
    _, result, ports, port = launched(name)
    assert result.returncode == 0, result.tail()
    assert port in ports, f"no rank listened on MASTER_PORT {port} (saw {sorted(ports)})"
    assert 29500 not in ports


@pytest.mark.dist
def test_all_launchers_compute_the_same_losses(launched) -> None:
    reference = du.read_metrics(launched("torchrun")[0])
    for name in LAUNCHES:
        if LAUNCHES[name][0] == "mpirun" and du.mpi_missing():
            continue
        out, result, _, _ = launched(name)
        assert result.returncode == 0, result.tail()
        for key in ("loss", "ce", "pa", "eval_loss"):
            assert [row[key] for row in du.read_metrics(out)] == [row[key] for row in reference], (name, key)
