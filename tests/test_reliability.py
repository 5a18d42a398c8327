"""The reliability faults of docs/reliability.md, one test (or more) each, through the CLI as users meet them.

Nothing lost (outputs that would replace inputs, two jobs on one run folder, interrupted writes),
nothing run (pickled code in a run folder), nothing silent (NaN/Inf, bad flags, damaged
checkpoints). Most checks run in-process; the ones about training launch real 2-process runs
on CPU (``dist``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import distributed_utils as du
import tiny
from factorllm_ds import distributed
from factorllm_ds.checkpoints import CHECKSUM_FILE, write_checksums
from factorllm_ds.cli import main
from factorllm_ds.layout import CHECKPOINT_DIR, EXPERT_FILE, MANIFEST_FILE, MODEL_STATES, RUN_MANIFEST
from factorllm_ds.outputs import make_marked_dir

NUM_EXPERTS, NUM_LAYERS = 4, 2


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``factorllm-ds ARGV``; argparse's own exit (bad flag values) included."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The id of a process that has ended (a child we started and reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def copy_model(src: Path, dst: Path, *, tokenizer: bool = True) -> Path:
    from factorllm_ds.hf_io import TOKENIZER_FILES

    shutil.copytree(src, dst, ignore=None if tokenizer else shutil.ignore_patterns(*TOKENIZER_FILES))
    return dst


def set_tensor(model_dir: Path, name: str, fn) -> None:
    """Rewrite tensor ``name`` of a (sharded) safetensors folder as ``fn(tensor)``."""
    index = model_dir / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    tensors = load_file(str(model_dir / shard))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})


def with_value(value: float, index=(0, 0)):
    def fn(t):
        t[index] = value
        return t
    return fn


# ============================================================================ 1, 2: --overwrite never deletes an input


def test_convert_out_parent_of_model_is_refused_with_overwrite(llama_dir, tmp_path, capsys):
    root = tmp_path / "DIR"
    model = copy_model(llama_dir, root / "model")
    (root / MANIFEST_FILE).write_text("{}")  # even a folder that looks like ours: it holds the input
    before = tree(root)
    code, _, err = cli(capsys, "convert", "--model", model, "--out", root, "--overwrite")
    assert code == 2 and "--overwrite refused" in err and f"holds the input --model {model}" in err, err
    assert tree(root) == before


def test_convert_overwrite_refuses_a_folder_it_did_not_write(llama_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", out, "--overwrite")
    assert code == 2 and "factorllm-ds did not write it" in err, err
    assert tree(out) == {"notes.txt": b"keep"}


def fake_run(run: Path, model: Path) -> Path:
    """What validation reads of a training run: run.json and a 'latest' pointer."""
    (run / CHECKPOINT_DIR / "step1").mkdir(parents=True)
    (run / RUN_MANIFEST).write_text(json.dumps({"model": str(model), "ep_size": 1, "world_size": 1}))
    (run / CHECKPOINT_DIR / "latest").write_text("step1")
    return run


def test_export_out_parent_of_run_is_refused_with_overwrite(tiny_moe_dir, tmp_path, capsys):
    root = tmp_path / "DIR"
    run = fake_run(root / "run", tiny_moe_dir)
    (root / MANIFEST_FILE).write_text("{}")
    before = tree(root)
    code, _, err = cli(capsys, "export", "--run", run, "--out", root, "--overwrite")
    assert code == 2 and f"holds the input --run {run}" in err, err
    assert tree(root) == before


# ============================================================================ 3: export never unpickles code


class RunsCode:
    """Unpickling this calls open(path, "w"): a stand-in for any code a checkpoint's author chose."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_export_refuses_a_checkpoint_that_would_run_code(tiny_moe_dir, tmp_path, capsys):
    run = fake_run(tmp_path / "run", tiny_moe_dir)
    tag = run / CHECKPOINT_DIR / "step1"
    ran = tmp_path / "code_ran"
    torch.save({"module": {}, "payload": RunsCode(ran)}, tag / MODEL_STATES)
    for layer in range(NUM_LAYERS):
        for e in range(NUM_EXPERTS):
            torch.save({}, tag / EXPERT_FILE.format(layer=layer, expert=e))
    write_checksums(tag)  # intact as saved: the checksums do not make a file trusted
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf")
    assert code == 2 and "will not be unpickled" in err and MODEL_STATES in err, err
    assert not ran.exists(), "the checkpoint's code ran"
    assert not (tmp_path / "hf").exists()


