"""Nothing lost, second catalogue (issue 23, items 1-4, 17, 18): what outputs may delete, replace and leave behind.

1. the temp-folder sweep deletes only what it can prove it wrote (marker, this --out, this host);
2. --overwrite never deletes entries the command did not write (its manifest lists what it wrote);
3. everything export reads counts as an input (the run's recorded base model, --teacher, --tokenizer);
4. the final rename never replaces a folder another process made meanwhile;
17. sizes that overflow are one message naming the flag;
18. a full disk is one message naming the output, its file system and the space needed; reports are written
    whole or not at all.

The disk-full tests write to a real, small tmpfs (mounting one needs root: they skip without it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from factorllm_ds import convert as convert_module, outputs
from factorllm_ds.errors import UserError
from factorllm_ds.layout import MANIFEST_FILE, RUN_MANIFEST
from tiny import cli

HOST = socket.gethostname()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones included) with its bytes; empty folders as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() or not any(p.iterdir())}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def siblings(out: Path) -> list[str]:
    """``out`` and the hidden folders a command makes beside it for ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory) -> Path:
    """A convert output, to copy (a folder the tool wrote, manifest and all)."""
    return tiny.convert_tiny(llama_dir, tmp_path_factory.mktemp("converted") / "moe")


# ============================================================================ 1: the temp-folder sweep


def test_sweep_deletes_only_what_it_proves_it_wrote(llama_dir, tmp_path, capsys, caplog):
    out = tmp_path / "moe"
    dead, moved_pid, copied_pid, killed = (dead_pid() for _ in range(4))
    unproven = {}
    for name in (".results.tmp-4000001",         # the reported case: a user's folder, no host
                 f".moe.tmp-{dead}",              # this --out's name, no host: whose it is cannot be told
                 f".moe.tmp-{dead}@{HOST}",       # this host, dead pid, but no marker
                 f".moe.tmp-{dead}@other-node",   # another node's (its pid says nothing here), marker and all
                 f".moe.old-{dead}@{HOST}"):      # a parked-looking folder without a marker: not put back
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.csv").write_text("step,loss\n1,2.5\n")
        unproven[name] = folder
    marker = {"kind": "tmp", "pid": dead, "host": "other-node", "out": str(out.resolve())}
    (unproven[f".moe.tmp-{dead}@other-node"] / outputs.TEMP_MARKER).write_text(json.dumps(marker))
    # Markers that prove nothing here: one made for another --out (moved here), one naming another pid (copied).
    (tmp_path / "elsewhere").mkdir()
    moved = outputs.make_marked_dir(tmp_path / "elsewhere" / "moe", pid=moved_pid)
    moved.rename(tmp_path / moved.name)
    copied = outputs.temp_dir_for(out, copied_pid)
    copied.mkdir()
    (copied / outputs.TEMP_MARKER).write_text(json.dumps({**marker, "pid": dead, "host": HOST}))
    outputs.make_marked_dir(tmp_path / "results", pid=dead)  # proven, but for another --out
    before = {p.name: tree(p) for p in tmp_path.iterdir()}
    proven = outputs.make_marked_dir(out, pid=killed)  # what a killed convert of this --out leaves
    (proven / "model-00001-of-00002.safetensors").write_bytes(b"half")

    caplog.set_level(logging.WARNING, logger="factorllm_ds")
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out)
    assert code == 0, err
    assert not proven.exists()
    assert {p.name: tree(p) for p in tmp_path.iterdir() if p.name != "moe"} == before, "the sweep took a folder"
    assert f"left {unproven[f'.moe.tmp-{dead}@{HOST}']} alone" in caplog.text  # reported, not deleted
    assert f"left {copied} alone" in caplog.text
    assert not (out / outputs.TEMP_MARKER).exists()  # the marker stays behind, never moves into the output


