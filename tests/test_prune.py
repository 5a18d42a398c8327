"""`factorllm-ds prune`: static pruning (the equal-compute baseline) as a real, streamed command.

Tiny random dense models of three families, real safetensors and a real tokenizer; the pruned folder is loaded by
plain transformers and checked against what the command promises, computed here independently of prune.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_reliability import cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from factorllm_ds.prune import parse_keep

pytestmark = pytest.mark.usefixtures("one_thread")


def prune(capsys, model, out, calib, *flags) -> None:
    code, stdout, err = cli(capsys, "prune", "--model", model, "--out", out, "--calib-data", calib,
                            "--calib-tokens", 512, "--calib-seq-len", 128, *flags)
    assert code == 0, err
    assert f"wrote {out}" in stdout


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def calib_ids(model_dir, calib) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor(tokenizer(calib.read_text(), add_special_tokens=False)["input_ids"][:512]).view(4, 128)


def layer0_mlp(model, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 0's MLP input, activations act(gate x)*(up x) and output on ``ids``."""
    seen = {}
    mlp = model.model.layers[0].mlp
    hooks = [mlp.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0])),
             mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("h", a[0])),
             mlp.register_forward_hook(lambda _m, _a, out: seen.setdefault("y", out))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen["x"].flatten(0, 1), seen["h"].flatten(0, 1), seen["y"].flatten(0, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_keeping_every_neuron_is_the_dense_model(dense_model, calib_text, tmp_path, capsys, family):
    dense_dir = dense_model(family)
    prune(capsys, dense_dir, tmp_path / "all", calib_text, "--keep", "1.0", "--refit-down", "0")
    dense, pruned = load(dense_dir), load(tmp_path / "all")
    assert pruned.config.intermediate_size == dense.config.intermediate_size
    ids = calib_ids(dense_dir, calib_text)[:1]
    with torch.no_grad():
        want, got = dense(ids).logits, pruned(ids).logits
    # the same neurons in the same order: the same function, whatever the layer order of the sums
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0), (got - want).abs().max()