# ============================================================================ training CLI in-process


class ReachedProcessGroup(Exception):
    """Raised in place of process-group set-up: validation let the arguments through."""


@pytest.fixture
def train_cli(monkeypatch, capsys, tiny_moe_dir, tmp_path):
    """``train_cli(*extra, **flags)`` -> (exit code, stderr) of ``factorllm-ds train``, stopped at the process group."""
    from factorllm_ds import distributed

    def no_process_group(*args, **kwargs):
        raise ReachedProcessGroup()

    monkeypatch.setattr(distributed, "init", no_process_group)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    text = tiny.write_calibration_text(tmp_path / "train.txt")

    def call(*extra, **flags) -> tuple[int, str]:
        values = {"model": tiny_moe_dir, "data": text, "out": tmp_path / "out", "seq_len": 64, "steps": 2,
                  "ep_size": 1, **flags}
        argv = ["train", "--no-progress", *extra]
        for key, value in values.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        code, _, err = cli(capsys, *argv)
        return code, err

    return call


# ============================================================================ 5, 7, 12: numbers


@pytest.mark.parametrize("flags, message", [
    (dict(steps=0), "--steps 0: must be >= 1"),
    (dict(lr=-1), "--lr -1.0: must be a finite number > 0"),
    (dict(lr="nan"), "argument --lr: 'nan': must be a finite number"),
    (dict(router_lr="inf"), "argument --router-lr: 'inf': must be a finite number"),
])
def test_train_bad_numbers_are_refused(train_cli, tmp_path, flags, message):
    code, err = train_cli(**flags)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_convert_combine_scale_nan_is_refused(llama_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", tmp_path / "moe", "--combine-scale", "nan")
    assert code == 2 and "argument --combine-scale: 'nan': must be a finite number" in err, err
    assert list(tmp_path.iterdir()) == []


# ============================================================================ 6: NaN/Inf in the dense weights


@pytest.mark.parametrize("name, value", [
    ("model.layers.1.self_attn.o_proj.weight", float("nan")),  # copied file to file: the streamed check
    ("model.layers.0.mlp.up_proj.weight", float("inf")),  # read into memory: the check on read
])
def test_convert_names_the_first_non_finite_tensor(llama_dir, tmp_path, capsys, name, value):
    model = copy_model(llama_dir, tmp_path / "dense")
    set_tensor(model, name, with_value(value, (1, 2)))
    code, _, err = cli(capsys, "convert", "--model", model, "--out", tmp_path / "moe")
    assert code == 2 and f"tensor {name}" in err and "(first at index (1, 2))" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "moe").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    code, _, err = cli(capsys, "convert", "--model", model, "--out", tmp_path / "moe", "--allow-nonfinite")
    assert code == 0, err


def test_streamed_check_reads_in_chunks(llama_dir, tmp_path):
    from factorllm_ds.errors import UserError
    from factorllm_ds.hf_io import CheckpointReader

    model = copy_model(llama_dir, tmp_path / "dense")
    name = "model.embed_tokens.weight"
    set_tensor(model, name, with_value(float("-inf"), (-1, -1)))  # in the last chunk
    reader = CheckpointReader(model)
    with pytest.raises(UserError, match=r"1 Inf values"):
        reader.check_finite(name, chunk_bytes=4096)
    reader.check_finite("model.layers.0.self_attn.q_proj.weight", chunk_bytes=4096)  # intact: no error


def test_eval_names_the_first_layer_whose_output_is_not_finite(tiny_moe_dir, tmp_path, capsys):
    model = copy_model(tiny_moe_dir, tmp_path / "moe")
    set_tensor(model, "model.layers.1.self_attn.o_proj.weight", lambda t: t.fill_(float("nan")))
    text = tiny.write_calibration_text(tmp_path / "text.txt", chars=4000)
    code, _, err = cli(capsys, "eval", "--model", model, "--data", text, "--seq-len", "32", "--max-windows", "2",
                       "--sample-tokens", "0", "--device", "cpu")
    assert code == 2 and "the loss is nan" in err and "decoder layer 1 (model.layers.1)" in err, err


