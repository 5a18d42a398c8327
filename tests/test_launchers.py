"""One 2-rank EP=2 training run through each launcher users have: torchrun, deepspeed, mpirun.

Each must train, checkpoint and exit 0, and all of them must compute the same losses
(the launcher decides only where rank numbers and the rendezvous address come from).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import distributed_utils as du
import tiny

pytestmark = pytest.mark.dist

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


@pytest.mark.parametrize("name", ["mpirun", "mpirun-mpi4py"])
def test_mpirun_uses_the_exported_master_port(launched, name: str) -> None:
    """DeepSpeed's MPI discovery would set MASTER_PORT to a fixed 29500; an exported one must win."""
    _, result, ports, port = launched(name)
    assert result.returncode == 0, result.tail()
    assert port in ports, f"no rank listened on MASTER_PORT {port} (saw {sorted(ports)})"
    assert 29500 not in ports


def test_all_launchers_compute_the_same_losses(launched) -> None:
    reference = du.read_metrics(launched("torchrun")[0])
    for name in LAUNCHES:
        if LAUNCHES[name][0] == "mpirun" and du.mpi_missing():
            continue
        out, result, _, _ = launched(name)
        assert result.returncode == 0, result.tail()
        for key in ("loss", "ce", "pa", "eval_loss"):
            assert [row[key] for row in du.read_metrics(out)] == [row[key] for row in reference], (name, key)
