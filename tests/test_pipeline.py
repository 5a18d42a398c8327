"""The demo's resumable work folder: reused only when it was made with the same settings."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

import tiny
from factorllm_ds.checkpoints import write_checksums
from factorllm_ds.errors import UserError
from factorllm_ds.layout import CHECKPOINT_DIR, LATEST_FILE, METRICS_FILE, MODEL_STATES, RUN_MANIFEST
from factorllm_ds.pipeline import SETTINGS_FILE, DemoConfig, _reset_if_settings_changed, demo, train_config, train_stage


def test_same_settings_keep_the_stages(tmp_path):
    work = tmp_path / "demo"
    cfg = DemoConfig(work=work)
    _reset_if_settings_changed(work, cfg)
    (work / "moe").mkdir()
    _reset_if_settings_changed(work, DemoConfig(work=work, fresh=True))  # --fresh/--work are not settings
    assert (work / "moe").is_dir()
    assert json.loads((work / SETTINGS_FILE).read_text())["split"] == cfg.split


def test_changed_settings_start_over(tmp_path, capsys):
    work = tmp_path / "demo"
    _reset_if_settings_changed(work, DemoConfig(work=work))
    (work / "moe").mkdir()
    changed = dataclasses.replace(DemoConfig(work=work), split="kmeans", lr=2e-4)
    _reset_if_settings_changed(work, changed)
    assert not (work / "moe").exists()
    assert "other settings (lr, split)" in capsys.readouterr().err
    assert json.loads((work / SETTINGS_FILE).read_text())["split"] == "kmeans"


def test_calibration_files_are_a_setting(tmp_path, capsys):
    """demo --calib-data (convert's several files) is recorded as text; other files start the demo over."""
    work = tmp_path / "demo"
    first = [tmp_path / "a.txt", tmp_path / "b.txt"]
    _reset_if_settings_changed(work, DemoConfig(work=work, calib_data=first))
    assert json.loads((work / SETTINGS_FILE).read_text())["calib_data"] == [str(p) for p in first]
    (work / "moe").mkdir()
    _reset_if_settings_changed(work, DemoConfig(work=work, calib_data=first[:1]))
    assert not (work / "moe").exists()
    assert "other settings (calib_data)" in capsys.readouterr().err


def test_folder_of_an_older_version_starts_over(tmp_path):
    work = tmp_path / "demo"
    (work / "moe").mkdir(parents=True)
    (work / "summary.json").write_text("{}")
    _reset_if_settings_changed(work, DemoConfig(work=work))
    assert sorted(p.name for p in work.iterdir()) == [SETTINGS_FILE]


def test_foreign_folder_is_refused_and_kept(tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match="--work .*thesis.tex.*empty or new folder"):
        _reset_if_settings_changed(work, DemoConfig(work=work))
    assert (work / "thesis.tex").read_text() == "keep me"


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file below ``folder`` (hidden ones too) with its bytes; folders as None."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def demo_outputs(work: Path, moe: Path) -> Path:
    """``work`` as the demo leaves it, each output with its own proof: convert's and export's manifest (a real
    convert output), train's run.json and checksums, the factorllm_ds mark of the reports and the plot."""
    _reset_if_settings_changed(work, DemoConfig(work=work))
    for name in ("moe", "static", "export", "export-qwen2-moe"):  # each with its command's manifest
        shutil.copytree(moe, work / name)
    run, tag = work / "run", work / "run" / CHECKPOINT_DIR / "step1"
    tag.mkdir(parents=True)
    (run / RUN_MANIFEST).write_text("{}")
    (run / METRICS_FILE).write_text("step\n1\n")
    (tag / MODEL_STATES).write_bytes(b"states")
    write_checksums(tag)
    (run / CHECKPOINT_DIR / LATEST_FILE).write_text("step1")
    (run / CHECKPOINT_DIR / "zero_to_fp32.py").write_text("# DeepSpeed's\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host.7.0").write_bytes(b"")
    (work / "reports").mkdir()
    (work / "reports" / "dense.json").write_text('{"factorllm_ds": "0"}')
    (work / "reports" / "training-domain.txt").write_text("held-out windows of --data, the text eval scores")
    (work / "usage.png").write_bytes(b"\x89PNG factorllm_ds")
    (work / "summary.json").write_text("{}")
    return work


@pytest.mark.parametrize("yours", ["moe/notes.md", "static/notes.md", "export/eval/results.json",
                                   "export-qwen2-moe/notes.md", "run/notes.txt",
                                   "run/checkpoints/step9/mine.pt", "reports/mine.json", "usage.png", ".notes"])
def test_starting_over_deletes_nothing_the_demo_did_not_write(tiny_moe_dir, tmp_path, yours):
    """Changed settings (or --fresh) would start over: a file of yours anywhere in --work, however deep, refuses it,
    named; nothing is deleted."""
    work = demo_outputs(tmp_path / "demo", tiny_moe_dir)
    (work / yours).parent.mkdir(parents=True, exist_ok=True)
    (work / yours).write_text("mine")
    before = tree(work)
    named = "/".join(yours.split("/")[:2])  # a folder of yours is named as a whole: "export/eval/ (1 files)"
    with pytest.raises(UserError, match=rf"other settings \(lr\).*no demo stage wrote: {re.escape(named)}"):
        _reset_if_settings_changed(work, dataclasses.replace(DemoConfig(work=work), lr=2e-4))
    assert tree(work) == before


def test_fresh_deletes_what_the_demo_wrote_once_nothing_else_is_there(tiny_moe_dir, tmp_path):
    work = demo_outputs(tmp_path / "demo", tiny_moe_dir)
    (work / "moe" / "notes.md").write_text("mine")
    before = tree(work)
    missing = tmp_path / "no-model"  # the fetch stage's check stops the demo right after --fresh
    cfg = DemoConfig(work=work, fresh=True, model=missing, data=missing, eval_data=missing)
    with pytest.raises(UserError, match="--fresh was given.*moe/notes.md"):
        demo(cfg)
    assert tree(work) == before
    (work / "moe" / "notes.md").unlink()
    with pytest.raises(UserError, match="--model .*no such file"):
        demo(cfg)
    assert sorted(p.name for p in work.iterdir()) == [SETTINGS_FILE]


def test_the_train_stage_restarts_a_run_that_died_early_and_resumes_one_with_a_checkpoint(tmp_path):
    """Nothing of a run folder is deleted by the demo: train --restart or --resume, whose rules keep what is not
    train's (tests/test_reliability_train.py)."""
    run = tmp_path / "run"
    settings = (DemoConfig(), tmp_path / "moe", tmp_path / "train.txt", run)
    train = train_config(*settings)
    assert not train.resume and not train.restart  # a new run
    run.mkdir()
    (run / RUN_MANIFEST).write_text("{}")
    (run / CHECKPOINT_DIR / "step2").mkdir(parents=True)
    (run / CHECKPOINT_DIR / "step2" / MODEL_STATES).write_bytes(b"states")  # a save cut short: no checksums
    train = train_config(*settings)
    assert train.restart and not train.resume
    write_checksums(run / CHECKPOINT_DIR / "step2")
    train = train_config(*settings)
    assert train.resume and not train.restart


@pytest.mark.slow
@pytest.mark.dist
def test_a_run_that_died_before_its_first_checkpoint_is_restarted_not_deleted(tiny_moe_dir, tmp_path):
    """The train stage starts such a run again with train --restart, which touches only train's own files: a real
    one-process run (10 s to a minute), the end-to-end form of the test above."""
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MANIFEST).write_text("{}")
    (run / "notes.txt").write_text("mine")
    data = tiny.write_calibration_text(tmp_path / "train.txt")
    cfg = DemoConfig(tokens=64, seq_len=32, micro_batch_size=1, global_batch_size=2, nproc=1, ep_size=1,
                     launcher="torchrun", distill_weight=0)
    train_stage(cfg, tiny_moe_dir, data, run)
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / RUN_MANIFEST).read_text())["settings"]["restart"] is True
    assert (run / CHECKPOINT_DIR / LATEST_FILE).read_text() == "step1"


@pytest.mark.parametrize("flags,message", [
    (dict(distill_weight=1.5), "--distill-weight 1.5: must be a number in [0, 1]"),
    (dict(num_experts=24, ep_size=5), "--ep-size 5 must divide --num-experts (24)"),
    (dict(lr=0.0), "--lr 0.0: must be > 0"),
])
def test_bad_demo_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DemoConfig(**flags).validate()
