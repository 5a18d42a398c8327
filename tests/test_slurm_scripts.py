"""launch/*.sh and slurm/*: the exact commands their DRY_RUN prints, their refusals, one real launch.

The DRY_RUN tests run the scripts as users do (bash, environment variables, the venv's bin on
PATH) and compare the printed command word for word; CHECK=0 leaves out the pre-flight
``train --check`` where a test is about the command alone, and the tests of the check run it on
the tiny converted model. ``test_train_sh_deepspeed_hostfile_real_run`` starts a real 2-rank
expert-parallel job through launch/train.sh with the deepspeed launcher and a localhost
hostfile. ``test_local_slurm`` runs tests/scripts/local_slurm.sh (installs slurm-wlm, starts
slurmctld/slurmd, submits the sbatch scripts) where that is safe: root, apt-get, and no
slurm.conf of someone else's; FACTORLLM_DS_SLURM_TEST=0 turns it off.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distributed_utils as du
import tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/train.sh", "launch/torchrun.sh", "launch/mpirun.sh", "launch/deepspeed_multinode.sh",
           "slurm/launch.sh", "slurm/train_1node.sbatch", "slurm/train_multinode.sbatch", "slurm/train_tasks.sbatch",
           "tests/scripts/local_slurm.sh"]
TRAIN = ["--model", "m o e", "--data", "train.txt", "--ep-size", "2"]
ON_CPU = ["DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", "TOKENIZERS_PARALLELISM=false"]
SCRIPT_VARS = ("NPROC", "NNODES", "NODE_RANK", "HOSTFILE", "LAUNCHER", "DEVICE", "DS_ACCELERATOR", "OMP_NUM_THREADS",
               "TOKENIZERS_PARALLELISM", "EP_SIZE", "MODEL", "DATA", "OUT", "DS_CONFIG", "DRY_RUN", "CHECK", "NTASKS",
               "HEAD_NODE", "MODE", "REPO", "VENV", "PYTHON", "RDZV_ID", "DS_LAUNCHER", "DS_FORCE_MULTI", "MPI_ARGS")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without launcher/SLURM/script variables, the venv first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *SCRIPT_VARS)}
    env["PATH"] = os.pathsep.join([str(du.BIN), env.get("PATH", "")])
    env.update(extra)
    return env


def run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], env=clean_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def dry(script: str, *args: str, **env: str) -> list[str]:
    """The command ``script`` would run, as a word list (without the pre-flight check unless CHECK=1)."""
    res = run_script(script, *args, **{"DRY_RUN": "1", "CHECK": "0", **env})
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout.strip())


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_bash(script):
    text = (REPO / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
    assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


def test_common_sh_is_sourced_not_run():
    assert subprocess.run(["bash", "-n", str(REPO / "launch/common.sh")]).returncode == 0
    assert not os.access(REPO / "launch/common.sh", os.X_OK)
    for script in ("launch/train.sh", "slurm/launch.sh"):
        assert "common.sh\"" in (REPO / script).read_text(), script


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return tiny.write_calibration_text(tmp_path_factory.mktemp("text") / "train.txt")


# ----------------------------------------------------------------------------- launch/train.sh


def test_train_sh_torchrun_cpu():
    assert dry("launch/train.sh", *TRAIN, DEVICE="cpu", NPROC="2") == [
        *ON_CPU, "torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--node_rank", "0", "--master_addr",
        "127.0.0.1", "--master_port", "29500", "-m", "factorllm_ds", "train", *TRAIN]


def test_train_sh_torchrun_multinode_uses_rendezvous():
    assert dry("launch/torchrun.sh", *TRAIN, DEVICE="gpu", NPROC="8", NNODES="4", MASTER_ADDR="node0",
               MASTER_PORT="1234", RDZV_ID="77") == [
        "TOKENIZERS_PARALLELISM=false", "torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node0:1234", "--rdzv_id", "77", "-m", "factorllm_ds", "train", *TRAIN]


def test_train_sh_deepspeed_single_node():
    assert dry("launch/train.sh", *TRAIN, LAUNCHER="deepspeed", DEVICE="gpu", NPROC="4") == [
        "TOKENIZERS_PARALLELISM=false", "deepspeed", "--no_local_rank", "--master_port", "29500", "--num_gpus", "4",
        "--module", "factorllm_ds", "train", *TRAIN]


def test_train_sh_deepspeed_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\nnode-a slots=4\n\nnode-b slots=4\n")
    assert dry("launch/deepspeed_multinode.sh", *TRAIN, HOSTFILE=str(hosts), DEVICE="gpu") == [
        "TOKENIZERS_PARALLELISM=false", "deepspeed", "--no_local_rank", "--master_port", "29500", "--hostfile",
        str(hosts), "--master_addr", "node-a", "--num_nodes", "2", "--num_gpus", "4", "--launcher", "pdsh",
        "--module", "factorllm_ds", "train", *TRAIN]
    local = tmp_path / "local"
    local.write_text("localhost slots=2\n")
    words = dry("launch/train.sh", *TRAIN, LAUNCHER="deepspeed", HOSTFILE=str(local), DEVICE="cpu",
                DS_LAUNCHER="openmpi", DS_FORCE_MULTI="1")
    assert words[:3] == ON_CPU
    assert words[words.index("--num_gpus") + 1] == "2" and words[words.index("--launcher") + 1] == "openmpi"
    assert "--no_ssh_check" in words and "--force_multi" in words  # one local host: nothing to ssh to


def test_train_sh_mpirun(tmp_path):
    words = dry("launch/mpirun.sh", *TRAIN, DEVICE="cpu", NPROC="2", MASTER_PORT="29611",
                MPI_ARGS="--mca btl_tcp_if_include eth0")
    assert words[:5] == [*ON_CPU, "MASTER_PORT=29611", "MASTER_ADDR=127.0.0.1"]
    assert words[5:10] == ["mpirun", "-np", "2", "--bind-to", "none"]
    for var in ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS", "PATH"):
        assert words[words.index(var) - 1] == "-x", var  # forwarded to every rank
    assert ("--allow-run-as-root" in words) == (os.getuid() == 0)
    assert words[-len(TRAIN) - 7:] == ["--mca", "btl_tcp_if_include", "eth0", "python", "-m", "factorllm_ds", "train",
                                       *TRAIN]
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    words = dry("launch/mpirun.sh", *TRAIN, DEVICE="gpu", HOSTFILE=str(hosts))
    assert words[3:6] == ["mpirun", "-np", "16"] and "MASTER_ADDR=a" in words
    assert words[words.index("--hostfile") + 1] == str(hosts) and words[words.index("--npernode") + 1] == "8"


@pytest.mark.parametrize("env, message", [
    ({"HOSTFILE": "/no/such/hostfile"}, "--hostfile /no/such/hostfile: no such file"),
    ({"LAUNCHER": "slurm"}, "--launcher slurm: expected one of torchrun, deepspeed, mpirun, srun, python"),
    ({"NPROC": "0"}, "--nproc 0: expected a positive number"),
    ({"DEVICE": "tpu"}, "launch/train.sh: error: DEVICE=tpu: expected auto, gpu or cpu"),
    ({"PYTHON": "/no/python"}, "launch/train.sh: error: PYTHON=/no/python: not found"),
])
def test_train_sh_refuses(env, message):
    res = run_script("launch/train.sh", *TRAIN, **{"CHECK": "0", **env})
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stdout == ""


def test_deepspeed_multinode_needs_a_hostfile():
    res = run_script("launch/deepspeed_multinode.sh", *TRAIN)
    assert res.returncode == 2 and "set HOSTFILE" in res.stderr


def test_hostfile_example_parses():
    words = dry("launch/train.sh", LAUNCHER="mpirun", DEVICE="gpu", HOSTFILE="launch/hostfile.example")
    assert words[3:6] == ["mpirun", "-np", "16"]


def test_train_sh_checks_the_flags_for_its_world_first(tiny_moe_dir, text, tmp_path):
    """train --check runs for NNODES x NPROC ranks before anything starts; DRY_RUN shows its verdict too."""
    flags = ["--model", str(tiny_moe_dir), "--data", str(text), "--out", str(tmp_path / "run"), "--ep-size", "2",
             "--seq-len", "64"]
    res = run_script("launch/train.sh", *flags, "--global-batch-size", "3", DRY_RUN="1", DEVICE="cpu", NPROC="2")
    assert res.returncode == 2 and res.stdout == ""
    assert "--global-batch-size 3 is not a multiple of --micro-batch-size 1 x world size 2" in res.stderr, res.stderr
    res = run_script("launch/train.sh", *flags, DRY_RUN="1", DEVICE="cpu", NPROC="2")
    assert res.returncode == 0 and "train --check: OK (2 process(es)" in res.stderr, res.stderr
    assert shlex.split(res.stdout)[3] == "torchrun"


# ----------------------------------------------------------------------------- slurm/


@pytest.fixture
def slurm_model(tmp_path):
    """A folder that looks like a converted model (config.json with E=4) + data: enough with CHECK=0."""
    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text('{\n  "model_type": "factorllm",\n  "num_experts": 4\n}\n')
    data = tmp_path / "train.txt"
    data.write_text("text")
    return {"MODEL": str(model), "DATA": str(data)}


def in_job(**extra: str) -> dict[str, str]:
    """The variables sbatch gives a batch script (no scontrol on this machine: HEAD_NODE stands in)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "HEAD_NODE": "node0", **extra}


