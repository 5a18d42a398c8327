"""Model and input checks (issue 23): every command that reads a model refuses, in one message and before it
writes or starts anything, a config.json that does not fit the weights, a missing shard, a tokenizer larger than
the vocabulary, a --seq-len beyond the positions, NaN/Inf in what it exports, and an mpirun job without mpi4py.

The broken inputs are real: tiny models (tests/tiny.py) whose config.json, safetensors files, tokenizer or
checkpoint were edited on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from factorllm_ds import distributed, keys
from factorllm_ds.checkpoints import write_checksums
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import CheckpointReader
from factorllm_ds.layout import CHECKPOINT_DIR, EXPERT_FILE, MODEL_STATES, RUN_MANIFEST
from factorllm_ds.sources import DS_EXPERT_KEY
from tiny import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def edit_config(model: Path, **fields) -> Path:
    """Set ``fields`` in the folder's config.json; ``text_config.NAME`` sets a field of a FactorLLM text_config."""
    path = model / "config.json"
    config = json.loads(path.read_text())
    for name, value in fields.items():
        target = config
        if name.startswith("text_config."):
            target, name = config["text_config"], name.partition(".")[2]
        target[name] = value
    path.write_text(json.dumps(config, indent=2))
    return model


def set_tensor(model: Path, name: str, fn) -> Path:
    """Rewrite tensor ``name`` of a (sharded) safetensors folder as ``fn(tensor)``."""
    index = model / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    tensors = load_file(str(model / shard))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(model / shard), metadata={"format": "pt"})
    return shard


def poisoned(value: float):
    def fn(t):
        t.view(-1)[3] = value
        return t
    return fn


@pytest.fixture
def text(tmp_path) -> Path:
    return tiny.write_calibration_text(tmp_path / "text.txt")


# ============================================================================ 7, 14: config.json against the weights

# (field, value, what the weights say): each breaks a different shape, the last two the layer count both ways.
DENSE_CONFIG_FAULTS = [
    ("intermediate_size", 256, "128"),
    ("vocab_size", 31000, "32000"),
    ("hidden_size", 96, "64"),
    ("num_key_value_heads", 4, "32"),
    ("head_dim", 8, "32"),
    ("num_hidden_layers", 1, "2 layers (0..1)"),
    ("num_hidden_layers", 3, "2 layers (0..1)"),
]


def assert_names_the_config(err: str, model: Path, field: str, value, weights: str) -> None:
    field = field.rpartition(".")[2]
    assert str(model / "config.json") in err and "disagrees with the weights" in err, err
    assert re.search(rf"\b{field} {value}\b", err) or f"{field} {value} x" in err, err
    assert f"the weights say {weights}" in err or f"the weights hold {weights}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("field, value, weights", DENSE_CONFIG_FAULTS)
def test_convert_refuses_a_config_that_does_not_fit_the_weights(llama_dir, tmp_path, capsys, field, value, weights):
    model = edit_config(shutil.copytree(llama_dir, tmp_path / "dense"), **{field: value})
    code, err = cli(capsys, "convert", "--model", model, "--out", tmp_path / "moe", "--num-experts", "4")
    assert code == 2, err
    assert_names_the_config(err, model, field, value, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # nothing written, no temp folder left


@pytest.mark.parametrize("field, value, weights", [DENSE_CONFIG_FAULTS[i] for i in (1, 2, 5)])
def test_eval_of_a_dense_model_refuses_a_config_that_does_not_fit(llama_dir, tmp_path, capsys, text, field, value,
                                                                  weights):
    model = edit_config(shutil.copytree(llama_dir, tmp_path / "dense"), **{field: value})
    code, err = cli(capsys, "eval", "--model", model, "--data", text, "--seq-len", "32", "--max-windows", "1",
                    "--sample-tokens", "0", "--device", "cpu")
    assert code == 2, err
    assert_names_the_config(err, model, field, value, weights)


@pytest.mark.parametrize("field, value, weights", [("expert_intermediate_size", 16, "32"),
                                                   ("num_experts", 8, "4"),
                                                   ("text_config.hidden_size", 128, "64"),
                                                   ("text_config.num_hidden_layers", 1, "2 layers (0..1)")])
def test_moe_commands_refuse_a_config_that_does_not_fit(tiny_moe_dir, tmp_path, capsys, text, field, value, weights):
    model = edit_config(shutil.copytree(tiny_moe_dir, tmp_path / "moe"), **{field: value})
    code, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "hf")
    assert code == 2, err
    assert_names_the_config(err, model, field, value, weights)
    assert not (tmp_path / "hf").exists()
    code, err = cli(capsys, "eval", "--model", model, "--data", text, "--seq-len", "32", "--max-windows", "1",
                    "--sample-tokens", "0", "--device", "cpu")
    assert code == 2, err
    assert_names_the_config(err, model, field, value, weights)
    code, err = cli(capsys, "train", "--check", "--model", model, "--data", text, "--out", tmp_path / "run",
                    "--seq-len", "32", "--steps", "1", "--ep-size", "1")
    assert code == 2, err
    assert_names_the_config(err, model, field, value, weights)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fault", ["config", "shard"])
