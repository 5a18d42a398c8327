"""Training-run faults of docs/reliability.md (issue 23): a loss that turns NaN, batch sizes below one, the
checkpoint offered instead of a damaged one, a run that died before its first checkpoint, a damaged run.json or
checkpoints/latest, a full disk during a save, DeepSpeed's pickles on --resume, metrics of an abandoned branch,
the combine scale's bound and plan's exit code.

Validation runs in-process on fake run folders (real torch files, real checksums); the process-group set-up is
replaced by a sentinel (``train_cli``), so a check that stops working fails instead of starting a run. Three real
launches: one 2-rank run whose loss turns NaN (the ranks must agree where they stop), and one 1-rank run that is
restarted, then resumed from an older tag onto a save that hits a full device (``/dev/full``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from test_reliability import ReachedProcessGroup, RunsCode, cli, train_cli  # noqa: F401 (train_cli: a fixture)

import distributed_utils as du
import tiny
from factorllm_ds.checkpoints import CHECKSUM_FILE, verify_checksums, write_checksums
from factorllm_ds.cli import main
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import read_config
from factorllm_ds.layout import (
    CHECKPOINT_DIR,
    EXPERT_FILE,
    EXPERT_LOAD_FILE,
    LATEST_FILE,
    METRICS_FILE,
    MODEL_STATES,
    RUN_MANIFEST,
)
from factorllm_ds.locks import LOCK_FILE
from factorllm_ds.safe_load import safe_torch_load
from factorllm_ds.train import MetricsLog, model_fingerprint

ZERO2 = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
NUM_EXPERTS, NUM_LAYERS = 4, 2


# ============================================================================ fake run folders


def add_checkpoint(run: Path, tag: str, files: dict[str, object] | None = None) -> Path:
    """A finished checkpoint as validation sees it: torch files (weights only) and their checksums."""
    folder = run / CHECKPOINT_DIR / tag
    folder.mkdir(parents=True)
    for name, content in {MODEL_STATES: {"module": {}, "step": int(tag[4:])}, **(files or {})}.items():
        torch.save(content, folder / name)
    write_checksums(folder)
    return folder


def run_folder(root: Path, model: Path, tags=("step1",), latest: str | None = None) -> Path:
    """A run of ``model`` (run.json as train writes it) with the checkpoints ``tags`` and checkpoints/latest."""
    run = root / "run"
    run.mkdir()
    (run / RUN_MANIFEST).write_text(json.dumps({"model": str(model), "ep_size": 1, "world_size": 1,
                                                "model_fingerprint": model_fingerprint(read_config(model))}))
    for tag in tags:
        add_checkpoint(run, tag)
    (run / CHECKPOINT_DIR / LATEST_FILE).write_text(latest or tags[-1])
    return run


def dead_run(out: Path, model: Path) -> Path:
    """What a run that died before its first checkpoint leaves: run.json, metrics rows, a TensorBoard folder, the
    lock file."""
    out.mkdir()
    (out / RUN_MANIFEST).write_text(json.dumps({"model": str(model), "ep_size": 1, "world_size": 1}))
    rows = [",".join(MetricsLog.FIELDS)] + [f"{step},{step * 64},0.01,10.4,10.4,0.2,1.1,0.5,900,,0" for step in (1, 2)]
    (out / METRICS_FILE).write_text("\n".join(rows) + "\n")
    (out / "tensorboard").mkdir()
    (out / LOCK_FILE).write_text("")
    return out


def flip_a_byte(path: Path) -> None:
    """Change the content, not the size: only the digest tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def logged_steps(path: Path) -> list[int]:
    """The step of each row of metrics.csv or expert_load.jsonl."""
    if path.name == METRICS_FILE:
        return [int(row["step"]) for row in du.read_metrics(path.parent)]
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ============================================================================ 8: batch sizes


@pytest.mark.parametrize("flags, message", [
    (dict(global_batch_size=0), "--global-batch-size 0: must be >= 1"),
    (dict(global_batch_size=-2), "--global-batch-size -2: must be >= 1"),
    (dict(micro_batch_size=0), "--micro-batch-size 0: must be >= 1"),
    (dict(micro_batch_size=-1, global_batch_size=4), "--micro-batch-size -1: must be >= 1"),
])
def test_batch_sizes_below_one_are_refused_by_check_and_by_train(train_cli, tmp_path, flags, message):
    for extra in (("--check",), ()):
        code, err = train_cli(*extra, **flags)
        assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_micro_batch_of_zero_in_the_deepspeed_json_is_refused(train_cli, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 0}))
    code, err = train_cli("--check", ds_config=ds)
    assert code == 2 and '"train_micro_batch_size_per_gpu" in --ds-config 0: must be >= 1' in err, err