def test_a_proven_parked_output_is_put_back_an_unproven_one_is_not(converted, tmp_path, capsys):
    out = tmp_path / "moe"
    shutil.copytree(converted, out)
    before = tree(out)
    parked = outputs.make_marked_dir(out, "old", dead_pid())  # a replacement cut between its two renames
    out.rename(parked / out.name)
    assert outputs.recover_replaced(out) == [parked]
    assert tree(out) == before and siblings(out) == ["moe"]

    stranger = tmp_path / f".moe.old-{dead_pid()}@{HOST}"  # named like one, no marker: someone's own folder
    out.rename(stranger)
    assert outputs.recover_replaced(out) == []
    assert not out.exists() and tree(stranger) == before


# ============================================================================ 2: --overwrite and what the user added


def test_overwrite_refuses_and_lists_what_the_command_did_not_write(converted, llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    shutil.copytree(converted, out)
    for step in range(11):  # a training run the user put inside: 44 files
        for name in ("mp_rank_00_model_states.pt", "optim.pt", "checksums.json", "notes.txt"):
            path = out / "run" / "checkpoints" / f"step{step}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{step} {name}")
    (out / "notes.md").write_text("what I tried")
    (out / "plots").mkdir()  # an empty folder is the user's too
    before = tree(out)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out, "--overwrite", "--split", "random")
    assert code == 2 and "--overwrite refused" in err and f"--out {out}" in err, err
    assert "run/ (44 files)" in err and "notes.md" in err and "plots/" in err, err
    assert "Move them out of the folder, or pick another path" in err
    assert tree(out) == before and siblings(out) == ["moe"]

    for name in ("run", "notes.md", "plots"):
        shutil.move(out / name, tmp_path / name)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out, "--overwrite", "--split", "random")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert sorted(manifest[outputs.INVENTORY_KEY]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                                            if p.is_file())