def test_sbatch_one_node_torchrun(slurm_model):
    words = dry("slurm/train_1node.sbatch", "--steps", "5", **in_job(SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="8"),
                EP_SIZE="4", DS_CONFIG="ds_configs/zero2.json", **slurm_model)
    assert words[words.index("srun"):] == [
        "srun", "--nodes", "1", "--ntasks", "1", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
        "torchrun", "--nnodes", "1", "--nproc_per_node", "8", "--node_rank", "0", "--master_addr", "node0",
        "--master_port", "24242", "-m", "factorllm_ds", "train",
        "--model", slurm_model["MODEL"], "--data", slurm_model["DATA"], "--out", "runs/slurm-4242",
        "--ds-config", "ds_configs/zero2.json", "--ep-size", "4", "--no-progress", "--steps", "5"]


def test_sbatch_multinode_torchrun(slurm_model):
    words = dry("slurm/train_multinode.sbatch", **in_job(SLURM_JOB_NUM_NODES="4"), NPROC="8", EP_SIZE="4",
                DS_CONFIG="ds_configs/zero2_bf16.json", OUT="runs/x", **slurm_model)
    srun = words[words.index("srun"):]
    assert srun[:16] == ["srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                         "torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                         "--rdzv_endpoint"]
    assert srun[16:19] == ["node0:24242", "--rdzv_id", "4242"] and "ds_configs/zero2_bf16.json" in srun


