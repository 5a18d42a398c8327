"""Folder-to-folder exports (factorllm_ds.export): standard HF MoE classes, dense, FactorLLM round trip.

The parity tests run in fp32 on tiny random models and compare logits at 1e-5 relative;
each first checks that routing visibly moves the logits (so a wrong combine scale or a
wrong expert order could not hide under the tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny
from factorllm_ds.errors import UserError
from factorllm_ds.export import export
from factorllm_ds.export_formats import ExportOptions
from factorllm_ds.modeling import all_experts_mode, load_moe
from factorllm_ds.sources import FolderSource

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(vocab: int = tiny.VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@torch.no_grad()
def _assert_matches_moe(hf_model, moe_dir: Path, ids: torch.Tensor, all_experts: bool = False) -> None:
    """``hf_model`` gives the FactorLLM model's logits: routed, or with all experts active at weight 1."""
    moe = load_moe(moe_dir)
    routed = moe(ids).logits
    all_experts_mode(moe)
    full = moe(ids).logits
    assert _rel(routed, full) > 100 * TOL, "routing does not move the logits: the comparison would prove nothing"
    assert _rel(hf_model(ids).logits, full if all_experts else routed) < TOL


def _keys(folder: Path) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names |= set(f.keys())
    return names


@pytest.fixture(scope="module")
def softmax_llama(tmp_path_factory, llama_dir) -> Path:
    return tiny.build_tiny_moe(tmp_path_factory.mktemp("sm") / "moe", llama_dir, routing="softmax")


def test_mixtral_export_loads_in_plain_transformers_and_matches(softmax_llama, tmp_path):
    from transformers import MixtralForCausalLM

    out = export(FolderSource(softmax_llama), tmp_path / "mixtral", "mixtral", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["intermediate_size"], config["num_local_experts"], config["num_experts_per_tok"]) == (32, 4, 2)
    assert config["rope_parameters"]["rope_theta"] == 10000.0  # the base's, not Mixtral's 1e6 default
    names = _keys(out)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names  # legacy per-expert names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any(".mlp." in n for n in names)
    assert (out / "tokenizer.json").is_file() and (out / "factorllm_manifest.json").is_file()

    model, info = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_matches_moe(model.eval(), softmax_llama, _ids())


def test_hard_routing_with_k1_is_exact_in_mixtral(tmp_path, llama_dir):
    from transformers import MixtralForCausalLM

    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir, top_k=1, router_bias=False, combine_scale=3.0)
    out = export(FolderSource(moe), tmp_path / "mx", "mixtral", progress=False)
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_matches_moe(model, moe, _ids(seed=1))


def _qwen3_dense(out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24)  # head_dim != 64/4
    Qwen3ForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE's size-0 shared expert
def test_other_families_export_to_their_moe_class(family, tmp_path, mistral_dir):
    from transformers import AutoModelForCausalLM

    if family == "qwen2":  # fp32 (the shared qwen2 fixture is bf16), tied embeddings, q/k/v biases
        dense, vocab = tiny.build_dense(tmp_path / "dense", "qwen2", dtype=torch.float32, tokenizer=False), tiny.VOCAB
    elif family == "qwen3":
        dense, vocab = _qwen3_dense(tmp_path / "dense"), 1000
    else:  # sliding window 16 < the 24-token probe, so the window is exercised
        dense, vocab = tiny.build_dense(tmp_path / "dense", "mistral", tokenizer=False, sliding_window=16), tiny.VOCAB
    moe = tiny.build_tiny_moe(tmp_path / "moe", dense, routing="softmax")
    out = export(FolderSource(moe), tmp_path / "hf", "mixtral", progress=False)
    config = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "mistral": "MixtralForCausalLM"}
    assert type(model).__name__ == expected[family]
    if family == "qwen2":
        # Qwen2-MoE always builds a shared expert; intermediate size 0 makes it add exactly zero.
        assert config["shared_expert_intermediate_size"] == 0 and config["norm_topk_prob"] is True
        assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []
        assert "model.layers.0.self_attn.q_proj.bias" in _keys(out)
        assert model.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (64, 0)
    if family == "qwen3":
        assert config["norm_topk_prob"] is True and model.model.layers[0].self_attn.head_dim == 24
    if family == "mistral":
        assert config["sliding_window"] == 16
    _assert_matches_moe(model, moe, _ids(vocab))


NATIVE_TOL = 1e-3  # relative max |delta logit|; the weights are bounded by --weight-tolerance (default 0.05)


def test_hard_routing_exports_to_mixtral_within_the_weight_tolerance(tmp_path, llama_dir):
    """Hard routing, k=2, s = E/k = 2: the router is scaled by a power of two so that Mixtral's renormalized
    softmax weights are all 1/k within the tolerance, and s*k is folded into w2."""
    from transformers import MixtralForCausalLM

    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir)  # the fitted router's bias is zero: dropped
    out = export(FolderSource(moe), tmp_path / "mx", "mixtral", progress=False)
    names = _keys(out)
    assert not any(n.endswith("gate.bias") or n.endswith("router.bias") for n in names)
    router = load_moe(moe).model.layers[0].mlp.router.weight
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        scaled = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    ratio = (scaled / router).flatten()
    a = ratio[0].item()  # one power of two for the whole layer: the router's ranking, unchanged
    assert torch.equal(ratio, torch.full_like(ratio, a)) and 0 < a < 1
    assert a == 2.0 ** round(torch.log2(ratio[0]).item())
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    moe_model = load_moe(moe)
    with torch.no_grad():
        routed = moe_model(_ids()).logits
        all_experts_mode(moe_model)
        assert _rel(routed, moe_model(_ids()).logits) > 100 * NATIVE_TOL  # routing matters
        assert _rel(model(_ids()).logits, routed) < NATIVE_TOL
    notes = json.loads((out / "factorllm_manifest.json").read_text())["notes"]
    assert any("hard routing written as softmax routing" in n and "0.05" in n for n in notes), notes