def test_export_overwrite_keeps_what_the_user_added(tiny_moe_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(capsys, "export", "--model", tiny_moe_dir, "--out", out, "--format", "dense")[0] == 0
    (out / "eval.json").write_text("{}")
    before = tree(out)
    code, err = cli(capsys, "export", "--model", tiny_moe_dir, "--out", out, "--format", "dense", "--overwrite")
    assert code == 2 and "eval.json" in err and "did not write" in err, err
    assert tree(out) == before


def test_a_manifest_that_lists_no_files_cannot_vouch_for_the_folder(converted, llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    shutil.copytree(converted, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest[outputs.INVENTORY_KEY]  # as an older version wrote it
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    before = tree(out)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out, "--overwrite")
    assert code == 2 and "does not list the files" in err and "remove the folder yourself" in err, err
    assert tree(out) == before


# ============================================================================ 3: what export reads is an input


def write_run(run: Path, base: Path, **settings: Path) -> Path:
    """A run folder as train leaves it before any checkpoint: its run.json."""
    run.mkdir(parents=True)
    record = {"model": str(base.resolve()), "model_fingerprint": "0", "ep_size": 1, "world_size": 1,
              "total_steps": 1, "settings": {"model": str(base), **{k: str(v) for k, v in settings.items()}}}
    (run / RUN_MANIFEST).write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("which", ["base model", "--teacher", "--tokenizer"])
def test_export_never_writes_over_what_the_run_was_made_from(which, tiny_moe_dir, converted, tmp_path, capsys):
    # Each of them a folder factorllm-ds wrote (a convert, a dense export), so only the input rule protects it.
    base = tmp_path / "base"
    shutil.copytree(converted, base)
    teacher, tokenizer = tmp_path / "teacher", tmp_path / "tokenizer"
    for folder in (teacher, tokenizer):
        assert cli(capsys, "export", "--model", tiny_moe_dir, "--out", folder, "--format", "dense")[0] == 0
    run = write_run(tmp_path / "run", base, teacher=teacher, tokenizer=tokenizer)
    target = {"base model": base, "--teacher": teacher, "--tokenizer": tokenizer}[which]
    before = tree(target)
    code, err = cli(capsys, "export", "--run", run, "--out", target, "--overwrite", "--format", "dense")
    assert code == 2 and f"it is the input --run's {which} ({RUN_MANIFEST})" in err, err
    assert tree(target) == before
    code, err = cli(capsys, "export", "--run", run, "--out", tmp_path, "--overwrite")  # holds them all
    assert code == 2 and f"holds the input --run's {which}" in err, err


def test_a_run_records_its_inputs_as_absolute_paths(tiny_moe_dir, converted, tmp_path, capsys, monkeypatch):
    """train gets --teacher and --tokenizer relative to where it ran; run.json names them absolute, so export's
    input check holds from any other folder."""
    from factorllm_ds.train import Run, TrainConfig, write_manifest

    shutil.copytree(converted, tmp_path / "base")
    for name in ("teacher", "tokenizer"):
        assert cli(capsys, "export", "--model", tiny_moe_dir, "--out", tmp_path / name, "--format", "dense")[0] == 0
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model=Path("base"), data=["train.txt"], out=Path("run"), teacher=Path("teacher"),
                      tokenizer=Path("tokenizer"))
    write_manifest(Run(cfg, engine=None, data=None, sampler=None, rank=0, world=1, accum=1, total_steps=1))
    monkeypatch.chdir(tmp_path / "base")  # export runs elsewhere, where "teacher" names nothing
    for name in ("teacher", "tokenizer"):
        target = tmp_path / name
        before = tree(target)
        code, err = cli(capsys, "export", "--run", tmp_path / "run", "--out", target, "--overwrite", "--format",
                        "dense")
        assert code == 2 and f"it is the input --run's --{name} ({RUN_MANIFEST})" in err, err
        assert tree(target) == before


# ============================================================================ 4: two jobs, one new --out


@pytest.mark.parametrize("primitive", ["renameat2", "mkdir"])
def test_a_folder_made_meanwhile_is_never_replaced(primitive, llama_dir, tmp_path, capsys, monkeypatch):
    """Even an empty one, which a plain rename() would replace without a word."""
    if primitive == "renameat2" and outputs._renameat2() is None:
        pytest.skip("the C library has no renameat2")
    if primitive == "mkdir":  # the fallback where the kernel or the file system lacks RENAME_NOREPLACE
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    out = tmp_path / "moe"
    real = convert_module.copy_side_files

    def racer_makes_out(*args):
        out.mkdir()
        return real(*args)

    monkeypatch.setattr(convert_module, "copy_side_files", racer_makes_out)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out)
    assert code == 2 and f"--out {out}: another process created it while this one was writing" in err, err
    assert out.is_dir() and not any(out.iterdir()) and siblings(out) == ["moe"]


