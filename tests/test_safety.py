"""The reliability guards (outputs, locks, checkpoints, safe_load, finite, preemption): nothing lost, nothing run,
nothing silent.

Each guard is tried on the case it exists for (an --out that would delete the input model, a
pickle that would run code, a second job in the same folder, a truncated checkpoint file, a
preemption signal) and on the case it must let through.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from factorllm_ds import checkpoints, finite, locks, outputs, preemption, safe_load
from factorllm_ds.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "factorllm_manifest.json"
MARKERS = (MARKER, "run.json")


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


# Child processes import factorllm_ds.locks / .preemption without the package's __init__, which registers the
# model with transformers (seconds per process, and nothing those modules need).
_LIGHT_IMPORT = f"""
import sys, types
_pkg = types.ModuleType("factorllm_ds")
_pkg.__path__ = [{str(ROOT / "factorllm_ds")!r}]
sys.modules["factorllm_ds"] = _pkg
"""


def _child(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _LIGHT_IMPORT + textwrap.dedent(code), *args]


def _python(code: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(_child(code, *args), capture_output=True, text=True, timeout=timeout)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- check_output


def test_overwrite_of_the_inputs_parent_is_refused_and_nothing_deleted(tmp_path):
    work = tmp_path / "work"
    model = _model_folder(work / "dense")
    (work / MARKER).write_text("{}")  # even a folder the tool wrote is not replaced when it holds the input
    with pytest.raises(UserError) as err:
        outputs.check_output(work, "--out", True, {"--model": model}, MARKERS)
    msg = str(err.value)
    assert "--out" in msg and "--model" in msg and "delete the input" in msg
    assert (model / "config.json").read_text() == "{}" and (model / "model.safetensors").is_file()


def test_out_equal_to_or_inside_the_input_is_refused(tmp_path):
    run = _model_folder(tmp_path / "run")
    (run / "run.json").write_text("{}")
    inner = run / "checkpoints"
    inner.mkdir()
    (inner / MARKER).write_text("{}")
    with pytest.raises(UserError, match="lies inside the input --run"):
        outputs.check_output(inner, "--out", True, {"--run": run}, MARKERS)
    with pytest.raises(UserError, match="is the input --run"):
        outputs.check_output(run, "--out", True, {"--run": run}, MARKERS)
    # through a symbolic link too
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(UserError, match="inside the input --run"):
        outputs.check_output(inner, "--out", True, {"--run": link}, MARKERS)
    assert (run / "config.json").is_file() and (inner / MARKER).is_file()


def test_foreign_folder_is_never_replaced(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(UserError, match="did not write it") as err:
        outputs.check_output(out, "--out", True, {}, MARKERS)
    assert MARKER in str(err.value)
    # Without --overwrite the message must not suggest a flag that would be refused as well.
    with pytest.raises(UserError) as err:
        outputs.check_output(out, "--out", False, {}, MARKERS)
    assert "--overwrite would be refused too" in str(err.value)
    assert (out / "holiday.jpg").is_file()


def test_own_folder_may_be_replaced_only_with_overwrite(tmp_path):
    model = _model_folder(tmp_path / "dense")
    out = tmp_path / "moe"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(UserError, match="pass --overwrite to replace it"):
        outputs.check_output(out, "--out", False, {"--model": model}, MARKERS)
    outputs.check_output(out, "--out", True, {"--model": model}, MARKERS)
    empty = tmp_path / "empty"
    empty.mkdir()
    outputs.check_output(empty, "--out", True, {"--model": model}, MARKERS)
    outputs.check_output(tmp_path / "new" / "deeper" / "moe", "--out", False, {"--model": model}, MARKERS)


def test_every_problem_is_reported_at_once(tmp_path):
    out = tmp_path / "mine"
    model = _model_folder(out / "dense")  # foreign (no marker) AND holds the input
    with pytest.raises(UserError) as err:
        outputs.check_output(out, "--out", True, {"--model": model}, MARKERS)
    msg = str(err.value)
    assert msg.startswith(f"--out {out}:") and msg.count("\n  - ") == 2
    assert "did not write it" in msg and "delete the input" in msg


def test_a_file_as_parent_or_as_out_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        outputs.check_output(blocker / "sub" / "out", "--out", False, {}, MARKERS)
    with pytest.raises(UserError, match="is a file, not a folder this tool wrote"):
        outputs.check_output(blocker, "--out", True, {}, MARKERS)


def test_unwritable_parent_is_refused(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    with pytest.raises(UserError, match="not writable"):
        outputs.check_output(parent / "out", "--out", False, {}, MARKERS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_parent_is_refused_for_real(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(UserError, match="not writable"):
            outputs.check_output(parent / "out", "--out", False, {}, MARKERS)
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------- temp folders


def test_stale_temps_of_dead_processes_go_live_ones_stay(tmp_path):
    out = tmp_path / "moe"
    dead = _dead_pid()
    host = socket.gethostname()
    stale = [outputs.make_marked_dir(out, pid=dead)]           # made, and marked, by a command for this --out
    kept = [outputs.make_marked_dir(out),                      # this (live) process
            tmp_path / f".moe.tmp-{dead}",                    # no host in the name: whose it is cannot be told
            tmp_path / f".moe.tmp-{dead}@not-{host}",         # another node's: its pid says nothing here
            tmp_path / f".moe.tmp-{dead}x", tmp_path / f"moe.tmp-{dead}", tmp_path / "moe"]
    for folder in stale + kept:
        folder.mkdir(exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    a_file = tmp_path / f".other.tmp-{dead}"
    a_file.write_text("not a folder")
    removed = outputs.remove_stale_temps(out)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept) and a_file.is_file()


def test_stale_temp_removal_is_limited_to_one_output(tmp_path):
    dead = _dead_pid()
    mine = outputs.make_marked_dir(tmp_path / "moe", pid=dead)
    other = outputs.make_marked_dir(tmp_path / "export", pid=dead)
    assert outputs.remove_stale_temps(tmp_path / "moe") == [mine]
    assert other.is_dir()
    assert outputs.remove_stale_temps(tmp_path / "missing" / "moe") == []


def test_temp_name_round_trips_through_the_pattern(tmp_path):
    path = outputs.temp_dir_for(tmp_path / "my.model-v2", 1234)
    match = outputs._TEMP_RE.match(path.name)
    assert path.parent == tmp_path and match["name"] == "my.model-v2" and match["pid"] == "1234"


# ----------------------------------------------------------------------------- RunLock

_TRY_LOCK = """
    import sys
    from factorllm_ds.errors import UserError
    from factorllm_ds.locks import RunLock
    try:
        with RunLock(sys.argv[1]):
            print("locked")
    except UserError as err:
        print(err)
        sys.exit(2)