# ============================================================================ 10: the offered checkpoint is intact


def test_the_checkpoint_offered_instead_of_a_damaged_one_is_verified_byte_by_byte(train_cli, tiny_moe_dir,
                                                                                  tmp_path, capsys):
    run = run_folder(tmp_path, tiny_moe_dir, tags=("step1", "step2", "step3"))
    for tag in ("step2", "step3"):  # same sizes: a size-only check calls them intact
        flip_a_byte(run / CHECKPOINT_DIR / tag / MODEL_STATES)
    code, err = train_cli("--resume", out=run)
    assert code == 2 and "checkpoint step3 is not intact" in err, err
    assert "the newest intact checkpoint is step1: use --resume --resume-tag step1" in err, err
    code, err = train_cli("--resume", "--resume-tag", "step2", out=run)  # the advice never loops back to step3
    assert code == 2 and "checkpoint step2 is not intact" in err and "checkpoint is step1" in err, err
    with pytest.raises(ReachedProcessGroup):
        train_cli("--resume", "--resume-tag", "step1", out=run)
    code, _, err = cli(capsys, "export", "--run", run, "--tag", "step2", "--out", tmp_path / "hf")
    assert code == 2 and "the newest intact checkpoint is step1: use --tag step1" in err, err


# ============================================================================ 11: died before its first checkpoint


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(train_cli, tiny_moe_dir, tmp_path):
    out = dead_run(tmp_path / "out", tiny_moe_dir)
    (out / "notes.txt").write_text("mine")
    code, err = train_cli()
    assert code == 2 and "stopped before its first checkpoint" in err and "Pass --restart" in err, err
    code, err = train_cli("--resume")
    assert code == 2 and "start it again with --restart instead of --resume" in err, err
    code, err = train_cli("--resume", "--restart")
    assert code == 2 and "pass one of them" in err, err
    with pytest.raises(ReachedProcessGroup):
        train_cli("--restart")
    assert (out / "notes.txt").read_text() == "mine"
    (out / CHECKPOINT_DIR).mkdir()
    (out / CHECKPOINT_DIR / LATEST_FILE).write_text("step4")  # a finished save (of a version without checksums)
    code, err = train_cli("--restart")
    assert code == 2 and "--restart refused" in err and "step4" in err and "--resume" in err, err
    (out / CHECKPOINT_DIR / LATEST_FILE).unlink()
    add_checkpoint(out, "step4")  # a finished checkpoint is never discarded
    code, err = train_cli("--restart")
    assert code == 2 and "--restart refused" in err and "step4" in err and "--resume" in err, err


def test_logs_keep_only_the_steps_of_the_branch_the_run_goes_on_from(tmp_path):
    dead_run(tmp_path / "run", Path("model"))
    run = tmp_path / "run"
    (run / EXPERT_LOAD_FILE).write_text("".join(json.dumps({"step": s, "counts": [[1]]}) + "\n" for s in (1, 2)))
    MetricsLog(run, True, 1).close()
    assert logged_steps(run / METRICS_FILE) == [1] and logged_steps(run / EXPERT_LOAD_FILE) == [1]
    MetricsLog(run, True, 0).close()  # --restart: a fresh file with the header
    assert (run / METRICS_FILE).read_text() == ",".join(MetricsLog.FIELDS) + "\n"
    assert (run / EXPERT_LOAD_FILE).read_text() == ""


# ============================================================================ 12: latest names no checkpoint


@pytest.mark.parametrize("latest, says", [("step9", "names 'step9', which is not a checkpoint"),
                                          (b"\xff\xfe\x00", "cannot be read")])
def test_latest_naming_no_checkpoint_is_blamed_on_the_file(train_cli, tiny_moe_dir, tmp_path, capsys, latest,
                                                            says):
    run = run_folder(tmp_path, tiny_moe_dir, tags=("step1", "step2"))
    pointer = run / CHECKPOINT_DIR / LATEST_FILE
    pointer.write_bytes(latest.encode() if isinstance(latest, str) else latest)
    code, err = train_cli("--resume", out=run)
    assert code == 2 and f"{pointer} {says}" in err and "use --resume --resume-tag step2" in err, err
    assert "--resume-tag step9:" not in err and "--tag" not in err, err  # flags the user never gave
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf")
    assert code == 2 and f"{pointer} {says}" in err and "use --tag step2" in err and "--tag step9" not in err, err


# ============================================================================ 16: run.json that is not JSON


@pytest.mark.parametrize("content, says", [(b'{"model": ', "is not readable JSON"),
                                           (b"\xff\xfe", "is not readable JSON"), (b"[1, 2]", "holds a JSON list"),
                                           (b'{"model": 5, "ep_size": 1, "world_size": 1}',
                                            "is damaged: model 5 is not a str")])