# ============================================================================ 8: no tokenizer files


def test_missing_tokenizer_says_so_and_suggests_the_flag(tiny_moe_dir, tmp_path, capsys, monkeypatch, train_cli):
    model = copy_model(tiny_moe_dir, tmp_path / "moe", tokenizer=False)
    text = tiny.write_calibration_text(tmp_path / "text.txt", chars=4000)
    eval_args = ["eval", "--model", model, "--data", text, "--seq-len", "32", "--max-windows", "1",
                 "--sample-tokens", "0", "--device", "cpu"]
    code, _, err = cli(capsys, *eval_args)
    assert code == 2 and f"--model {model}: no tokenizer files there" in err and "--tokenizer DIR" in err, err
    assert "sentencepiece" not in err
    code, _, err = cli(capsys, *eval_args, "--tokenizer", tiny_moe_dir)
    assert code == 0, err
    code, err = train_cli(model=model)
    assert code == 2 and "no tokenizer files there" in err and "--tokenizer DIR" in err, err
    with pytest.raises(ReachedProcessGroup):
        train_cli(model=model, tokenizer=tiny_moe_dir)


def test_convert_needs_a_tokenizer_only_for_calibration(llama_dir, tmp_path, capsys):
    dense = copy_model(llama_dir, tmp_path / "dense", tokenizer=False)
    text = tiny.write_calibration_text(tmp_path / "text.txt", chars=4000)
    code, _, err = cli(capsys, "convert", "--model", dense, "--out", tmp_path / "moe", "--split", "coactivation",
                       "--calib-data", text, "--calib-tokens", "256", "--calib-seq-len", "64")
    assert code == 2 and "no tokenizer files there" in err and "--tokenizer" in err, err
    assert not (tmp_path / "moe").exists()
    code, _, err = cli(capsys, "convert", "--model", dense, "--out", tmp_path / "moe", "--split", "coactivation",
                       "--calib-data", text, "--calib-tokens", "256", "--calib-seq-len", "64", "--tokenizer", llama_dir)
    assert code == 0, err
    assert (tmp_path / "moe" / "tokenizer.json").is_file() or (tmp_path / "moe" / "tokenizer.model").is_file()


# ============================================================================ 10: config.json names more layers


def test_config_naming_more_layers_than_the_weights_names_the_missing_tensor(llama_dir, tmp_path, capsys):
    model = copy_model(llama_dir, tmp_path / "dense")
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers + 1
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, "convert", "--model", model, "--out", tmp_path / "moe")
    assert code == 2 and f"lacks model.layers.{layers}.mlp.gate_proj.weight" in err, err
    assert f"num_hidden_layers {layers + 1}" in err
    assert not (tmp_path / "moe").exists()


# ============================================================================ 11: an output under a file


def test_outputs_under_a_file_fail_before_any_work(llama_dir, tiny_moe_dir, tmp_path, capsys, train_cli,
                                                   monkeypatch):
    from factorllm_ds import evaluate

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", blocker / "moe")
    assert code == 2 and f"its parent {blocker} is a file" in err, err
    code, err = train_cli(out=blocker / "run")
    assert code == 2 and f"its parent {blocker} is a file" in err, err

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the report cannot be written")

    monkeypatch.setattr(evaluate, "load_eval_model", no_evaluation)
    text = tiny.write_calibration_text(tmp_path / "text.txt", chars=4000)
    code, _, err = cli(capsys, "eval", "--model", tiny_moe_dir, "--data", text, "--report", blocker / "r.json")
    assert code == 2 and "--report" in err and f"its parent {blocker} is a file" in err, err
    code, _, err = cli(capsys, "eval", "--model", tiny_moe_dir, "--data", text, "--report", text)
    assert code == 2 and f"the input --data {text}" in err, err
    theirs = tmp_path / "theirs.json"
    theirs.write_text("{}")
    code, _, err = cli(capsys, "eval", "--model", tiny_moe_dir, "--data", text, "--report", theirs)
    assert code == 2 and "did not write" in err and theirs.read_text() == "{}", err
    code, _, err = cli(capsys, "bench-speed", "--model", tiny_moe_dir, "--dense", llama_dir, "--report",
                       blocker / "s.json")
    assert code == 2 and f"its parent {blocker} is a file" in err, err