"""


def test_second_job_is_refused_with_the_holders_host_and_pid(tmp_path):
    with locks.RunLock(tmp_path / "run") as lock:
        assert lock.path.is_file()
        proc = _python(_TRY_LOCK, str(tmp_path / "run"))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout and socket.gethostname() in proc.stdout
        assert "--out" in proc.stdout and "another job" in proc.stdout
    proc = _python(_TRY_LOCK, str(tmp_path / "run"))  # released at the end of the block
    assert proc.returncode == 0 and "locked" in proc.stdout, proc.stdout + proc.stderr


def test_lock_of_a_killed_job_is_released_by_the_kernel(tmp_path):
    holder = subprocess.Popen(_child("""
        import sys, time
        from factorllm_ds.locks import RunLock
        lock = RunLock(sys.argv[1]).__enter__()
        print("ready", flush=True)
        time.sleep(60)
    """, str(tmp_path)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            locks.RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with locks.RunLock(tmp_path):
        pass


# ----------------------------------------------------------------------------- checksums


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3 << 20))
    (folder / "sub").mkdir()
    (folder / "sub" / "layer_0_expert_0.pt").write_bytes(os.urandom(1000))
    return folder


def test_checksums_catch_truncation_flipped_bytes_and_missing_files(tmp_path):
    tag = _checkpoint(tmp_path / "step2")
    checkpoints.write_checksums(tag)
    assert checkpoints.verify_checksums(tag) == []
    assert sorted(p.name for p in tag.iterdir()) == ["checksums.json", "mp_rank_00_model_states.pt", "sub"]

    big = tag / "mp_rank_00_model_states.pt"
    data = big.read_bytes()
    big.write_bytes(data[:-1])
    (problem,) = checkpoints.verify_checksums(tag)
    assert str(big) in problem and "truncated" in problem

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    big.write_bytes(bytes(flipped))
    (problem,) = checkpoints.verify_checksums(tag)
    assert str(big) in problem and "content differs" in problem
    assert checkpoints.verify_checksums(tag, sizes_only=True) == []  # same size: only the digest sees it

    (tag / "sub" / "layer_0_expert_0.pt").unlink()
    problems = checkpoints.verify_checksums(tag)
    assert len(problems) == 2 and any("layer_0_expert_0.pt: missing" in p for p in problems)


def test_missing_or_broken_manifest_is_reported_distinctly(tmp_path):
    tag = _checkpoint(tmp_path / "step1")
    (problem,) = checkpoints.verify_checksums(tag)
    assert problem.startswith("no checksums.json")
    (tag / checkpoints.CHECKSUM_FILE).write_text("{not json")
    (problem,) = checkpoints.verify_checksums(tag)
    assert "unreadable checksum manifest" in problem


def test_checksums_of_chosen_files_and_of_precomputed_entries(tmp_path):
    tag = _checkpoint(tmp_path / "step1")
    checkpoints.write_checksums(tag, ["sub/layer_0_expert_0.pt"])
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # not listed: not checked
    assert checkpoints.verify_checksums(tag) == []
    names = ["mp_rank_00_model_states.pt", "sub/layer_0_expert_0.pt"]
    halves = [checkpoints.hash_files(tag, names[r::2]) for r in range(2)]  # what two ranks would each hash
    checkpoints.write_checksums(tag, entries={**halves[0], **halves[1]})
    assert checkpoints.verify_checksums(tag) == []
    (tag / "sub" / "layer_0_expert_0.pt").write_bytes(b"x")
    assert len(checkpoints.verify_checksums(tag)) == 1


def test_newest_intact_skips_damaged_and_unrecorded_tags(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for tag in ("step1", "step2", "step3", "step4"):
        _checkpoint(root / tag)
        if tag != "step4":  # step4: interrupted before its manifest was written
            checkpoints.write_checksums(root / tag)
    (root / "step3" / "mp_rank_00_model_states.pt").write_bytes(b"short")
    newest_first = ["step4", "step3", "step2", "step1"]
    assert checkpoints.newest_intact(root, newest_first) == "step2"
    assert "step4" in caplog.text and "step3" in caplog.text  # not silent
    (root / "step2" / "sub" / "layer_0_expert_0.pt").write_bytes(b"")
    (root / "step1" / "sub" / "layer_0_expert_0.pt").unlink()
    assert checkpoints.newest_intact(root, newest_first) is None


# ----------------------------------------------------------------------------- safe_torch_load


class _Payload:
    """Unpickling this runs code: it writes a file (stands for any command an attacker chooses)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_pickled_code_is_never_run(tmp_path):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": OrderedDict(w=torch.ones(2)), "hook": _Payload(target)}, evil)
    torch.load(evil, weights_only=False)  # proves the payload is live: a plain load runs it
    assert target.read_text() == "pwned"
    target.unlink()
    with pytest.raises(UserError) as err:
        safe_load.safe_torch_load(evil, "--run")
    msg = str(err.value)
    assert str(evil) in msg and "will not be unpickled" in msg and "(first: exec)" in msg
    assert not target.exists()