def test_sbatch_one_task_per_rank(slurm_model):
    words = dry("slurm/train_tasks.sbatch", **in_job(SLURM_NTASKS="16"), EP_SIZE="4", **slurm_model)
    at = words.index("srun")
    assert "MASTER_ADDR=node0" in words[:at] and "MASTER_PORT=24242" in words[:at]
    assert words[at:at + 9] == ["srun", "--ntasks", "16", "--mpi=none", "--kill-on-bad-exit=1", "python", "-m",
                                "factorllm_ds", "train"]


def test_sbatch_dry_run_outside_an_allocation(slurm_model):
    words = dry("slurm/train_tasks.sbatch", NTASKS="2", EP_SIZE="2", **slurm_model)
    assert words[words.index("srun") + 2] == "2"


@pytest.mark.parametrize("env, message", [
    ({"SLURM_NTASKS": "3", "EP_SIZE": "2"},
     "slurm/launch.sh: error: EP_SIZE=2 does not divide the job's 3 ranks (SLURM_NTASKS=3 task(s)): request a "
     "multiple of 2 ranks (e.g. sbatch --ntasks=4)"),
    ({"SLURM_NTASKS": "2", "EP_SIZE": "two"}, "EP_SIZE=two: expected a positive integer"),
    ({"SLURM_NTASKS": "2", "MODEL": ""}, "MODEL is not set"),
    ({"SLURM_NTASKS": "2", "MODE": "mpi"}, "MODE=mpi: expected torchrun or tasks"),
])
def test_sbatch_refuses_a_bad_allocation(slurm_model, env, message):
    script = "slurm/launch.sh" if "MODE" in env else "slurm/train_tasks.sbatch"  # the sbatch scripts set MODE
    res = run_script(script, **in_job(), **{**slurm_model, **env})
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "srun" not in res.stdout


