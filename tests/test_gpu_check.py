"""bench/gpu_check.sh --dry-run (issue 26): the one-GPU check's steps at toy size on the CPU, as CI can run them.

The check itself runs on a GPU machine with no network; its dry run keeps the script, the measuring helper
(bench/gpu_check.py) and the commands they call working between the times a GPU is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("env.json", "pytest.log", "convert.json", "memory.json", "speed.json", "summary.md", "gpu_check.log")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "GPU_WHEELS": str(out / "no-wheels")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_writes_every_figure(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False
    # The GPU tests were collected and skipped with their reason, not deselected.
    log = (out / "pytest.log").read_text()
    assert "skipped" in log and "needs a CUDA GPU" in log and "deselected" not in log, log
    speed = json.loads((out / "speed.json").read_text())
    assert speed["device"] == "cpu" and speed["prefill"]["moe_tokens_per_s"] > 0
    convert = json.loads((out / "convert.json").read_text())
    assert convert["cpu"]["convert_seconds"] > 0 and convert["predicted"]["gpu_bytes"] > 0
    assert convert["cuda"].startswith("skipped: CUDA-only")
    memory = json.loads((out / "memory.json").read_text())
    assert memory["predicted_total_bytes"] > 0 and memory["measured"].startswith("skipped: CUDA-only")
    summary = (out / "summary.md").read_text()
    assert "dry run on the CPU" in summary and "pytest -m gpu:" in summary


def test_unknown_flag_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dryrun"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr
    assert not (tmp_path / "out").exists()