def test_train_checks_the_teacher_folder_before_its_process_group(llama_dir, tiny_moe_dir, tmp_path, capsys, text,
                                                                   fault):
    """--teacher is loaded only after the process group started: its config and shards are checked by --check."""
    teacher = shutil.copytree(llama_dir, tmp_path / "dense")
    if fault == "config":
        edit_config(teacher, intermediate_size=256)
    else:
        index = json.loads((teacher / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[-1]
        (teacher / shard).unlink()
    code, err = cli(capsys, "train", "--check", "--model", tiny_moe_dir, "--data", text, "--out", tmp_path / "run",
                    "--seq-len", "32", "--steps", "1", "--ep-size", "1", "--teacher", teacher)
    assert code == 2, err
    if fault == "config":
        assert_names_the_config(err, teacher, "intermediate_size", 256, "128")
    else:
        assert f"--teacher {teacher}" in err and f"shard {shard} named in model.safetensors.index.json is missing" \
            in err, err
    assert not (tmp_path / "run").exists()


def test_a_consistent_config_passes(llama_dir, qwen2_dir, tiny_moe_dir):
    """The check itself: every tiny model as built agrees with its config (tied embeddings, q/k/v biases, MoE);
    a FactorLLM config's top-level copies of text_config fields must agree with it."""
    from factorllm_ds.hf_io import config_shape_problems, read_config

    for folder in (llama_dir, qwen2_dir, tiny_moe_dir):
        assert config_shape_problems(read_config(folder), CheckpointReader(folder).infos) == [], folder
    config = dict(read_config(tiny_moe_dir), vocab_size=31000)
    assert config_shape_problems(config, CheckpointReader(tiny_moe_dir).infos) == [
        "vocab_size 31000 at the top level, but text_config has vocab_size 32000"]


# ============================================================================ 19: eval of a model with a missing shard


def test_eval_of_a_dense_model_with_a_missing_shard_names_it(llama_dir, tmp_path, capsys, text):
    model = shutil.copytree(llama_dir, tmp_path / "dense")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (model / shard).unlink()
    code, err = cli(capsys, "eval", "--model", model, "--data", text, "--seq-len", "32", "--max-windows", "1",
                    "--sample-tokens", "0", "--device", "cpu")
    assert code == 2 and f"shard {shard} named in model.safetensors.index.json is missing" in err, err
    assert "Traceback" not in err


# ============================================================================ 9: eval --seq-len beyond the positions


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_eval_seq_len_beyond_the_positions_is_refused_as_train_does(llama_dir, tiny_moe_dir, tmp_path, capsys, text,
                                                                    which):
    model = {"dense": llama_dir, "moe": tiny_moe_dir}[which]
    code, err = cli(capsys, "eval", "--model", model, "--data", text, "--seq-len", "600", "--device", "cpu",
                    "--report", tmp_path / "report.json")
    assert code == 2 and "--seq-len 600 exceeds the model's max_position_embeddings (512)" in err, err
    assert not (tmp_path / "report.json").exists()


# ======================================================================= 15: a tokenizer larger than the vocabulary


@pytest.fixture
def big_tokenizer(tmp_path, tokenizer_dir) -> Path:
    """The tiny models' 32,000-token tokenizer with 3 tokens added: ids 32000..32002 have no embedding row."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>"])
    tok.save_pretrained(tmp_path / "big-tokenizer")
    return tmp_path / "big-tokenizer"


@pytest.mark.parametrize("where", ["--tokenizer", "in the model folder"])
def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_moe_dir, llama_dir, tmp_path, capsys, text,
                                                           big_tokenizer, monkeypatch, where):
    def with_tokenizer(src: Path, name: str) -> tuple[Path, list]:
        if where == "--tokenizer":
            return src, ["--tokenizer", big_tokenizer]
        model = shutil.copytree(src, tmp_path / name)
        for f in big_tokenizer.iterdir():
            shutil.copy2(f, model / f.name)
        return model, []

    moe, flags = with_tokenizer(tiny_moe_dir, "moe")
    dense, dense_flags = with_tokenizer(llama_dir, "dense")
    # The words of the text are all in the base vocabulary: the added ids would only turn up somewhere else.
    (tmp_path / "extra.txt").write_text(text.read_text()[:2000] + " <extra_c> " * 40)
    for model, extra in ((moe, flags), (dense, dense_flags)):
        code, err = cli(capsys, "eval", "--model", model, "--data", tmp_path / "extra.txt", "--seq-len", "32",
                        "--sample-tokens", "0", "--device", "cpu", *extra)
        assert code == 2 and "the tokenizer has 32003 tokens" in err and "vocab_size 32000" in err, err
    # convert: only calibration text is tokenized
    code, err = cli(capsys, "convert", "--model", dense, "--out", tmp_path / "converted", "--calib-data",
                    tmp_path / "extra.txt", "--calib-tokens", "256", "--calib-seq-len", "64", *dense_flags)
    assert code == 2 and "the tokenizer has 32003 tokens" in err and "vocab_size 32000" in err, err
    assert not (tmp_path / "converted").exists()
    # train: refused once its text is tokenized, before any process group (none is ever started here). The added
    # tokens alone are no error: a text that never produces them trains (tokenizers carry chat tokens a model's
    # embedding may lack), so `train --check`, which reads no text, passes.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    code, err = cli(capsys, "train", "--check", "--model", moe, "--data", text, "--out", tmp_path / "run",
                    "--seq-len", "32", "--steps", "1", "--ep-size", "1", *flags)
    assert code == 0, err
    code, err = cli(capsys, "train", "--model", moe, "--data", tmp_path / "extra.txt", "--out", tmp_path / "run",
                    "--seq-len", "32", "--steps", "1", "--ep-size", "1", *flags)
    assert code == 2 and "the tokenizer has 32003 tokens" in err and "vocab_size 32000" in err, err
    assert not (tmp_path / "run").exists()


# ============================================================================ 6: export of NaN/Inf


def trained_run(moe: Path, run: Path, tag: str = "step2") -> Path:
    """A run folder as `train` saves it, holding ``moe``'s weights: the non-expert tensors in MODEL_STATES
    (routers under DeepSpeed's names), each expert in its own EXPERT_FILE, checksums written after the save."""
    reader = CheckpointReader(moe)
    expert = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
    module, experts = {}, {}
    for name in reader.names():
        m = expert.fullmatch(name)
        if m:
            layer, e, part = int(m[1]), int(m[2]), m[3]
            key = DS_EXPERT_KEY.format(layer=layer, expert=e, part=part)
            experts.setdefault((layer, e), {})[key] = reader.get(name)
        else:
            module[name.replace("mlp.router.", "mlp.moe.deepspeed_moe.gate.router.")] = reader.get(name)
    folder = run / CHECKPOINT_DIR / tag
    folder.mkdir(parents=True)
    torch.save({"module": module, "step": 2}, folder / MODEL_STATES)
    for (layer, e), tensors in experts.items():
        torch.save(tensors, folder / EXPERT_FILE.format(layer=layer, expert=e))
    write_checksums(folder)
    (run / CHECKPOINT_DIR / "latest").write_text(tag)
    (run / RUN_MANIFEST).write_text(json.dumps({"model": str(moe), "ep_size": 1, "world_size": 1, "settings": {}}))
    return run


def poison_run(run: Path, file: str, key: str, value: float, tag: str = "step2") -> None:
    path = run / CHECKPOINT_DIR / tag / file
    state = torch.load(path, weights_only=True)
    tensors = state["module"] if file == MODEL_STATES else state
    tensors[key] = poisoned(value)(tensors[key].clone())
    torch.save(state, path)
    write_checksums(path.parent)  # intact as saved: the values are what is wrong


@pytest.mark.parametrize("file, key, name, value", [
    (MODEL_STATES, "model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight", float("nan")),
    (MODEL_STATES, "model.layers.0.mlp.moe.deepspeed_moe.gate.router.weight", "model.layers.0.mlp.router.weight",
     float("inf")),
    (EXPERT_FILE.format(layer=1, expert=3), DS_EXPERT_KEY.format(layer=1, expert=3, part="down"),
     keys.expert_key("down", 1, 3), float("-inf")),
])
def test_export_of_a_run_holding_nan_is_refused(tiny_moe_dir, tmp_path, capsys, file, key, name, value):
    run = trained_run(tiny_moe_dir, tmp_path / "run")
    code, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf")
    assert code == 0, err  # the stand-in run exports as it is
    poison_run(run, file, key, value)
    for fmt in ("factorllm", "dense"):
        code, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "hf", "--format", fmt, "--overwrite")
        assert code == 2, err
        assert f"{run / CHECKPOINT_DIR / 'step2' / file}: tensor {name}" in err and "--allow-nonfinite" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # the earlier export, untouched
    code, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "anyway", "--allow-nonfinite")
    assert code == 0, err
    assert not bool(torch.isfinite(load_file(str(tmp_path / "anyway" / "model.safetensors"))[name]).all())


def test_export_of_a_folder_holding_nan_is_refused(tiny_moe_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_moe_dir, tmp_path / "moe")
    name = keys.expert_key("gate", 1, 2)
    shard = set_tensor(model, name, poisoned(float("nan")))
    code, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "hf", "--format", "dense")
    assert code == 2 and f"{model / shard}: tensor {name}" in err and "--allow-nonfinite" in err, err
    assert not (tmp_path / "hf").exists()
    code, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "hf", "--allow-nonfinite")
    assert code == 0, err