def test_demo_work_holding_an_input_is_refused(tiny_moe_dir, tmp_path, capsys):
    work = tmp_path / "work"
    data = work / "train.txt"
    work.mkdir()
    data.write_text("text")
    (work / "demo_settings.json").write_text("{}")
    code, _, err = cli(capsys, "demo", "--work", work, "--data", data, "--model", tiny_moe_dir, "--fresh")
    assert code == 2 and f"holds the input --data {data}" in err, err
    assert data.read_text() == "text"


# ============================================================================ 13: binary --calib-data


def test_binary_calib_data_is_refused(llama_dir, tmp_path, capsys):
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", tmp_path / "moe", "--split", "coactivation",
                       "--calib-data", binary)
    assert code == 2 and f"--calib-data {binary}: not UTF-8 text" in err, err
    assert not (tmp_path / "moe").exists()


# ============================================================================ 14: plan


def test_plan_validates_every_flag_before_printing(capsys):
    code, out, err = cli(capsys, "plan", "--model", "smollm2-135m", "--gpus", "2", "--gpu-memory=-80GB",
                         "--host-memory", "lots", "--zero", "3")
    assert code == 2 and out == "", out
    for message in ("--gpu-memory -80GB: must be a positive size", "--host-memory 'lots'", "--zero 3"):
        assert message in err, err


def test_plan_judges_only_the_flags_given(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                                      max_position_embeddings=256)))
    code, out, err = cli(capsys, "plan", "--model", config, "--gpus", "2", "--device", "cpu", "--dtype", "fp32")
    assert code == 0 and "seq_len 256" in out, err  # the default 1024, capped at what the model takes
    code, _, err = cli(capsys, "plan", "--model", config, "--gpus", "2", "--seq-len", "1024")
    assert code == 2 and "--seq-len 1024 exceeds the model's max_position_embeddings (256)" in err, err


# ============================================================================ 15: interrupted writes


def test_stale_temp_folders_of_dead_processes_are_removed(llama_dir, tmp_path):
    out = tmp_path / "moe"
    stale = make_marked_dir(out, pid=dead_pid())  # what a killed convert leaves: its marker, then partial shards
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    other = tmp_path / "keep"
    other.mkdir()
    tiny.convert_tiny(llama_dir, out)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "moe"]