@pytest.mark.parametrize("env, message", [
    ({"EP_SIZE": "4", "SLURM_NTASKS": "4", "DS_CONFIG": "nope.json"}, "--ds-config nope.json: no such file"),
    ({"EP_SIZE": "3", "SLURM_NTASKS": "6"}, "--ep-size 3 must divide the number of experts (4)"),
    ({"EP_SIZE": "2", "SLURM_NTASKS": "2", "DATA": "/no/data.txt"}, "--data /no/data.txt: no such file"),
])
def test_sbatch_refuses_what_train_check_finds(tiny_moe_dir, text, tmp_path, env, message):
    job = {"MODEL": str(tiny_moe_dir), "DATA": str(text), "OUT": str(tmp_path / "run"), **env}
    res = run_script("slurm/train_tasks.sbatch", "--seq-len", "64", **in_job(), **job)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "srun" not in res.stdout


def test_sbatch_dry_run_checks_the_job(tiny_moe_dir, text, tmp_path):
    res = run_script("slurm/train_tasks.sbatch", "--seq-len", "64", DRY_RUN="1", NTASKS="2", EP_SIZE="2",
                     MODEL=str(tiny_moe_dir), DATA=str(text), OUT=str(tmp_path / "run"))
    assert res.returncode == 0 and "train --check: OK (2 process(es), ep_size 2" in res.stderr, res.stderr
    assert "srun" in shlex.split(res.stdout)


def test_sbatch_refuses_to_run_outside_slurm(slurm_model):
    res = run_script("slurm/train_1node.sbatch", **slurm_model)
    assert res.returncode == 2 and "not inside a SLURM allocation" in res.stderr


# ----------------------------------------------------------------------------- distributed.detect under SLURM


def test_detect_slurm_step_vs_batch_script(monkeypatch):
    from factorllm_ds import distributed

    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "PMI_")) or var in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(var)
    # The batch script of a 2-task job: not a rank of it (it would wait forever for the others).
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect().launcher == "single"
    # A task srun started: rank 1 of 2, local world from the step's tasks per node.
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x3)")
    assert distributed.detect() == distributed.DistInfo(1, 2, 1, 2, "slurm")


# ----------------------------------------------------------------------------- real launches


@pytest.mark.dist
def test_train_sh_deepspeed_hostfile_real_run(tmp_path, tiny_moe_dir):
    """launch/train.sh, deepspeed launcher, localhost hostfile: checked, then a 2-rank ep_size-2 job that
    checkpoints."""
    data = tiny.write_calibration_text(tmp_path / "train.txt")
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    env = du.worker_env({"LAUNCHER": "deepspeed", "HOSTFILE": str(hosts), "DEVICE": "cpu",
                         "MASTER_PORT": str(du.free_port())})
    args = du.train_args(tiny_moe_dir, data, out, steps=3, ep_size=2, ds_config=REPO / "ds_configs/zero2.json")
    res = subprocess.run(["bash", str(REPO / "launch/train.sh"), *args[1:]], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "'localhost': [0, 1]" in res.stdout + res.stderr  # both ranks came from the hostfile's slots
    assert "train --check: OK (2 process(es)" in res.stderr
    assert not du.checkpoint_problems(out, 3, num_layers=2, num_experts=4, world=2)
    assert len(du.read_metrics(out)) == 3


def _slurm_test_unsafe() -> str | None:
    if os.environ.get("FACTORLLM_DS_SLURM_TEST", "1") == "0":
        return "FACTORLLM_DS_SLURM_TEST=0"
    if os.getuid() != 0 or shutil.which("apt-get") is None:
        return "needs root and apt-get (it installs slurm-wlm and munge)"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "written by factorllm_ds" not in conf.read_text():
        return "this machine has its own /etc/slurm/slurm.conf"
    return None


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(_slurm_test_unsafe() is not None, reason=str(_slurm_test_unsafe()))
def test_local_slurm(tmp_path):
    """tests/scripts/local_slurm.sh: a real slurmctld + slurmd, 2-task and torchrun jobs, a refused 3-task job."""
    env = du.worker_env({"WORK": str(tmp_path / "work"), "PYTHON": sys.executable})
    res = subprocess.run(["bash", str(REPO / "tests/scripts/local_slurm.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    if res.returncode == 3:
        pytest.skip("apt-get could not install slurm-wlm/munge: " + res.stderr[-500:])
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
    assert "all SLURM checks passed" in res.stdout