# ============================================================================ 13: a refusal names the --format given


@pytest.mark.parametrize("fmt", ["qwen2-moe", "mixtral"])
def test_a_format_refusal_names_the_format_given(tiny_moe_dir, tmp_path, capsys, fmt):
    model = shutil.copytree(tiny_moe_dir, tmp_path / "moe")
    set_tensor(model, keys.ROUTER_BIAS.format(layer=1), lambda t: t + 0.5)  # a trained router bias
    code, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "hf", "--format", fmt)
    assert code == 2 and f"--format {fmt}: " in err and "router has a bias" in err, err
    assert "--no-router-bias" in err, err
    assert not re.search(rf"--format (?!{fmt}\b)[\w-]+: ", err), err  # no other format speaks for it
    assert not (tmp_path / "hf").exists()


# ============================================================================ 20: mpirun without mpi4py

HIDE_MPI4PY = tiny.hiding("mpi4py") + """
from factorllm_ds.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_mpirun_without_mpi4py_gives_the_install_hint(tiny_moe_dir, tmp_path, text):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")}
    env.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_LOCAL_RANK="0",
               OMPI_COMM_WORLD_LOCAL_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", HIDE_MPI4PY, "train", "--model", str(tiny_moe_dir), "--data",
                           str(text), "--out", str(tmp_path / "run"), "--seq-len", "32", "--steps", "1",
                           "--ep-size", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install mpi4py" in proc.stderr and "factorllm-ds[mpi]" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_mpi_rank_variables_without_mpi4py(monkeypatch):
    """MPICH / Intel MPI (PMI_RANK) the same; with MASTER_ADDR exported mpi4py is not needed at all."""
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")

    class HideMpi4py:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "mpi4py":
                raise ModuleNotFoundError("No module named 'mpi4py'", name=name)

    monkeypatch.setattr(sys, "meta_path", [HideMpi4py(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "mpi4py", raising=False)
    with pytest.raises(UserError, match=r"pip install mpi4py"):
        distributed.detect()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert distributed.detect() == distributed.DistInfo(1, 2, 0, 2, "mpi")