def test_a_replacement_cut_between_its_renames_loses_nothing(llama_dir, tmp_path, capsys):
    """The crash window of FolderWriter: the old `out` parked in .NAME.old-PID@HOST, the new one not yet moved in."""
    out = tiny.convert_tiny(llama_dir, tmp_path / "moe")
    before = tree(out)
    out.rename(make_marked_dir(out, "old", dead_pid()) / out.name)
    assert not out.exists()
    code, _, err = cli(capsys, "convert", "--model", llama_dir, "--out", out)
    assert code == 2 and "already exists" in err, err  # the restored folder, which --overwrite would replace
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_export_overwrite_replaces_its_own_output(tiny_moe_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(capsys, "export", "--model", tiny_moe_dir, "--out", out, "--format", "dense")[0] == 0
    code, _, err = cli(capsys, "export", "--model", tiny_moe_dir, "--out", out, "--format", "factorllm", "--overwrite")
    assert code == 0, err
    assert json.loads((out / MANIFEST_FILE).read_text())["format"] == "factorllm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ============================================================================ training runs (2 processes)

SEQ_LEN, STEPS = 64, 16


@pytest.fixture(scope="module")
def varied_text(tmp_path_factory) -> Path:
    return tiny.write_calibration_text(tmp_path_factory.mktemp("text") / "botchan.txt")


def run_args(model: Path, data: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return du.train_args(model, data, out, steps=steps, ep_size=2, seq_len=SEQ_LEN, lr=1e-2,
                         ds_config=Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json",
                         extra=("--eval-fraction", "0", *extra))


def wait_for_rows(job: du.Job, out: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) > rows:
            return
        if job.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {rows}:\n{job.wait(1).tail()}")


def rank_process(job: du.Job, rank: int):
    by_rank = {job.rank_of(p): p for p in job.workers()}
    return by_rank[rank]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, tiny_moe_dir, varied_text):
    """An uninterrupted run, and the same run SIGUSR1'd on rank 1 mid-way, then resumed with --resume."""
    root = tmp_path_factory.mktemp("preempt")
    whole, cut = root / "whole", root / "cut"
    first = du.run("torchrun", 2, run_args(tiny_moe_dir, varied_text, whole))
    with du.start("torchrun", 2, run_args(tiny_moe_dir, varied_text, cut)) as job:
        wait_for_rows(job, cut, 2)
        rank_process(job, 1).send_signal(signal.SIGUSR1)  # one rank: agree() stops both at one step
        stopped = job.wait()
    resumed = du.run("torchrun", 2, run_args(tiny_moe_dir, varied_text, cut, "--resume"))
    return {"whole": whole, "cut": cut, "first": first, "stopped": stopped, "resumed": resumed}


@pytest.mark.dist
def test_preempted_run_saves_exits_requeueable_and_resumes_bit_exactly(preempted):
    first, stopped, resumed = preempted["first"], preempted["stopped"], preempted["resumed"]
    first.check()
    assert stopped.returncode != 0, stopped.tail()
    assert "received SIGUSR1" in stopped.output and "preempted: saved a checkpoint at step" in stopped.output
    assert "exitcode  : 138" in stopped.output, stopped.tail()  # torchrun's report of the ranks' exit: SIGUSR1's
    resumed.check()
    whole, cut = preempted["whole"], preempted["cut"]
    tags = sorted(p.name for p in (cut / CHECKPOINT_DIR).iterdir() if p.is_dir())
    assert len(tags) == 2 and f"step{STEPS}" in tags, tags  # the preemption checkpoint and the final one
    stop_step = int(next(t for t in tags if t != f"step{STEPS}")[4:])
    assert 2 <= stop_step < STEPS
    assert all((cut / CHECKPOINT_DIR / t / CHECKSUM_FILE).is_file() for t in tags)
    a, b = du.read_metrics(whole), du.read_metrics(cut)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "pa", "balance", "agreement", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for path in sorted((whole / CHECKPOINT_DIR / f"step{STEPS}").glob("*model_states.pt")):
        x = torch.load(path, map_location="cpu", weights_only=True)
        y = torch.load(cut / CHECKPOINT_DIR / f"step{STEPS}" / path.name, map_location="cpu", weights_only=True)
        for key, tensor in x.get("module", x).items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, y.get("module", y)[key]), f"{path.name}: {key}"