def test_two_converts_to_one_new_out_the_second_to_finish_fails(llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "moe"
    real = convert_module.copy_side_files

    def other_job_finishes_first(*args):  # a second conversion to the same --out, run to its end meanwhile
        proc = subprocess.run([sys.executable, "-m", "factorllm_ds", "convert", "--model", str(llama_dir),
                               "--out", str(out), "--seed", "7"], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr
        return real(*args)

    monkeypatch.setattr(convert_module, "copy_side_files", other_job_finishes_first)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out, "--seed", "3")
    assert code == 2 and "another process created it" in err and "Give each job its own --out" in err, err
    assert json.loads((out / MANIFEST_FILE).read_text())["settings"]["seed"] == 7  # the first to finish stays
    assert siblings(out) == ["moe"]


# ============================================================================ 17: sizes that overflow


@pytest.mark.parametrize("size", ["1e400GB", "1e300GB", "inf", "nan", "-1GB", "0"])
def test_a_shard_size_out_of_range_is_one_message_naming_the_flag(size, llama_dir, tiny_moe_dir, tmp_path, capsys):
    for argv in (["convert", "--model", llama_dir], ["export", "--model", tiny_moe_dir]):
        code, err = cli(capsys, *argv, "--out", tmp_path / "out", f"--max-shard-size={size}")
        assert code == 2 and f"--max-shard-size '{size}'" in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--gpu-memory", "--host-memory", "--runtime-memory"])
def test_plan_memory_that_overflows_is_one_message_naming_the_flag(flag, capsys):
    argv = ["plan", "--model", "smollm2-135m", "--gpus", "2"]
    code, err = cli(capsys, *argv, flag, "1e400GB")
    assert code == 2 and f"{flag} '1e400GB': too large" in err and "OverflowError" not in err, err
    code, err = cli(capsys, *argv, flag, "1e30TB")  # finite, but no machine's
    assert code == 2 and f"{flag} '1e30TB': too large" in err, err


# ============================================================================ 18: a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A function mounting a tmpfs of the given size (e.g. "4M") below tmp_path; unmounted at the end."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill ``fs`` up to ``leave`` free bytes."""
    filler = fs / "filler"
    with open(filler, "ab") as fh:
        try:
            while (free := outputs.free_bytes(fs)) > leave:
                fh.write(b"\0" * min(free - leave, 1 << 20))
                fh.flush()
        except OSError:
            pass
    return filler


def test_convert_to_a_file_system_too_small_is_refused_before_writing(llama_dir, tiny_moe_dir, small_fs, capsys):
    fs = small_fs("4M")
    for argv in (["convert", "--model", llama_dir], ["export", "--model", tiny_moe_dir]):
        code, err = cli(capsys, *argv, "--out", fs / "out")
        assert code == 2 and f"--out {fs / 'out'}: not enough disk space" in err, err
        assert f"the file system at {fs} has" in err and "this output needs about" in err and "MB" in err
        assert list(fs.iterdir()) == []


def test_a_disk_that_fills_up_mid_conversion_is_one_error_and_leaves_nothing(llama_dir, small_fs, capsys,
                                                                              monkeypatch):
    fs = small_fs("40M")  # room for the output, until something else takes it
    out = fs / "moe"
    real = convert_module.initial_router

    def disk_fills_up(*args):
        if not (fs / "filler").exists():
            fill(fs)
        return real(*args)

    monkeypatch.setattr(convert_module, "initial_router", disk_fills_up)
    code, err = cli(capsys, "convert", "--model", llama_dir, "--out", out)
    assert code == 2 and f"--out {out}: the file system at {fs} is full" in err, err
    assert "this output needs about" in err and "is free" in err and "Traceback" not in err
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]  # the partial output is gone


def test_a_report_is_written_whole_or_not_at_all(small_fs, tmp_path):
    fs = small_fs("2M")
    report = fs / "report.json"
    outputs.write_text_atomic(report, json.dumps({"factorllm_ds": "0", "perplexity": 12.5}), "--report")
    previous = report.read_bytes()
    fill(fs, leave=0)
    with pytest.raises(UserError, match=rf"--report {report}: the file system at {fs} is full"):
        outputs.write_text_atomic(report, json.dumps({"factorllm_ds": "0", "rows": "x" * 100_000}), "--report")
    assert report.read_bytes() == previous  # not truncated, not empty
    assert sorted(p.name for p in fs.iterdir()) == ["filler", "report.json"]  # no temp file left


def test_eval_checks_the_reports_disk_before_evaluating(tiny_moe_dir, small_fs, tmp_path, capsys, monkeypatch):
    from factorllm_ds import evaluate

    text = tiny.write_calibration_text(tmp_path / "text.txt", chars=4000)
    args = ["eval", "--model", tiny_moe_dir, "--data", text, "--seq-len", "32", "--max-windows", "1",
            "--sample-tokens", "0", "--device", "cpu"]
    # A 0-byte report (what a failed write used to leave) holds nothing to lose: the next eval replaces it.
    empty = tmp_path / "report.json"
    empty.write_bytes(b"")
    code, err = cli(capsys, *args, "--report", empty)
    assert code == 0 and json.loads(empty.read_text())["perplexity"] > 0, err

    fs = small_fs("2M")
    fill(fs, leave=64 << 10)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the report cannot be written")

    monkeypatch.setattr(evaluate, "load_eval_model", no_evaluation)
    code, err = cli(capsys, *args, "--report", fs / "report.json")
    assert code == 2 and f"--report {fs / 'report.json'}" in err and f"the file system at {fs} has" in err, err
    assert not (fs / "report.json").exists()