def test_deepspeed_state_files_load(tmp_path):
    # What DeepSpeed 0.19 writes into mp_rank_00_model_states.pt under ZeRO (keys from a real run).
    states = {"module": OrderedDict(w=torch.randn(3, 2)), "buffer_names": [], "optimizer": None,
              "param_shapes": [OrderedDict(w=torch.Size([3, 2]))], "frozen_param_shapes": OrderedDict(),
              "shared_params": {}, "frozen_param_fragments": OrderedDict(),
              "lr_scheduler": {"base_lrs": [3e-3], "last_epoch": 2, "lr_lambdas": [None]}, "data_sampler": None,
              "random_ltd": None, "skipped_steps": 0, "global_steps": 2, "global_samples": 4, "dp_world_size": 2,
              "mp_world_size": 1, "checkpoint_parallel_dimensions": {},
              "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.19.8", "num_experts": [4, 4],
              "ds_autoep_layers": None, "step": 2}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(states, path)
    got = safe_load.safe_torch_load(path, "--run")
    assert torch.equal(got["module"]["w"], states["module"]["w"]) and got["ds_config"] == states["ds_config"]


def test_optimizer_files_need_the_deepspeed_allow_list(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    fragment_address = sys.modules["deepspeed.utils.tensor_fragment"].fragment_address
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                         "param_slice_mappings": [OrderedDict(w=fragment_address(2, 0))]}}, path)
    with pytest.raises(UserError, match="will not be unpickled"):
        safe_load.safe_torch_load(path, "--run")
    got = safe_load.safe_torch_load(path, "--run", allow=safe_load.OPTIM_STATE_GLOBALS)
    assert got["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients


def test_truncated_file_is_a_user_error(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": OrderedDict(w=torch.randn(100, 100))}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="unreadable checkpoint file"):
        safe_load.safe_torch_load(path, "--run")


# ----------------------------------------------------------------------------- finite numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_named(bad):
    t = torch.zeros(3, 4, dtype=torch.bfloat16)
    t[1, 2] = bad
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: .*index \(1, 2\)") as err:
        finite.check_finite("model.layers.0.mlp.up_proj.weight", t, "Re-download the checkpoint.")
    assert str(err.value).endswith("Re-download the checkpoint.")


def test_finite_and_integer_tensors_pass():
    finite.check_finite("w", torch.randn(5, 5))
    finite.check_finite("ids", torch.arange(10))


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999", "abc", ""])
def test_float_flags_reject_non_finite(text):
    with pytest.raises(UserError, match="--lr"):
        finite.finite_float("--lr", text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=finite.parse_finite_float)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", text])


def test_float_flags_accept_finite():
    assert finite.finite_float("--lr", "4e-5") == 4e-5 and finite.finite_float("--lr", 2) == 2.0
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=finite.parse_finite_float)
    assert parser.parse_args(["--lr", "-1.5"]).lr == -1.5


# ----------------------------------------------------------------------------- preemption


def test_signal_only_sets_the_flag_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in preemption.Preemption.SIGNALS}
    with preemption.Preemption() as pre:
        assert not pre.requested() and pre.exit_code == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert pre.requested() and pre.received == signal.SIGUSR1
        assert pre.exit_code == 138 and pre.exit_code in preemption.REQUEUE_EXIT_CODES
        assert preemption.agree(pre.requested())  # no process group: the local flag
    assert {s: signal.getsignal(s) for s in preemption.Preemption.SIGNALS} == before


def test_second_ctrl_c_stops_at_once():
    with preemption.Preemption() as pre:
        os.kill(os.getpid(), signal.SIGINT)
        assert pre.exit_code == 130 and 130 not in preemption.REQUEUE_EXIT_CODES
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes, soon after the kill
                pass


_AGREE_RANK = """
    import os, signal, sys
    import torch.distributed as dist
    from factorllm_ds.preemption import Preemption, agree

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    with Preemption() as pre:
        for step in range(10):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)   # only rank 1 is told
            if agree(pre.requested()):
                break
    print(f"rank{rank} stopped at {step} requested={pre.requested()} exit={pre.exit_code}", flush=True)
    dist.destroy_process_group()
"""


@pytest.mark.dist
def test_every_rank_stops_at_the_same_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(_child(_AGREE_RANK, str(r), str(tmp_path / "store")), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank0 stopped at 3 requested=False exit=0" in outs[0]
    assert "rank1 stopped at 3 requested=True exit=143" in outs[1]