@pytest.mark.dist
def test_truncated_latest_checkpoint_is_named_and_the_intact_one_offered(preempted, train_cli, tiny_moe_dir,
                                                                         tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(preempted["cut"], run)
    tags = sorted((p.name for p in (run / CHECKPOINT_DIR).iterdir() if p.is_dir()), key=lambda t: (len(t), t))
    older, latest = tags
    victim = run / CHECKPOINT_DIR / latest / EXPERT_FILE.format(layer=1, expert=3)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    code, err = train_cli("--resume", out=run, steps=STEPS)
    assert code == 2 and str(victim) in err and "truncated" in err, err
    assert f"newest intact checkpoint is {older}" in err and f"--resume-tag {older}" in err, err
    with pytest.raises(ReachedProcessGroup):
        train_cli("--resume", "--resume-tag", older, out=run, steps=STEPS)
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf")
    assert code == 2 and str(victim) in err and f"--tag {older}" in err, err
    assert not (tmp_path / "hf").exists()
    code, _, err = cli(capsys, "export", "--run", run, "--tag", older, "--out", tmp_path / "hf")
    assert code == 0, err


@pytest.mark.dist
def test_two_jobs_on_one_run_folder(tiny_moe_dir, varied_text, tmp_path):
    out = tmp_path / "run"
    steps = 300  # long enough for the second job to start (~15 s here, more on a loaded machine) while the first runs
    with du.start("torchrun", 2, run_args(tiny_moe_dir, varied_text, out, steps=steps)) as first:
        wait_for_rows(first, out, 1)
        second = du.run("python", 1, du.train_args(tiny_moe_dir, varied_text, out, steps=2, ep_size=1,
                                                   seq_len=SEQ_LEN, extra=("--resume",)))
        assert second.returncode == 2, second.tail()
        assert "another job is using this folder (host" in second.output and "pid" in second.output, second.tail()
        assert first.popen.poll() is None, "the first job ended before the second one tried: the test proves nothing"
        first_result = first.wait()
    first_result.check()
    assert [r["step"] for r in du.read_metrics(out)] == list(range(1, steps + 1))


# ============================================================================ slurm: preemptible, requeued, resumed


def test_sbatch_scripts_ask_for_a_warning_signal_and_requeue():
    root = Path(__file__).resolve().parents[1]
    for script in sorted((root / "slurm").glob("*.sbatch")):
        text = script.read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text, script.name


def test_requeued_job_resumes_or_restarts(tmp_path):
    """A run in OUT with a finished checkpoint (latest, or a tag holding checksums.json) goes on with --resume; one
    that died before its first checkpoint starts again with --restart; the user's own choice is left alone."""
    root = Path(__file__).resolve().parents[1]
    model, data, out = tmp_path / "moe", tmp_path / "train.txt", tmp_path / "run"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "factorllm", "num_experts": 4}')
    data.write_text("text")
    env = {**du.worker_env(), "MODEL": str(model), "DATA": str(data), "OUT": str(out), "DRY_RUN": "1", "CHECK": "0",
           "NTASKS": "2", "EP_SIZE": "2", "PYTHON": sys.executable, "DEVICE": "cpu"}

    def dry(*args: str) -> list[str]:
        res = subprocess.run(["bash", str(root / "slurm/train_tasks.sbatch"), *args], env=env, capture_output=True,
                             text=True, cwd=root, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert not {"--resume", "--restart"} & set(dry())
    (out / CHECKPOINT_DIR / "step4").mkdir(parents=True)  # a save that never finished: no checksums, no latest
    (out / RUN_MANIFEST).write_text("{}")
    assert dry()[-1] == "--restart" and "--resume" not in dry()
    assert dry("--resume-tag", "step2")[-2:] == ["--resume-tag", "step2"]  # the user's choice, nothing added
    (out / CHECKPOINT_DIR / "step4" / CHECKSUM_FILE).write_text("{}")  # finished, though latest was not written
    assert dry()[-1] == "--resume" and "--restart" not in dry()
    (out / CHECKPOINT_DIR / "step4" / CHECKSUM_FILE).unlink()
    (out / CHECKPOINT_DIR / "latest").write_text("step4")
    assert dry()[-1] == "--resume"


def test_preemptible_launch_requeues_on_the_requeue_codes(tmp_path):
    """launch_preemptible: USR1 reaches the command; exit 138 -> `scontrol requeue` (a stub here)."""
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {requeued}\n")
    (bin_dir / "scontrol").chmod(0o755)
    child = ("python3 -c 'import signal,sys,time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(138)); "
             "open(sys.argv[1], \"w\").close(); time.sleep(60)' " + str(tmp_path / "ready"))
    script = (f"SCRIPT=test; source {root}/launch/common.sh; launch_preemptible {json.dumps(child)}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "DEVICE": "cpu",
           "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 138, err
    assert requeued.read_text().split() == ["requeue", "77"], err


@pytest.mark.dist
def test_shared_memory_all_reduce_leaves_nothing_in_dev_shm(tmp_path):
    """DeepSpeed's CPU shm all-reduce (deepspeed launcher: all ranks on one host) creates one /dev/shm
    segment per rank and never unlinks it; distributed.init unlinks the names once every rank has mapped
    them, and the shm all-reduce still sums right (both of DeepSpeed's algorithms)."""
    port, out = du.free_port(), tmp_path / "shm.json"
    script = Path(__file__).parent / "scripts" / "shm_allreduce.py"
    du.run_command([du.BIN / "deepspeed", "--no_local_rank", "--master_port", str(port), "--num_gpus", "2",
                    script, out]).check()
    got = json.loads(out.read_text())
    assert got["uses_shm"], "DeepSpeed's shm all-reduce op was not active: nothing was tested"
    assert got["left"] == [], got
    assert got["sums"] == [[3.0, 3.0], [3.0, 3.0]], got
    assert distributed.shm_buffer_names(addr="*", port=port) == []