def test_half_keeps_each_layers_most_important_neurons_as_exact_slices(llama_dir, calib_text, tmp_path, capsys):
    prune(capsys, llama_dir, tmp_path / "half", calib_text, "--keep", "0.5", "--refit-down", "0")
    dense, pruned = load(llama_dir), load(tmp_path / "half")
    inter = dense.config.intermediate_size
    assert pruned.config.intermediate_size == inter // 2
    assert json.loads((tmp_path / "half" / "config.json").read_text())["intermediate_size"] == inter // 2
    # layer 0 sees the dense model's own inputs: its kept neurons are the top half by mean |a_i|·‖W_down[:, i]‖
    _, act_TI, _ = layer0_mlp(dense, calib_ids(llama_dir, calib_text))
    d_mlp, p_mlp = dense.model.layers[0].mlp, pruned.model.layers[0].mlp
    importance = act_TI.abs().mean(dim=0) * d_mlp.down_proj.weight.norm(dim=0)
    kept = torch.topk(importance, inter // 2).indices.sort().values
    assert torch.equal(p_mlp.gate_proj.weight, d_mlp.gate_proj.weight[kept])
    assert torch.equal(p_mlp.up_proj.weight, d_mlp.up_proj.weight[kept])
    assert torch.equal(p_mlp.down_proj.weight, d_mlp.down_proj.weight[:, kept])
    # every later layer chooses on the text as the layers already pruned below it transform it: the pruned model's
    # own input to that MLP, through the dense layer's gate and up rows
    ids = calib_ids(llama_dir, calib_text)
    for layer in range(1, dense.config.num_hidden_layers):
        seen = {}
        hook = pruned.model.layers[layer].mlp.register_forward_pre_hook(
            lambda _m, a, seen=seen: seen.setdefault("x", a[0]))
        with torch.no_grad():
            pruned(ids)
        hook.remove()
        d_mlp, p_mlp = dense.model.layers[layer].mlp, pruned.model.layers[layer].mlp
        x_TH = seen["x"].flatten(0, 1)
        with torch.no_grad():
            act_TI = d_mlp.act_fn(d_mlp.gate_proj(x_TH)) * d_mlp.up_proj(x_TH)
        importance = act_TI.abs().mean(dim=0) * d_mlp.down_proj.weight.norm(dim=0)
        kept = torch.topk(importance, inter // 2).indices.sort().values
        assert torch.equal(p_mlp.gate_proj.weight, d_mlp.gate_proj.weight[kept]), layer
    # and everything outside the MLPs is the dense model's, bit for bit
    dense_sd, pruned_sd = dense.state_dict(), pruned.state_dict()
    for name, tensor in pruned_sd.items():
        if ".mlp." not in name:
            assert torch.equal(tensor, dense_sd[name]), name


def test_refit_brings_the_pruned_ffn_closer_to_the_dense_one(llama_dir, calib_text, tmp_path, capsys):
    prune(capsys, llama_dir, tmp_path / "slices", calib_text, "--keep", "0.25", "--refit-down", "0")
    prune(capsys, llama_dir, tmp_path / "refit", calib_text, "--keep", "0.25", "--refit-down", "0.1")
    dense = load(llama_dir)
    x_TH, _, y_TH = layer0_mlp(dense, calib_ids(llama_dir, calib_text))
    errors, gates = {}, {}
    for name in ("slices", "refit"):
        mlp = load(tmp_path / name).model.layers[0].mlp
        with torch.no_grad():
            errors[name] = (mlp(x_TH) - y_TH).pow(2).sum().item()
        gates[name] = mlp.gate_proj.weight
    assert torch.equal(gates["refit"], gates["slices"])  # the refit changes the down projection only
    # the ridge objective at the exact slices is their error alone, so its minimiser's error cannot be larger
    assert errors["refit"] < 0.9 * errors["slices"], errors


@pytest.mark.parametrize("flags, message", [
    (["--keep", "0"], "--keep 0: 0 neurons; must be between 1 and 128"),
    (["--keep", "1.5"], "--keep 1.5: a fraction must be in (0, 1]"),
    (["--keep", "129"], "--keep 129: 129 neurons; must be between 1 and 128"),
    (["--keep", "half"], "--keep half: expected a fraction of the FFN like 0.5"),
    (["--keep", "0.5", "--refit-down", "-1"], "--refit-down -1.0: must be a finite number >= 0"),
    (["--keep", "0.5", "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
])
def test_bad_flags_are_one_error_naming_the_flag_and_write_nothing(llama_dir, calib_text, tmp_path, capsys, flags,
                                                                    message):
    code, _, err = cli(capsys, "prune", "--model", llama_dir, "--out", tmp_path / "out", "--calib-data", calib_text,
                       *flags)
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_file_and_existing_out_are_refused(llama_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "prune", "--model", llama_dir, "--out", tmp_path / "out", "--keep", "0.5",
                       "--calib-data", tmp_path / "none.txt")
    assert code == 2 and f"--calib-data {tmp_path / 'none.txt'}: no such file" in err, err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("a user's file")
    code, _, err = cli(capsys, "prune", "--model", llama_dir, "--out", tmp_path / "taken", "--keep", "0.5",
                       "--calib-data", llama_dir / "config.json")
    assert code == 2 and f"--out {tmp_path / 'taken'} already exists" in err, err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_a_moe_checkpoint_is_refused(tiny_moe_dir, calib_text, tmp_path, capsys):
    code, _, err = cli(capsys, "prune", "--model", tiny_moe_dir, "--out", tmp_path / "out", "--keep", "0.5",
                       "--calib-data", calib_text)
    assert code == 2 and "is already a FactorLLM checkpoint; pass the dense model" in err, err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_its_own_output(llama_dir, calib_text, tmp_path, capsys):
    prune(capsys, llama_dir, tmp_path / "out", calib_text, "--keep", "0.5")
    prune(capsys, llama_dir, tmp_path / "out", calib_text, "--keep", "0.25", "--overwrite")
    assert load(tmp_path / "out").config.intermediate_size == 32


@pytest.mark.parametrize("spec, count", [("0.5", 64), ("1.0", 128), ("1", 1), ("128", 128), ("0.004", 1)])
def test_keep_is_a_fraction_or_a_count(spec, count):
    assert parse_keep(spec, 128) == count


def test_a_tensor_of_no_known_role_is_named(llama_dir, calib_text, tmp_path, capsys):
    """A checkpoint holding a tensor prune would not know where to put (here an extra MLP weight) is refused,
    naming it, before anything is written."""
    from safetensors.torch import save_file

    model = shutil.copytree(llama_dir, tmp_path / "dense")
    name = "model.layers.0.mlp.extra_proj.weight"
    save_file({name: torch.zeros(4, 4)}, str(model / "extra.safetensors"))
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][name] = "extra.safetensors"
    index.write_text(json.dumps(data))
    code, _, err = cli(capsys, "prune", "--model", model, "--out", tmp_path / "out", "--keep", "0.5",
                       "--calib-data", calib_text)
    assert code == 2 and f"unexpected tensor {name}" in err, err
    assert not (tmp_path / "out").exists()