def test_a_run_json_that_is_not_json_is_one_message_naming_it(train_cli, tiny_moe_dir, tmp_path, capsys,
                                                               content, says):
    run = run_folder(tmp_path, tiny_moe_dir)
    (run / RUN_MANIFEST).write_bytes(content)
    code, err = train_cli("--resume", out=run)
    assert code == 2 and f"{run / RUN_MANIFEST} {says}" in err and "Traceback" not in err, err
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf")
    assert code == 2 and f"{run / RUN_MANIFEST} {says}" in err, err


# ============================================================================ 21: no code runs on --resume


def test_resume_refuses_a_checkpoint_that_would_run_code_before_deepspeed_reads_it(train_cli, tiny_moe_dir, tmp_path):
    run = run_folder(tmp_path, tiny_moe_dir)
    ran = tmp_path / "code_ran"
    optim = run / CHECKPOINT_DIR / "step1" / OPTIM_STATES
    torch.save({"optimizer_state_dict": {"state": {}, "payload": RunsCode(ran)}}, optim)
    write_checksums(optim.parent)  # intact as saved: checksums do not make a file trusted
    code, err = train_cli("--resume", out=run)
    assert code == 2 and str(optim) in err and "will not be unpickled" in err, err
    assert not ran.exists(), "the checkpoint's code ran"


def test_deepspeed_reads_checkpoint_files_weights_only_while_resuming(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from factorllm_ds.train import weights_only_loads

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())  # the object DeepSpeed's loads go through
    ran, evil, good = tmp_path / "code_ran", tmp_path / "evil.pt", tmp_path / "good.pt"
    torch.save({"payload": RunsCode(ran)}, evil)
    torch.save({"zero_stage": ZeroStageEnum.gradients, "t": torch.ones(2)}, good)  # an allow-listed DeepSpeed type
    with weights_only_loads(engine, "--resume: checkpoint"):
        with pytest.raises(UserError, match="will not be unpickled"):
            engine.checkpoint_engine.load(str(evil), map_location=torch.device("cpu"))
        assert engine.checkpoint_engine.load(str(good))["zero_stage"] == ZeroStageEnum.gradients
    assert not ran.exists(), "the checkpoint's code ran"
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own load is back after the block


# ============================================================================ 18: a full disk during a save


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_failed_save_says_disk_space_and_removes_only_the_folder_it_made(tiny_moe_dir, tmp_path):
    from factorllm_ds.train import Run, TrainConfig, on_every_rank

    out = run_folder(tmp_path, tiny_moe_dir)
    run = Run(TrainConfig(model=tiny_moe_dir, data=["text"], out=out), None, None, None, 0, 1, 1, 2, step=2)
    folder = out / CHECKPOINT_DIR / "step2"

    def write_to_a_full_device():  # the kernel's own ENOSPC
        folder.mkdir()
        (folder / MODEL_STATES).symlink_to("/dev/full")
        with open(folder / MODEL_STATES, "wb") as fh:
            fh.write(b"\0" * 4096)

    with pytest.raises(UserError) as err:
        on_every_rank(run, write_to_a_full_device, folder, fresh=True)
    message = str(err.value)
    assert f"--out {out}: could not save checkpoint step2: the disk is full" in message, message
    assert "GiB free" in message and "The previous checkpoint step1 and checkpoints/latest are unchanged" in message
    assert not folder.exists() and (out / CHECKPOINT_DIR / "step1").is_dir()


# ============================================================================ also: combine scale, plan's exit code


@pytest.mark.parametrize("scale", ["1e38", "5"])
def test_a_combine_scale_above_the_number_of_experts_is_refused(llama_dir, tmp_path, capsys, scale):
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", tmp_path / "moe", "--num-experts", "4",
                       "--top-k", "2", "--combine-scale", scale)
    assert code == 2 and f"--combine-scale {float(scale):g}: must be at most --num-experts (4)" in err, err
    assert not (tmp_path / "moe").exists()


def test_plan_nothing_fits_is_bad_input_not_a_crash(capsys):
    assert main(["plan", "--model", "llama3-70b", "--gpus", "8", "--gpu-memory", "80GB"]) == 2
    assert "nothing fits" in capsys.readouterr().err


# ============================================================================ real runs


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return tiny.write_calibration_text(tmp_path_factory.mktemp("text") / "botchan.txt")


