"""train: real expert-parallel training on CPU with 2 processes (gloo), as users launch it.

Each training run is launched once (on first use) and shared by the tests that read it.
The tiny model is ``tiny_moe_dir`` (E=4, k=2, hard routing, 2 layers, hidden 64, the real
32k tokenizer). Two texts: a periodic one (8 tokens repeated, so every 64-token window is
the same batch and the loss must fall step after step) and Botchan (varied windows, so a
rank that trained on the wrong samples would show in the cross-topology comparisons).

Bad arguments are checked in-process (fast); the process-group set-up is replaced by a
sentinel there, so a check that stops working fails its test instead of starting a run.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

import distributed_utils as du
import tiny

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
NUM_EXPERTS, NUM_LAYERS, TOP_K = 4, 2, 2
SEQ_LEN, GLOBAL_BATCH = 64, 2
# Same global batch, seeds and data: EP=2 over 2 ranks must match EP=1 on 1 rank (docs/method.md §5
# measured 2e-7 relative; these runs differ by ~2e-6 absolute on a loss of ~10.4).
SGD_TOL = 1e-5
ADAMW_TOL = 1e-4  # Adam divides by sqrt(v): tiny gradient differences can grow a little


# ----------------------------------------------------------------------------- shared runs

# name -> (launcher, processes, train_args keywords)
RUN_SPECS: dict[str, tuple[str, int, dict]] = {
    # Loss goes down: the periodic text, 8 steps, both ZeRO stages.
    "zero1": ("torchrun", 2, dict(text="periodic", steps=8, ep_size=2, lr=1e-3, ds_config="zero1.json")),
    "zero2": ("torchrun", 2, dict(text="periodic", steps=8, ep_size=2, lr=1e-3, ds_config="zero2.json")),
    # EP=2 on 2 ranks vs EP=1 on 1 rank with the same global batch (micro-batch 2).
    "ep2_adamw": ("torchrun", 2, dict(text="varied", steps=6, ep_size=2, lr=1e-2, ds_config="zero2.json")),
    "ep1_adamw": ("python", 1, dict(text="varied", steps=6, ep_size=1, lr=1e-2, ds_config="zero2.json",
                                    micro_batch_size=2)),
    "ep2_sgd": ("torchrun", 2, dict(text="varied", steps=6, ep_size=2, lr=0.5, ds_config="zero2.json",
                                    extra=("--optimizer", "sgd", "--grad-clip", "0"))),
    "ep1_sgd": ("python", 1, dict(text="varied", steps=6, ep_size=1, lr=0.5, ds_config="zero2.json",
                                  micro_batch_size=2, extra=("--optimizer", "sgd", "--grad-clip", "0"))),
    "prior_self": ("torchrun", 2, dict(text="varied", steps=3, ep_size=2, extra=("--prior", "self"))),
    "prior_subset": ("torchrun", 2, dict(text="varied", steps=3, ep_size=2, extra=("--prior-target", "subset"))),
    "bf16": ("torchrun", 2, dict(text="varied", steps=3, ep_size=2, ds_config="zero2_bf16.json")),
}


class Runs:
    """Launches each named run on first use; a failed run fails every test that reads it."""

    def __init__(self, root: Path, model: Path, texts: dict[str, Path]):
        self.root, self.model, self.texts = root, model, texts
        self.results: dict[str, du.Result] = {}

    def args(self, name: str, out: Path, extra: tuple[str, ...] = ()) -> tuple[str, int, list[str]]:
        launcher, nproc, spec = RUN_SPECS[name]
        spec = dict(spec)
        data = self.texts[spec.pop("text")]
        ds_config = spec.pop("ds_config", None)
        spec["extra"] = (*spec.get("extra", ()), *extra)
        args = du.train_args(self.model, data, out, global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN,
                             ds_config=DS_CONFIGS / ds_config if ds_config else None, **spec)
        return launcher, nproc, args

    def __call__(self, name: str) -> Path:
        out = self.root / name
        if name not in self.results:
            launcher, nproc, args = self.args(name, out)
            self.results[name] = du.run(launcher, nproc, args)
        result = self.results[name]
        assert result.returncode == 0, f"run {name!r} failed:\n{result.tail()}"
        return out


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    periodic = root / "periodic.txt"
    periodic.write_text("one two three four five six seven eight " * 400)  # 8 tokens a period
    return {"periodic": periodic, "varied": tiny.write_calibration_text(root / "botchan.txt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_moe_dir, texts) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), tiny_moe_dir, texts)


def losses(out: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in du.read_metrics(out)]


def final_eval(out: Path) -> float:
    return du.read_metrics(out)[-1]["eval_loss"]


# ----------------------------------------------------------------------------- training works


@pytest.mark.dist
@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_ep2_loss_goes_down(runs: Runs, name: str) -> None:
    out = runs(name)
    rows = du.read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 9))
    ce = [row["ce"] for row in rows]
    # Every window is the same batch: with lr 1e-3 the LM loss falls at every step.
    assert all(b < a for a, b in zip(ce, ce[1:])), ce
    assert ce[-1] < ce[0] - 0.3, ce
    assert final_eval(out) < rows[0]["loss"] - 0.3
    assert all(row["pa"] > 0 and 0 <= row["agreement"] <= 1 and row["balance"] > 0 for row in rows)
    assert rows[-1]["tokens"] == 8 * GLOBAL_BATCH * SEQ_LEN


@pytest.mark.dist
@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_ep2_run_writes_checkpoint_and_logs(runs: Runs, name: str) -> None:
    out = runs(name)
    assert du.checkpoint_problems(out, 8, NUM_LAYERS, NUM_EXPERTS, world=2) == []
    manifest = json.loads((out / "run.json").read_text())
    assert (manifest["ep_size"], manifest["world_size"], manifest["total_steps"]) == (2, 2, 8)
    assert manifest["settings"]["prior"] == "frozen"
    loads = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in loads] == list(range(1, 9))
    for entry in loads:
        counts = torch.tensor(entry["counts"])
        assert counts.shape == (NUM_LAYERS, NUM_EXPERTS)
        # Every token of the global batch routed to k experts in every layer: nothing dropped.
        assert counts.sum(dim=1).tolist() == [GLOBAL_BATCH * SEQ_LEN * TOP_K] * NUM_LAYERS
    assert any((out / "tensorboard").iterdir())
    # Each expert file holds that global expert's weights (DeepSpeed's global-id naming).
    state = torch.load(out / "checkpoints" / "step8" / "layer_1_expert_3_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert any(".deepspeed_experts.3." in key for key in state), sorted(state)[:4]


@pytest.mark.dist
def test_zero1_and_zero2_train_identically(runs: Runs) -> None:
    a, b = losses(runs("zero1")), losses(runs("zero2"))
    assert max(abs(x - y) for x, y in zip(a, b)) <= SGD_TOL, (a, b)


# ----------------------------------------------------------------------------- topology invariance


@pytest.mark.dist
@pytest.mark.parametrize("optimizer,tol", [("sgd", SGD_TOL), ("adamw", ADAMW_TOL)])
def test_ep2_two_ranks_matches_ep1_one_rank(runs: Runs, optimizer: str, tol: float) -> None:
    ep2, ep1 = runs(f"ep2_{optimizer}"), runs(f"ep1_{optimizer}")
    for key in ("loss", "ce", "pa", "balance"):
        a, b = losses(ep2, key), losses(ep1, key)
        assert len(a) == len(b) == 6
        assert max(abs(x - y) for x, y in zip(a, b)) <= tol, f"{key}: EP2 {a} vs EP1 {b}"
    assert abs(final_eval(ep2) - final_eval(ep1)) <= tol
    # The comparison has teeth: training moved the loss far more than the tolerance.
    moved = losses(ep1)
    assert max(moved) - min(moved) > 100 * tol, moved


# ----------------------------------------------------------------------------- resume


@pytest.mark.dist
def test_resume_is_bit_exact(runs: Runs) -> None:
    """--stop-after 3, then --resume to step 6 == an uninterrupted 6-step run, bit for bit (CPU fp32)."""
    whole = runs("ep2_adamw")
    out = runs.root / "resumed"
    launcher, nproc, first = runs.args("ep2_adamw", out, ("--stop-after", "3"))
    du.run(launcher, nproc, first).check()
    assert [row["step"] for row in du.read_metrics(out)] == [1, 2, 3]
    assert du.checkpoint_problems(out, 3, NUM_LAYERS, NUM_EXPERTS, world=2) == []
    _, _, second = runs.args("ep2_adamw", out, ("--resume",))
    du.run(launcher, nproc, second).check()
    resumed, uninterrupted = du.read_metrics(out), du.read_metrics(whole)
    assert [row["step"] for row in resumed] == list(range(1, 7))
    for key in ("loss", "ce", "pa", "balance", "agreement", "lr"):
        assert [row[key] for row in resumed] == [row[key] for row in uninterrupted], key
    assert resumed[-1]["eval_loss"] == uninterrupted[-1]["eval_loss"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"
    # And the saved weights: every model-state file of step 6 is equal, tensor for tensor.
    for path in sorted((whole / "checkpoints" / "step6").glob("*model_states.pt")):
        a = torch.load(path, map_location="cpu", weights_only=False)
        b = torch.load(out / "checkpoints" / "step6" / path.name, map_location="cpu", weights_only=False)
        module_a, module_b = a.get("module", a), b.get("module", b)
        for key, tensor in module_a.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, module_b[key]), f"{path.name}: {key}"


# ----------------------------------------------------------------------------- options


@pytest.mark.dist
def test_prior_self_and_frozen_both_train(runs: Runs) -> None:
    out = runs("prior_self")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["prior"] == "self"
    rows = du.read_metrics(out)
    assert len(rows) == 3 and all(row["pa"] > 0 for row in rows)
    assert du.checkpoint_problems(out, 3, NUM_LAYERS, NUM_EXPERTS, world=2) == []
    frozen = json.loads((runs("ep2_adamw") / "run.json").read_text())
    assert frozen["settings"]["prior"] == "frozen"
    # Step 1 sees the same batch and the same (initial) experts: the two teachers agree there.
    assert rows[0]["pa"] == pytest.approx(du.read_metrics(runs("ep2_adamw"))[0]["pa"], rel=1e-4)


@pytest.mark.dist
def test_prior_target_subset_trains_and_reaches_the_export(runs: Runs) -> None:
    from factorllm_ds.sources import DeepSpeedRunSource

    out = runs("prior_subset")
    assert json.loads((out / "run.json").read_text())["settings"]["prior_target"] == "subset"
    rows = du.read_metrics(out)
    assert len(rows) == 3 and all(row["pa"] > 0 for row in rows)
    # The default comes from the converted model's config (share, the paper's).
    share = runs("ep2_adamw")
    assert json.loads((share / "run.json").read_text())["settings"]["prior_target"] == "share"
    # Same batch, same initial experts at step 1: only the prior's choice differs, so the PA term does.
    assert rows[0]["pa"] != pytest.approx(du.read_metrics(share)[0]["pa"], rel=1e-3)
    assert DeepSpeedRunSource(out).config["prior_target"] == "subset"


@pytest.mark.dist
def test_equal_data_mix_trains_on_every_source(tiny_moe_dir, texts, tmp_path) -> None:
    """--data-mix equal under torchrun (2 ranks, EP=2): the run takes both sources, records the mix and evaluates
    on both held-out shares (the sampler's shares: tests/test_data.py)."""
    out = tmp_path / "mix"
    args = du.train_args(tiny_moe_dir, texts["varied"], out, steps=3, ep_size=2, global_batch_size=GLOBAL_BATCH,
                         seq_len=SEQ_LEN, lr=1e-3,
                         extra=("--data", texts["varied"], texts["periodic"], "--data-mix", "equal"))
    result = du.run("torchrun", 2, args)
    assert result.returncode == 0, result.tail()
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["data_mix"] == "equal" and len(settings["data"]) == 2
    rows = du.read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["eval_loss"] is not None
    assert all(math.isfinite(row["loss"]) for row in rows)


@pytest.mark.dist
def test_bf16_runs_on_cpu(runs: Runs) -> None:
    out = runs("bf16")
    rows = du.read_metrics(out)
    assert len(rows) == 3
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    fp32_first = du.read_metrics(runs("ep2_adamw"))[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(fp32_first, abs=0.1)  # bf16 rounding, same model and batch
    assert du.checkpoint_problems(out, 3, NUM_LAYERS, NUM_EXPERTS, world=2, optim_prefix="bf16_") == []
    # bf16 took effect (no silent fp32 fallback): the saved expert weights are bf16.
    state = torch.load(out / "checkpoints" / "step3" / "layer_0_expert_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert {t.dtype for t in state.values() if isinstance(t, torch.Tensor)} == {torch.bfloat16}


# ----------------------------------------------------------------------------- bad arguments


class ReachedProcessGroup(Exception):
    """Raised in place of process-group set-up: validation let the arguments through."""


@pytest.fixture
def train_cli(monkeypatch, capsys, tiny_moe_dir, texts, tmp_path):
    """``train_cli(*extra, world=1, **flags)`` -> (exit code, stderr) of ``factorllm-ds train`` in-process."""
    from factorllm_ds import distributed
    from factorllm_ds.cli import main

    def no_process_group(*args, **kwargs):
        raise ReachedProcessGroup()

    monkeypatch.setattr(distributed, "init", no_process_group)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)

    def call(*extra: str, world: int = 1, **flags) -> tuple[int, str]:
        if world > 1:  # what a launcher sets; validation reads the world size from it
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("WORLD_SIZE", str(world))
        values = {"model": tiny_moe_dir, "data": texts["varied"], "out": tmp_path / "out", "seq_len": SEQ_LEN,
                  "steps": 2, "ep_size": 1, **flags}
        argv = ["train", "--no-progress", *extra]
        for key, value in values.items():  # a list: a flag taking several values
            argv += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
        capsys.readouterr()
        code = main(argv)
        return code, capsys.readouterr().err

    return call


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_good_arguments_reach_process_group_setup(train_cli) -> None:
    with pytest.raises(ReachedProcessGroup):
        train_cli()
    with pytest.raises(ReachedProcessGroup):
        train_cli(world=2, ep_size=2)


BAD_ARGUMENTS = {
    # case: (flags, world size, what the message must say)
    "ep_size_not_dividing_experts": (dict(ep_size=3), 3, "--ep-size 3 must divide the number of experts (4)"),
    "ep_size_not_dividing_world": (dict(ep_size=4), 2, "--ep-size 4 must divide the world size (2 processes)"),
    "seq_len_above_max_positions": (dict(seq_len=1024), 1,
                                    "--seq-len 1024 exceeds the model's max_position_embeddings (512)"),
    "global_batch_not_a_multiple": (dict(global_batch_size=3, ep_size=2), 2,
                                    "--global-batch-size 3 is not a multiple of --micro-batch-size 1 x world size 2"),
    "missing_data_file": (dict(data="no_such_file.txt"), 1, "--data no_such_file.txt: no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_process_group(train_cli, tmp_path, case: str) -> None:
    flags, world, message = BAD_ARGUMENTS[case]
    code, err = train_cli(world=world, **flags)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
    assert not torch.distributed.is_initialized()


def test_zero3_config_is_refused(train_cli, tmp_path) -> None:
    code, err = train_cli(ds_config=write_json(tmp_path / "z3.json", {"zero_optimization": {"stage": 3}}))
    assert code == 2 and "--ds-config" in err and "ZeRO stage 3" in err and "stage 1 or 2" in err, err


@pytest.mark.parametrize("ds,flags,message", [
    ({"train_micro_batch_size_per_gpu": 4}, {"micro_batch_size": 1},
     '--micro-batch-size 1 disagrees with "train_micro_batch_size_per_gpu": 4'),
    ({"gradient_clipping": 0.5}, {"grad_clip": 1.0}, '--grad-clip 1.0 disagrees with "gradient_clipping": 0.5'),
    ({"train_batch_size": 8}, {}, 'sets "train_batch_size"; use --global-batch-size'),
    ({"gradient_accumulation_steps": 2}, {}, 'sets "gradient_accumulation_steps"; use --global-batch-size'),
    ({"optimizer": {"type": "Adam"}}, {}, 'has an "optimizer" section'),
])
def test_ds_config_conflicting_with_flags_is_refused(train_cli, tmp_path, ds, flags, message) -> None:
    code, err = train_cli(ds_config=write_json(tmp_path / "ds.json", ds), **flags)
    assert code == 2 and message in err, err


@pytest.mark.dist
def test_ds_config_value_without_flag_is_taken(tiny_moe_dir, texts, tmp_path) -> None:
    """A --ds-config value that no flag sets is the one the run uses and records in run.json."""
    # Both differ from the flags' defaults (1 and 1.0), so a value left unread would show.
    ds = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2,
                                           "gradient_clipping": 0.5})
    args = du.train_args(tiny_moe_dir, texts["varied"], tmp_path / "out", steps=1, ep_size=1, ds_config=ds)
    at = args.index("--micro-batch-size")
    del args[at:at + 2]  # the micro-batch size must come from the JSON alone
    du.run("python", 1, args).check()
    settings = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert (settings["micro_batch_size"], settings["grad_clip"]) == (2, 0.5), settings


def test_dense_model_is_refused(train_cli, tiny_dense_dir) -> None:
    code, err = train_cli(model=tiny_dense_dir)
    assert code == 2 and f"--model {tiny_dense_dir} is a dense model" in err and "factorllm-ds convert" in err, err


def test_bad_teacher_is_refused(train_cli, tiny_dense_dir, tiny_moe_dir, tmp_path) -> None:
    code, err = train_cli(distill_weight=0.5)
    assert code == 2 and "--distill-weight 0.5 needs --teacher" in err, err
    code, err = train_cli(teacher=tiny_dense_dir, distill_weight=1.5)
    assert code == 2 and "--distill-weight 1.5: must be a number in [0, 1]" in err, err
    code, err = train_cli(teacher=tiny_dense_dir, distill_weight=0)
    assert code == 2 and "--distill-weight 0: the teacher would be loaded and never used" in err, err
    code, err = train_cli(teacher=tiny_moe_dir)
    assert code == 2 and f"--teacher {tiny_moe_dir} is a FactorLLM MoE" in err, err
    other = tmp_path / "other-vocab"
    other.mkdir()
    config = json.loads((tiny_dense_dir / "config.json").read_text())
    write_json(other / "config.json", {**config, "vocab_size": config["vocab_size"] + 64})
    code, err = train_cli(teacher=other)
    assert code == 2 and f"--teacher {other} has vocab_size {config['vocab_size'] + 64}" in err, err
    code, err = train_cli(teacher=tmp_path / "missing")
    assert code == 2 and f"--teacher {tmp_path / 'missing'}: no such folder" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ReachedProcessGroup):
        train_cli(teacher=tiny_dense_dir)


def test_empty_data_file_is_refused(train_cli, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = train_cli(data=empty)
    assert code == 2 and f"--data {empty}: the file is empty" in err, err


def test_data_shorter_than_one_sequence_is_refused(train_cli, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    code, err = train_cli(data=short)
    assert code == 2 and "fewer than one --seq-len 64 window" in err and "--data" in err, err
    assert not torch.distributed.is_initialized()


def test_bad_data_mix_is_refused_before_anything_is_written(train_cli, texts, tmp_path) -> None:
    out = tmp_path / "out"
    code, err = train_cli(data=[texts["varied"], texts["varied"]], data_mix="equal")
    assert code == 2 and "named twice" in err and "--data" in err, err
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    code, err = train_cli(data=[texts["varied"], short], data_mix="equal")
    assert code == 2 and f"--data {short}" in err and "none left to train on" in err, err
    assert not out.exists()


def test_out_holding_another_run_is_refused(train_cli, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("step\n")
    code, err = train_cli()
    assert code == 2 and f"--out {out} already holds files" in err and "--resume" in err, err


def test_resume_without_checkpoint_is_refused(train_cli, tmp_path) -> None:
    code, err = train_cli("--resume")
    assert code == 2 and f"--resume: no checkpoint in --out {tmp_path / 'out'}" in err, err


@pytest.fixture(scope="module")
def other_moe_dir(tmp_path_factory, tiny_dense_dir) -> Path:
    """The same dense model converted with k = 1: a different FactorLLM model."""
    return tiny.build_tiny_moe(tmp_path_factory.mktemp("moe-k1") / "moe", tiny_dense_dir, top_k=1)


@pytest.mark.dist
def test_resume_from_a_different_model_is_refused(train_cli, runs: Runs, tmp_path, other_moe_dir,
                                                  tiny_moe_dir) -> None:
    previous = runs("ep2_adamw")
    out = tmp_path / "out"
    # What validation reads of a run (its manifest, the latest checkpoint and its checksums); the run stays untouched.
    latest = (previous / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(previous / "checkpoints" / latest, out / "checkpoints" / latest)
    shutil.copy(previous / "run.json", out / "run.json")
    shutil.copy(previous / "checkpoints" / "latest", out / "checkpoints" / "latest")
    code, err = train_cli("--resume", model=other_moe_dir, ep_size=2, world=2)
    assert code == 2 and f"--resume: --out {out} was trained from a different model" in err, err
    with pytest.raises(ReachedProcessGroup):  # the model it was trained from passes
        train_cli("--resume", model=tiny_moe_dir, ep_size=2, world=2)


@pytest.mark.dist
def test_bad_arguments_under_torchrun_exit_promptly(tiny_moe_dir, texts, tmp_path) -> None:
    """Every rank rejects the flags before any rendezvous; the job ends with the message, no hang."""
    args = du.train_args(tiny_moe_dir, texts["varied"], tmp_path / "out", steps=2, ep_size=4)
    result = du.run("torchrun", 2, args, timeout=120)
    assert result.returncode != 0, result.tail()
    assert "--ep-size 4 must divide the world size (2 processes)" in result.output, result.tail()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- failures end the job


def start_long_run(tiny_moe_dir: Path, data: Path, out: Path, launcher: str, dist_timeout: int) -> du.Job:
    args = du.train_args(tiny_moe_dir, data, out, steps=100_000, ep_size=2,
                         extra=("--dist-timeout", str(dist_timeout), "--eval-fraction", "0"))
    return du.start(launcher, 2, args)


def wait_for_steps(job: du.Job, out: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.csv"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) > steps:
            return
        if job.popen.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {steps}:\n{job.wait(1).tail()}")


def worker(job: du.Job, rank: int):
    by_rank = {job.rank_of(proc): proc for proc in job.workers()}
    assert sorted(by_rank) == [0, 1], by_rank
    return by_rank[rank]


def wait_gone(job: du.Job, seconds: float) -> float | None:
    """Seconds until the launcher exited, or None if it is still running after ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if job.popen.poll() is not None:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", pytest.param(
    "mpirun", marks=pytest.mark.skipif(du.mpi_missing() is not None, reason=str(du.mpi_missing())))])
def test_killed_rank_ends_the_job(tiny_moe_dir, texts, tmp_path, launcher: str) -> None:
    """SIGKILL one rank mid-training: the launcher must end the other and exit non-zero, promptly."""
    out = tmp_path / "out"
    with start_long_run(tiny_moe_dir, texts["varied"], out, launcher, dist_timeout=20) as job:
        wait_for_steps(job, out, 2)
        survivor = worker(job, 0)
        worker(job, 1).send_signal(signal.SIGKILL)
        took = wait_gone(job, 60)
        result = job.wait(1)
        assert took is not None, f"{launcher} still running 60 s after a rank was killed:\n{result.tail()}"
        assert result.returncode != 0
        assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE


@pytest.mark.dist
def test_hung_rank_fails_the_others_after_dist_timeout(tiny_moe_dir, texts, tmp_path) -> None:
    """SIGSTOP one rank: the other must fail once --dist-timeout has passed, not after torch's 30 min.

    The wait is in DeepSpeed's expert-parallel all-to-all, on a group DeepSpeed created itself.
    (torchrun then SIGKILLs the stopped rank after its 30 s grace; the test does not wait for that.)
    """
    out = tmp_path / "out"
    timeout = 10
    with start_long_run(tiny_moe_dir, texts["varied"], out, "torchrun", dist_timeout=timeout) as job:
        wait_for_steps(job, out, 2)
        survivor, hung = worker(job, 0), worker(job, 1)
        hung.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            survivor.wait(timeout + 50)
        except psutil.TimeoutExpired:
            pass
        waited = time.monotonic() - stopped
        output = job.output()
        assert waited < timeout + 50, f"rank 0 still waiting {waited:.0f} s after its peer hung:\n{output[-4000:]}"
        assert waited >= timeout - 1, "rank 0 failed before --dist-timeout elapsed"
        assert f"Timed out waiting {timeout * 1000}ms" in output, output[-4000:]


def test_routed_lr_sets_only_the_routed_experts_groups() -> None:
    """--routed-lr: DeepSpeed's optimizer split marks the routed experts' parameters (allreduce False) as "moe"
    groups; only those take it, the shared expert keeps --lr and the routers --router-lr."""
    from factorllm_ds.train import TrainConfig, build_optimizer

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(4, 4)
            for p in self.experts.parameters():  # what deepspeed.moe.experts.Experts marks on its weights
                p.allreduce, p.group_name = False, "ep_size_2"
            self.shared = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Module()
            self.gate.router = torch.nn.Linear(4, 2)

    model = torch.nn.Sequential(Layer())
    cfg = TrainConfig(model=Path("."), data=["x"], out=Path("."), lr=1e-3, router_lr=1e-2, routed_lr=3e-3)
    opt, _ = build_optimizer(cfg, model, total_steps=10)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # peak, before the warm-up
    layer = model[0]
    assert {lr_of[id(p)] for p in layer.experts.parameters()} == {3e-3}
    assert {lr_of[id(p)] for p in layer.shared.parameters()} == {1e-3}
    assert {lr_of[id(p)] for p in layer.gate.router.parameters()} == {1e-2}
    default, _ = build_optimizer(TrainConfig(model=Path("."), data=["x"], out=Path("."), lr=1e-3), model, 10)
    assert {g["initial_lr"] for g in default.param_groups} == {1e-3}