def test_a_tighter_weight_tolerance_scales_the_router_further(tmp_path, llama_dir):
    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir)
    scales = []
    for tol in (1e-2, 1e-5):
        out = export(FolderSource(moe), tmp_path / f"mx{tol}", "mixtral", progress=False,
                     options=ExportOptions(weight_tolerance=tol))
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            scales.append(f.get_tensor("model.layers.1.block_sparse_moe.gate.weight").abs().max().item())
    assert scales[1] < scales[0] / 256  # 1000x tighter: at least 2^8 further down


def test_experts_too_thin_for_grouped_matmul_are_exported_with_a_warning(tmp_path, llama_dir, capsys):
    # 128 neurons in 32 experts: 4 each, not the multiple of 8 that transformers' grouped matmul asks in bf16.
    from transformers import MixtralForCausalLM

    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir, num_experts=32, top_k=8, router_bias=False)
    out = export(FolderSource(moe), tmp_path / "mx", "mixtral", progress=False)
    notes = json.loads((out / "factorllm_manifest.json").read_text())["notes"]
    assert any("4 neurons" in n and "multiple of 8" in n for n in notes), notes
    assert "4 neurons" in capsys.readouterr().err
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # fp32: 16-byte rows, it runs
    with torch.no_grad():
        assert torch.isfinite(model(_ids(seed=2)).logits).all()
    wide = export(FolderSource(tiny.build_tiny_moe(tmp_path / "moe4", llama_dir, router_bias=False)),
                  tmp_path / "mx4", "mixtral", progress=False)
    assert not any("neurons;" in n for n in json.loads((wide / "factorllm_manifest.json").read_text())["notes"])


def test_a_router_bias_is_refused_for_mixtral_and_nothing_written(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir)  # hard, k=2: the paper's model
    tensors = load_file(str(moe / "model.safetensors"))
    tensors["model.layers.0.mlp.router.bias"] += 0.25  # as training leaves it
    save_file(tensors, str(moe / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        export(FolderSource(moe), tmp_path / "mixtral", "mixtral", progress=False)
    msg = str(err.value)
    assert "router has a bias" in msg and "--no-router-bias" in msg
    assert "--format factorllm" in msg and "--format dense" in msg
    assert not (tmp_path / "mixtral").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary folder left either


def test_dense_export_restores_the_original_and_equals_all_experts(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    # a random split, so the neuron order has to be undone
    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir, split="random", seed=3)
    out = export(FolderSource(moe), tmp_path / "dense", "dense", progress=False)
    original = tiny_state(llama_dir)
    exported = tiny_state(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    _assert_matches_moe(model, moe, _ids(seed=2), all_experts=True)


def tiny_state(folder: Path) -> dict[str, torch.Tensor]:
    from factorllm_ds.hf_io import CheckpointReader

    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


def test_factorllm_round_trip_is_identical(tmp_path, tiny_moe_dir):
    from transformers import AutoModelForCausalLM

    out = export(FolderSource(tiny_moe_dir), tmp_path / "again", "factorllm", max_shard_size="50KB", progress=False)
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    before, after = tiny_state(tiny_moe_dir), tiny_state(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    part = "factorllm_partition.safetensors"
    assert (out / part).read_bytes() == (tiny_moe_dir / part).read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_moe_dir / "config.json").read_text())
    for name in ("configuration_factorllm.py", "modeling_factorllm.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "factorllm_manifest.json").read_text())
    assert manifest["command"] == "export" and manifest["source_manifest"]["command"] == "convert"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__name__ == "FactorLLMForCausalLM"


def test_existing_out_refused_by_cli(tmp_path, tiny_moe_dir, capsys):
    from factorllm_ds.cli import main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export", "--model", str(tiny_moe_dir), "--out", str(out), "--format", "dense"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="already exists"):
        export(FolderSource(tiny_moe_dir), out, "dense", progress=False)
    # --overwrite replaces only a folder this tool wrote (docs/reliability.md): keep.txt is the user's.
    assert main(["export", "--model", str(tiny_moe_dir), "--out", str(out), "--format", "dense", "--overwrite"]) == 2
    assert "factorllm-ds did not write it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    assert main(["export", "--model", str(tiny_moe_dir), "--out", str(out), "--format", "dense", "--overwrite"]) == 0
    assert main(["export", "--model", str(tiny_moe_dir), "--out", str(out), "--format", "dense", "--overwrite"]) == 0
    assert (out / "config.json").is_file()


def test_export_needs_exactly_one_source(tmp_path, tiny_moe_dir):
    from factorllm_ds.export import ExportConfig, run_export

    with pytest.raises(UserError, match="exactly one source"):
        run_export(ExportConfig(out=tmp_path / "x"))
    with pytest.raises(UserError, match="--tag"):
        run_export(ExportConfig(out=tmp_path / "x", model=tiny_moe_dir, tag="global_step3"))
    assert not (tmp_path / "x").exists()


def test_dense_export_without_partition_file_is_the_same_function(tmp_path, tiny_moe_dir, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    moe = tmp_path / "moe"
    shutil.copytree(tiny_moe_dir, moe)
    (moe / "factorllm_partition.safetensors").unlink()
    out = export(FolderSource(moe), tmp_path / "dense", "dense", progress=False)
    assert "no factorllm_partition.safetensors" in capsys.readouterr().err
    assert any("expert order" in n for n in json.loads((out / "factorllm_manifest.json").read_text())["notes"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_matches_moe(model, moe, _ids(seed=4), all_experts=True)