@pytest.mark.dist
def test_a_loss_that_turns_nan_stops_every_rank_and_keeps_the_last_finite_checkpoint(tiny_moe_dir, text, tmp_path):
    out = tmp_path / "run"
    # lr 1e30: step 1's loss is finite and its update leaves huge (finite) weights, whose loss is NaN from step 2.
    args = du.train_args(tiny_moe_dir, text, out, steps=8, ep_size=2, lr=1e30, ds_config=ZERO2,
                         extra=("--eval-fraction", "0", "--save-every", "1"))
    result = du.run("torchrun", 2, args)
    assert result.returncode != 0 and "exitcode  : 2" in result.output, result.tail()
    stopped = ("is nan at step 2, and at every step since: training stopped at step 4 without saving; the last "
               "checkpoint, step1, is kept")
    assert result.output.count(stopped) == 2, result.tail()  # both ranks, at the same step
    tags = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir() if p.is_dir())
    assert tags == ["step1"] and (out / CHECKPOINT_DIR / LATEST_FILE).read_text() == "step1", tags
    assert verify_checksums(out / CHECKPOINT_DIR / "step1") == []
    states = [safe_torch_load(out / CHECKPOINT_DIR / "step1" / name, "test")
              for name in [MODEL_STATES] + [EXPERT_FILE.format(layer=L, expert=e) for L in range(NUM_LAYERS)
                                            for e in range(NUM_EXPERTS)]]
    for state in states:
        for name, tensor in state.get("module", state).items():
            assert bool(torch.isfinite(tensor).all()), name
    losses = [row["loss"] for row in du.read_metrics(out)]
    assert len(losses) == 4 and math.isfinite(losses[0]) and all(math.isnan(x) for x in losses[1:]), losses


@pytest.fixture(scope="module")
def restarted_then_resumed(tmp_path_factory, tiny_moe_dir, text):
    """A dead run started again with --restart (3 steps, a checkpoint each), then resumed from step1 onto a save
    of step3 whose model-states file leads to /dev/full."""
    out = dead_run(tmp_path_factory.mktemp("restart") / "run", tiny_moe_dir)
    (out / "notes.txt").write_text("mine")

    def args(*extra: str) -> list[str]:
        return du.train_args(tiny_moe_dir, text, out, steps=3, ep_size=1, extra=("--eval-fraction", "0",
                                                                                 "--save-every", "1", *extra))

    restarted = du.run("python", 1, args("--restart"))
    after_restart = logged_steps(out / METRICS_FILE) if restarted.returncode == 0 else None
    states = out / CHECKPOINT_DIR / "step3" / MODEL_STATES
    if states.is_file():
        states.unlink()
        states.symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
    resumed = du.run("python", 1, args("--resume", "--resume-tag", "step1"))
    return {"out": out, "restarted": restarted, "after_restart": after_restart, "resumed": resumed}


@pytest.mark.dist
def test_restart_runs_again_in_the_folder_of_a_run_that_died_early(restarted_then_resumed):
    out = restarted_then_resumed["out"]
    restarted_then_resumed["restarted"].check()
    assert restarted_then_resumed["after_restart"] == [1, 2, 3]  # the dead run's rows are gone
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / RUN_MANIFEST).read_text())["settings"]["restart"] is True


@pytest.mark.dist
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_during_a_save_names_disk_space_and_keeps_latest_valid(restarted_then_resumed):
    out, resumed = restarted_then_resumed["out"], restarted_then_resumed["resumed"]
    assert resumed.returncode == 2, resumed.tail()
    assert f"--out {out}: could not save checkpoint step3" in resumed.output, resumed.tail()
    assert "what a full disk looks like. Disk space on --out's file system:" in resumed.output, resumed.tail()
    assert "The previous checkpoint step2 and checkpoints/latest are unchanged" in resumed.output, resumed.tail()
    assert (out / CHECKPOINT_DIR / LATEST_FILE).read_text() == "step2"
    assert verify_checksums(out / CHECKPOINT_DIR / "step2") == []
    assert not (out / CHECKPOINT_DIR / "step3" / CHECKSUM_FILE).exists()  # never offered as intact


@pytest.mark.dist
def test_resume_tag_drops_the_abandoned_branch_and_loads_deepspeed_files_weights_only(restarted_then_resumed):
    out, resumed = restarted_then_resumed["out"], restarted_then_resumed["resumed"]
    # The optimizer state of a real ZeRO-2 checkpoint loaded through safe_torch_load's allow-list: the run went on.
    assert "resumed from" in resumed.output and "at step 1" in resumed.output, resumed.tail()
    assert verify_checksums(out / CHECKPOINT_DIR / "step2") == []
    assert logged_steps(out / METRICS_FILE) == [1, 2, 3]  # not 1, 2, 3, 2, 3
    # ... and checkpoints/latest names the branch the run is on (a requeued --resume does not jump back to step3)
    assert "checkpoints/latest now names step1, where this run goes on from (was step3)" in resumed.output
    assert logged_steps(out / EXPERT_LOAD_FILE) == [1, 2, 3]
