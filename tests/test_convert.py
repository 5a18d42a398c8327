"""convert: lossless for every split and family, the output layout, the CLI, and every bad input.

The first invariant (docs/method.md §1): with all experts active in hard mode at scale 1 the
MoE reproduces the dense logits. Each lossless check also runs a negative control (k < E),
which must miss the tolerance by orders of magnitude, so the check can fail.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from factorllm_ds import keys
from factorllm_ds.cli import main
from factorllm_ds.hf_io import INDEX_FILE, SINGLE_FILE, CheckpointReader, StreamingSafetensorsWriter
from factorllm_ds.layout import MANIFEST_FILE, PARTITION_FILE, load_partition
from factorllm_ds.modeling import all_experts_mode, load_dense, load_moe
from factorllm_ds.verify import VerifyConfig, verify

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("contiguous", "random", "kmeans", "coactivation")
E = 4
FP32_TOL = 1e-5  # max |Δ logits| / max |logits|, the fp32 bound
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


def split_settings(split: str, calib_text: Path) -> dict:
    settings = dict(split=split, num_experts=E, top_k=2)
    if split == "coactivation":
        # exact slices: the fitted router's default down-projection refit is tested in test_shared.py
        settings.update(calib_data=calib_text, calib_tokens=256, calib_seq_len=64, refit_down=0)
    return settings


def cli_args(split: str, calib_text: Path) -> list[str]:
    args = []
    for k, v in split_settings(split, calib_text).items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


@functools.lru_cache
def _text_ids(tokenizer_dir: Path) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    return tuple(AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"][:20])


def token_batch(dense_dir: Path) -> torch.Tensor:
    """Real text through the folder's tokenizer, plus a row of random ids: [2, 20]."""
    ids = torch.tensor(_text_ids(tiny.tokenizer_dir()))
    assert (dense_dir / "tokenizer.json").read_bytes() == (tiny.tokenizer_dir() / "tokenizer.json").read_bytes()
    rand = torch.randint(0, tiny.VOCAB, (len(ids),), generator=torch.Generator().manual_seed(1))
    return torch.stack([ids, rand])


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def leftovers(out: Path) -> list[str]:
    """Anything at ``out`` or a temporary sibling a conversion may have made for it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def tensor_names(folder: Path) -> dict[str, str]:
    """Every tensor in the folder's shards -> its dtype name, read from the files themselves."""
    names = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name == PARTITION_FILE:
            continue
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                assert name not in names, f"{name} in two shards"
                names[name] = f.get_slice(name).get_dtype()
    return names


# --------------------------------------------------------------------------- the lossless invariant


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_split_and_family_is_lossless(family, split, dense_model, calib_text, tmp_path):
    dense_dir = dense_model(family)
    moe_dir = tiny.convert_tiny(dense_dir, tmp_path / "moe", **split_settings(split, calib_text))
    spec = tiny.SPECS[family]
    inter, n_layers = spec["intermediate_size"], spec["num_hidden_layers"]
    size = inter // E

    # The partition: a permutation of the I neurons per layer; only `contiguous` is the identity.
    partition = load_partition(moe_dir)
    assert sorted(partition) == list(range(n_layers))
    for perm in partition.values():
        assert torch.equal(perm.sort().values, torch.arange(inter))
        assert torch.equal(perm, torch.arange(inter)) == (split == "contiguous")

    # Weights: every expert holds exactly (bit for bit) its neurons' dense rows / columns;
    # every tensor outside the MLP is copied unchanged.
    dense, moe = CheckpointReader(dense_dir), CheckpointReader(moe_dir)
    for name in dense.infos:
        role, layer = keys.classify_dense_key(name)
        if role != "mlp":
            assert torch.equal(moe.get(name), dense.get(name)), name
    for layer, perm in partition.items():
        gate, up, down = (dense.get(keys.dense_mlp_key(p, layer)) for p in ("gate", "up", "down"))
        for e in range(E):
            idx = perm[e * size:(e + 1) * size]
            assert torch.equal(moe.get(keys.expert_key("gate", layer, e)), gate[idx])
            assert torch.equal(moe.get(keys.expert_key("up", layer, e)), up[idx])
            assert torch.equal(moe.get(keys.expert_key("down", layer, e)), down[:, idx])

    # The library's own check, in fp32.
    result = verify(VerifyConfig(model=moe_dir, dense=dense_dir, batches=1, seq_len=32))
    assert result["ok"] and result["relative"] <= FP32_TOL, result

    # A direct comparison on real text, and the negative control: k=2 must miss the bound by far.
    ids = token_batch(dense_dir)
    moe_model, dense_model_ = load_moe(moe_dir, torch.float32), load_dense(dense_dir, torch.float32)
    all_experts_mode(moe_model)
    with torch.no_grad():
        want = dense_model_(ids).logits
        assert relative_diff(moe_model(ids).logits, want) <= FP32_TOL
        for block in moe_model.moe_blocks():
            block.top_k = 2
        assert relative_diff(moe_model(ids).logits, want) > 1000 * FP32_TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_within_the_dense_models_own_rounding_noise(family, dense_model, tmp_path):
    dense_dir = dense_model(family)
    moe_dir = tiny.convert_tiny(dense_dir, tmp_path / "moe", num_experts=E, top_k=2)
    result = verify(VerifyConfig(model=moe_dir, dense=dense_dir, dtype="bfloat16"))
    assert result["ok"], result
    # The bound comes from the dense model's bf16 noise (> 0), and stays tight enough to catch a wrong split.
    assert 0 < result["dense_bf16_noise"] and result["relative"] <= result["limit"] < 0.03, result

    ids = token_batch(dense_dir)
    moe_model = load_moe(moe_dir, torch.bfloat16)
    all_experts_mode(moe_model)
    with torch.no_grad():
        want = load_dense(dense_dir, torch.float32)(ids).logits
        assert relative_diff(moe_model(ids).logits, want) <= result["limit"]
        for block in moe_model.moe_blocks():
            block.top_k = 2
        assert relative_diff(moe_model(ids).logits, want) > 2 * result["limit"]


# --------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_output_layout_shards_dtype_tokenizer_manifest(family, dense_model, tmp_path, capsys):
    dense_dir = dense_model(family)
    out = tmp_path / "moe"
    assert main(["convert", "--model", str(dense_dir), "--out", str(out), "--num-experts", "4", "--top-k", "2",
                 "--max-shard-size", "50KB", "--seed", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert leftovers(out) == ["moe"]
    spec = tiny.SPECS[family]
    n_layers, inter = spec["num_hidden_layers"], spec["intermediate_size"]
    dtype_name = {torch.float32: "F32", torch.bfloat16: "BF16"}[spec["dtype"]]

    # Shards + index: the index names every tensor in exactly the shard that holds it.
    index = json.loads((out / INDEX_FILE).read_text())
    names = tensor_names(out)
    assert len(set(index["weight_map"].values())) > 3
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as f:
            held = set(f.keys())
        assert held == {n for n, s in index["weight_map"].items() if s == shard}
        data = sum(CheckpointReader(out).infos[n].nbytes for n in held)
        assert data <= 50_000 or len(held) == 1, (shard, data)
    dense_names = CheckpointReader(dense_dir).infos
    expected = {n for n in dense_names if keys.classify_dense_key(n)[0] != "mlp"}
    for layer in range(n_layers):
        expected |= {keys.ROUTER_WEIGHT.format(layer=layer), keys.ROUTER_BIAS.format(layer=layer)}
        expected |= {keys.expert_key(p, layer, e) for p in ("gate", "up", "down") for e in range(E)}
    assert set(names) == set(index["weight_map"]) == expected
    assert set(names.values()) == {dtype_name}  # dtype preserved, routers included
    assert ("lm_head.weight" in names) == (not spec["tie_word_embeddings"])
    reader = CheckpointReader(out)
    assert index["metadata"]["total_size"] == reader.total_bytes

    # Routers: normal(0, 0.02) weights and zero bias (the paper's initialisation).
    routers = torch.cat([reader.get(keys.ROUTER_WEIGHT.format(layer=i)).float().flatten() for i in range(n_layers)])
    assert routers.shape == (n_layers * E * tiny.HIDDEN,)
    assert 0.017 < routers.std().item() < 0.023 and abs(routers.mean().item()) < 0.004
    assert all(not reader.get(keys.ROUTER_BIAS.format(layer=i)).any() for i in range(n_layers))

    # Side files: tokenizer and generation config copied byte for byte; the model code shipped.
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (dense_dir / name).read_bytes(), name
    for name in ("configuration_factorllm.py", "modeling_factorllm.py"):
        assert (out / name).is_file()

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "factorllm" and config["architectures"] == ["FactorLLMForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["expert_intermediate_size"]) == (4, 2,
                                                                                                        inter // 4)
    assert config["routing"] == "hard" and config["router_bias"] is True
    assert config["text_config"]["model_type"] == family
    assert config["dtype"] == str(spec["dtype"]).removeprefix("torch.")
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["command"] == "convert" and manifest["partition_file"] == PARTITION_FILE
    assert manifest["settings"]["split"] == "contiguous" and manifest["settings"]["seed"] == 3
    assert manifest["bytes_read"] == CheckpointReader(dense_dir).total_bytes
    router_bytes = n_layers * (E * tiny.HIDDEN + E) * (4 if dtype_name == "F32" else 2)
    assert manifest["bytes_written"] == manifest["bytes_read"] + router_bytes == reader.total_bytes
    assert set(manifest["copied_files"]) >= {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}

    with safe_open(str(out / PARTITION_FILE), framework="pt") as f:
        assert f.metadata() == {"method": "contiguous", "num_experts": "4", "seed": "3", "num_shared": "0"}
        assert sorted(f.keys()) == [f"layers.{i}" for i in range(n_layers)]


def test_small_model_gets_a_single_file_and_no_index(llama_dir, tmp_path):
    out = tiny.convert_tiny(llama_dir, tmp_path / "moe", max_shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted([SINGLE_FILE, PARTITION_FILE])
    assert not (out / INDEX_FILE).exists()
    assert len(tensor_names(out)) == len(CheckpointReader(out).infos) > 0


@pytest.mark.parametrize("split", ["random", "kmeans"])
def test_same_seed_same_output_different_seed_different_partition(split, llama_dir, tmp_path):
    a = tiny.convert_tiny(llama_dir, tmp_path / "a", split=split, seed=7, max_shard_size="100KB")
    b = tiny.convert_tiny(llama_dir, tmp_path / "b", split=split, seed=7, max_shard_size="100KB")
    c = tiny.convert_tiny(llama_dir, tmp_path / "c", split=split, seed=8)
    pa, pb, pc = load_partition(a), load_partition(b), load_partition(c)
    assert all(torch.equal(pa[i], pb[i]) for i in pa)
    shards = sorted(p.name for p in a.glob("model*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("model*.safetensors"))
    for name in shards + [INDEX_FILE]:  # bit-identical weights, routers included
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # (the partition file's bytes are not compared: safetensors orders its metadata keys at random)
    # A different seed moves neurons: k-means groups are unordered, so compare the groups as sets.
    def groups(perm):
        return {frozenset(g.tolist()) for g in perm.view(E, -1)}

    differs = [groups(pa[i]) != groups(pc[i]) for i in pa]
    assert any(differs) if split == "kmeans" else all(differs)
    ra, rc = CheckpointReader(a), CheckpointReader(c)
    assert not torch.equal(ra.get(keys.ROUTER_WEIGHT.format(layer=0)), rc.get(keys.ROUTER_WEIGHT.format(layer=0)))


def test_overwrite_replaces_the_old_folder_entirely(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    base = ["convert", "--model", str(llama_dir), "--out", str(out)]
    assert main(base + ["--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    (out / "stale.txt").write_text("from the first run")
    capsys.readouterr()

    assert main(base + ["--split", "random", "--max-shard-size", "1GB"]) == 2  # refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "stale.txt").is_file()

    # A file the user put in is not convert's to delete (its manifest lists what it wrote): moved away first.
    assert main(base + ["--split", "random", "--max-shard-size", "1GB", "--overwrite"]) == 2
    assert "stale.txt" in capsys.readouterr().err
    (out / "stale.txt").unlink()
    assert main(base + ["--split", "random", "--max-shard-size", "1GB", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted([SINGLE_FILE, PARTITION_FILE])
    assert not (out / INDEX_FILE).exists()  # the first run's shards and index went with the folder
    assert json.loads((out / MANIFEST_FILE).read_text())["settings"]["split"] == "random"
    assert leftovers(out) == ["moe"]
    assert verify(VerifyConfig(model=out, dense=llama_dir, batches=1, seq_len=16))["ok"]


def test_file_to_file_copy_fallback_writes_the_same_bytes(llama_dir, tmp_path, monkeypatch):
    """Where os.copy_file_range is refused (e.g. across file systems), the pread/write loop takes over."""
    import errno

    from factorllm_ds import hf_io

    fast = tiny.convert_tiny(llama_dir, tmp_path / "fast", max_shard_size="100KB")
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(hf_io.os, "copy_file_range", refuse)
    slow = tiny.convert_tiny(llama_dir, tmp_path / "slow", max_shard_size="100KB")
    assert calls  # the fallback really ran
    shards = sorted(p.name for p in fast.glob("model*.safetensors"))
    assert shards == sorted(p.name for p in slow.glob("model*.safetensors"))
    for name in shards:
        assert (fast / name).read_bytes() == (slow / name).read_bytes(), name


def test_reader_reads_into_a_given_buffer(llama_dir):
    reader = CheckpointReader(llama_dir)
    name = keys.dense_mlp_key("up", 1)
    want = reader.get(name)
    buf = torch.full_like(want, 7.0)
    assert reader.get(name, out=buf) is buf and torch.equal(buf, want)
    assert want.abs().sum() > 0  # real weights, not an all-zero tensor that would match anything
    with pytest.raises(ValueError, match="out must be"):
        reader.get(name, out=torch.empty(3, 3))


# --------------------------------------------------------------------------- CLI


def test_cli_convert_then_verify(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["convert", "--model", str(llama_dir), "--out", str(out), "--split", "kmeans"]) == 0
    assert main(["verify", "--model", str(out), "--dense", str(llama_dir), "--batches", "1"]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
    assert report["ok"] and report["relative"] <= FP32_TOL and report["logit_scale"] > 0.1
    assert "verify: OK" in stdout


def test_cli_verify_fails_on_a_damaged_expert(llama_dir, tmp_path, capsys):
    out = tiny.convert_tiny(llama_dir, tmp_path / "moe", max_shard_size="100KB")
    name = keys.expert_key("down", 1, 2)
    shard = out / json.loads((out / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["verify", "--model", str(out), "--dense", str(llama_dir), "--batches", "1"]) == 1
    err = capsys.readouterr().err
    assert "verify: FAILED" in err


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "factorllm_ds", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_subprocess_convert_succeeds(llama_dir, tmp_path):
    out = tmp_path / "moe"
    proc = run_cli(["convert", "--model", str(llama_dir), "--out", str(out), "--num-experts", "2", "--top-k", "1"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2
    assert leftovers(out) == ["moe"]


def test_subprocess_refuses_gpt2_with_one_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    out = tmp_path / "moe"
    proc = run_cli(["convert", "--model", str(gpt2), "--out", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in ("--model", "GPT2LMHeadModel", "'gpt2'", "LLaMA, Mistral, Qwen2"):
        assert needle in proc.stderr
    assert leftovers(out) == []


# --------------------------------------------------------------------------- bad input


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _shards(model: Path) -> list[Path]:
    return sorted(model.glob("model-*-of-*.safetensors"))


def bad_missing_folder(tmp_path, **_):
    return tmp_path / "no-such-model", [], ["--model", "no-such-model", "no such folder"]


def bad_model_is_a_file(tmp_path, llama_dir, **_):
    return llama_dir / "config.json", [], ["--model", "config.json", "no such folder"]


def bad_no_config(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    (model / "config.json").unlink()
    return model, [], ["--model", "no config.json"]


def bad_broken_config(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    (model / "config.json").write_text('{"model_type": "llama", ')
    return model, [], ["config.json", "JSON"]


def bad_garbage_shard(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    shard = _shards(model)[1]
    shard.write_bytes(b"\x00" * 4 + b"this is not a safetensors file" * 10)
    return model, [], [shard.name, "unreadable safetensors"]


def bad_missing_shard(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    shard = _shards(model)[2]
    shard.unlink()
    return model, [], [shard.name, INDEX_FILE, "missing"]


def bad_truncated_shard(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    shard = _shards(model)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    return model, [], [shard.name, "truncated"]


def bad_truncated_in_header(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    shard = _shards(model)[0]
    shard.write_bytes(shard.read_bytes()[:40])
    return model, [], [shard.name, "truncated or corrupt"]


def bad_index_names_absent_tensor(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = _shards(model)[0].name
    (model / INDEX_FILE).write_text(json.dumps(index))
    return model, [], ["model.layers.0.mlp.extra.weight", "incomplete"]


def bad_only_bin_weights(tmp_path, llama_dir, **_):
    model = _copy(llama_dir, tmp_path)
    for shard in _shards(model):
        shard.unlink()
    (model / INDEX_FILE).unlink()
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    return model, [], [".bin", "safetensors", "save_pretrained"]


def bad_gpt2(tmp_path, **_):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(model)
    return model, [], ["unsupported architecture GPT2LMHeadModel", "LLaMA, Mistral, Qwen2"]


def bad_mlp_bias(tmp_path, **_):
    # A LLaMA variant with MLP biases: the converter must refuse rather than drop them.
    model = tiny.build_dense(tmp_path / "biased", "llama", tokenizer=False, mlp_bias=True, intermediate_size=64)
    return model, [], ["--model", "mlp.", "_proj.bias", "does not know"]


def bad_already_moe(tmp_path, tiny_moe_dir, **_):
    return tiny_moe_dir, [], ["already a FactorLLM checkpoint"]


def bad_num_experts(tmp_path, llama_dir, **_):
    return llama_dir, ["--num-experts", "3"], ["--num-experts 3", "does not divide", "128"]


def bad_num_experts_zero(tmp_path, llama_dir, **_):
    return llama_dir, ["--num-experts", "0"], ["--num-experts 0", ">= 1"]


def bad_top_k_zero(tmp_path, llama_dir, **_):
    return llama_dir, ["--num-experts", "4", "--top-k", "0"], ["--top-k 0", "between 1 and --num-experts (4)"]


def bad_top_k_above_e(tmp_path, llama_dir, **_):
    return llama_dir, ["--num-experts", "4", "--top-k", "5"], ["--top-k 5", "between 1 and --num-experts (4)"]


def bad_several_at_once(tmp_path, llama_dir, **_):
    return llama_dir, ["--num-experts", "3", "--top-k", "9", "--max-shard-size", "lots"], [
        "--num-experts 3", "--top-k 9", "--max-shard-size 'lots'"]


def bad_coactivation_without_data(tmp_path, llama_dir, **_):
    return llama_dir, ["--split", "coactivation"], ["--split coactivation", "--calib-data"]


def bad_router_init_prior_without_data(tmp_path, llama_dir, **_):
    return llama_dir, ["--router-init", "prior"], ["--router-init prior", "--calib-data"]


def bad_calib_file_missing(tmp_path, llama_dir, **_):
    return llama_dir, ["--split", "coactivation", "--calib-data", str(tmp_path / "nope.txt")], [
        "--calib-data", "nope.txt", "no such file"]


def bad_calib_too_short(tmp_path, llama_dir, **_):
    text = tmp_path / "short.txt"
    text.write_text("Far too short a text to calibrate anything.")
    return llama_dir, ["--split", "coactivation", "--calib-data", str(text), "--calib-tokens", "256"], [
        "--calib-data", "short.txt", "fewer than --calib-tokens 256"]


def bad_calib_second_file_too_short(tmp_path, llama_dir, calib_text, **_):
    text = tmp_path / "short.txt"
    text.write_text("Far too short a text to calibrate anything.")
    return llama_dir, ["--split", "coactivation", "--calib-data", str(calib_text), str(text), "--calib-tokens", "256",
                       "--calib-seq-len", "64"], ["--calib-data", "short.txt", "its share of --calib-tokens 256",
                                                  "2 sequences of 64 tokens"]


def bad_calib_more_files_than_sequences(tmp_path, llama_dir, calib_text, **_):
    other = tmp_path / "other.txt"
    other.write_text(calib_text.read_text())
    return llama_dir, ["--split", "coactivation", "--calib-data", str(calib_text), str(other), "--calib-tokens", "64",
                       "--calib-seq-len", "64"], ["--calib-tokens 64", "than the 2 --calib-data files"]


def bad_calib_same_file_twice(tmp_path, llama_dir, calib_text, **_):
    return llama_dir, ["--split", "coactivation", "--calib-data", str(calib_text), str(calib_text)], [
        "--calib-data names one file twice"]


def bad_calib_jsonl_without_text(tmp_path, llama_dir, **_):
    text = tmp_path / "calib.jsonl"
    text.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    return llama_dir, ["--split", "coactivation", "--calib-data", str(text)], ["calib.jsonl", "line 2", "'text'"]


BAD_INPUTS = [f for name, f in sorted(globals().items()) if name.startswith("bad_")]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__[4:])
def test_bad_input_one_clear_error_nothing_written(make_bad, tmp_path, llama_dir, tiny_moe_dir, calib_text, capsys):
    model, extra, needles = make_bad(tmp_path=tmp_path, llama_dir=llama_dir, tiny_moe_dir=tiny_moe_dir,
                                     calib_text=calib_text)
    out = tmp_path / "out" / "moe"
    rc = main(["convert", "--model", str(model), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("factorllm-ds convert: error:")]) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists() or leftovers(out) == []


def test_out_exists_is_refused_and_left_untouched(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--model", str(llama_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert leftovers(out) == ["moe"]


def test_out_equal_to_model_is_refused_even_with_overwrite(llama_dir, tmp_path, capsys):
    model = _copy(llama_dir, tmp_path)
    before = sorted(p.name for p in model.iterdir())
    assert main(["convert", "--model", str(model), "--out", str(model), "--overwrite"]) == 2
    assert "--out must differ from --model" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before


def test_bad_flag_value_is_an_argparse_error(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--model", str(llama_dir), "--out", str(out), "--split", "spectral"])
    assert exc.value.code == 2
    assert "--split" in capsys.readouterr().err
    assert leftovers(out) == []


# --------------------------------------------------------------------------- router initialisation


def test_router_init_prior_predicts_the_prior(llama_dir, calib_text, tmp_path):
    shape = dict(num_experts=E, top_k=2, combine_scale=1.0, prior_target="subset")
    fitted = tiny.convert_tiny(llama_dir, tmp_path / "fitted", router_init="prior", router_fit="picks",
                               calib_data=calib_text, calib_tokens=512, calib_seq_len=128, refit_down=0, **shape)
    normal = tiny.convert_tiny(llama_dir, tmp_path / "normal", **shape)
    assert json.loads((fitted / "config.json").read_text())["prior_target"] == "subset"
    manifest = json.loads((fitted / MANIFEST_FILE).read_text())
    assert manifest["settings"]["router_init"] == "prior"
    got, chance = tiny.oracle_agreement(fitted, calib_text), tiny.oracle_agreement(normal, calib_text)
    assert got > 0.65 and got > chance + 0.15, (got, chance)  # measured 0.71 vs 0.51 (chance: 0.5)
    # Still lossless with --refit-down 0: only the router changed.
    model = load_moe(fitted)
    all_experts_mode(model)
    dense = load_dense(llama_dir)
    batch = token_batch(llama_dir)
    with torch.no_grad():
        assert relative_diff(model(batch).logits, dense(batch).logits) <= FP32_TOL


@pytest.mark.parametrize("fit", ["gate", "gate-w"])
def test_gate_routers_are_each_experts_mean_gate_row(llama_dir, calib_text, tmp_path, fit):
    """The data-free router (the default fit): row e is the mean (gate-w: weighted mean) of expert e's gate rows."""
    shape = dict(num_experts=E, top_k=2, combine_scale=1.0, prior_target="subset")
    out = tiny.convert_tiny(llama_dir, tmp_path / fit, router_fit=fit, calib_data=calib_text, calib_tokens=512,
                            calib_seq_len=128, refit_down=0, **shape)
    assert json.loads((out / MANIFEST_FILE).read_text())["settings"]["router_fit"] == fit
    dense, moe = CheckpointReader(llama_dir), CheckpointReader(out)
    size = tiny.SPECS["llama"]["intermediate_size"] // E
    for layer, perm in load_partition(out).items():
        gate_EnH = dense.get(keys.dense_mlp_key("gate", layer)).float()[perm.long()].view(E, size, -1)
        router = moe.get(keys.ROUTER_WEIGHT.format(layer=layer)).float()
        mean_EH = gate_EnH.mean(dim=1)
        cos = torch.nn.functional.cosine_similarity(router, mean_EH, dim=-1)
        if fit == "gate":  # exactly the mean, up to the checkpoint dtype's rounding
            assert torch.allclose(router, mean_EH.to(router.dtype).float(), rtol=1e-2, atol=1e-3)
        else:  # a weighted mean: close to the mean's direction, not equal to it
            assert bool((cos > 0.5).all()) and not torch.allclose(router, mean_EH, rtol=1e-2, atol=1e-3)
        assert torch.count_nonzero(moe.get(keys.ROUTER_BIAS.format(layer=layer))) == 0


def test_refit_down_without_a_shared_expert(llama_dir, calib_text, tmp_path):
    """The paper's structure with a fitted router is refitted by default too: only the down projections move."""
    shape = dict(num_experts=E, top_k=2, combine_scale=1.0, prior_target="subset")
    refit = tiny.convert_tiny(llama_dir, tmp_path / "refit", calib_data=calib_text, calib_tokens=512,
                              calib_seq_len=128, **shape)
    assert json.loads((refit / MANIFEST_FILE).read_text())["settings"]["refit_down"] > 0
    dense, moe = CheckpointReader(llama_dir), CheckpointReader(refit)
    size = tiny.SPECS["llama"]["intermediate_size"] // E
    moved = 0
    for layer, perm in load_partition(refit).items():
        gate, down = dense.get(keys.dense_mlp_key("gate", layer)), dense.get(keys.dense_mlp_key("down", layer))
        for e in range(E):
            idx = perm[e * size:(e + 1) * size]
            assert torch.equal(moe.get(keys.expert_key("gate", layer, e)), gate[idx])
            moved += not torch.equal(moe.get(keys.expert_key("down", layer, e)), down[:, idx])
    assert moved == E * len(load_partition(refit))
    with torch.no_grad():
        assert torch.isfinite(load_moe(refit)(token_batch(llama_dir)).logits).all()


# --------------------------------------------------------------------------- interruption


def fail_after(monkeypatch, n: int, exc: BaseException) -> tuple[list[str], dict]:
    """Make the writer raise ``exc`` instead of writing its n+1-th tensor (file-to-file copies
    are not counted). Returns the names written before, and what the output folder of the
    writer held at that moment (``state["files"]``, ``state["folder"]``)."""
    written: list[str] = []
    state: dict = {}
    real_write = StreamingSafetensorsWriter.write

    def write(self, name, tensor):
        if len(written) == n:
            state.update(folder=self.out_dir, files=sorted(p.name for p in self.out_dir.iterdir()))
            raise exc
        real_write(self, name, tensor)
        written.append(name)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", write)
    return written, state


def test_ctrl_c_mid_conversion_leaves_nothing(llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "moe"
    written, state = fail_after(monkeypatch, 12, KeyboardInterrupt())
    assert main(["convert", "--model", str(llama_dir), "--out", str(out), "--max-shard-size", "100KB"]) == 130
    assert len(written) == 12 and any(".mlp.experts." in n for n in written)  # it died mid-way
    # Meanwhile the output was being written under a temporary sibling name, not at --out.
    assert state["folder"].parent == out.parent and state["folder"].name.startswith(".moe.tmp-")
    assert any(f.startswith("model-00001-of-") for f in state["files"])
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(out) == []


def test_crash_mid_conversion_leaves_nothing(mistral_dir, tmp_path, monkeypatch):
    fail_after(monkeypatch, 30, RuntimeError("disk on fire"))  # of 3 x (2 router + 12 expert) tensors
    out = tmp_path / "moe"
    with pytest.raises(RuntimeError, match="disk on fire"):
        tiny.convert_tiny(mistral_dir, out, split="random")
    assert leftovers(out) == []


def test_crash_after_the_weights_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    from factorllm_ds import convert as convert_mod

    def broken_copy(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(convert_mod, "copy_side_files", broken_copy)
    out = tmp_path / "moe"
    with pytest.raises(OSError, match="no space"):
        tiny.convert_tiny(llama_dir, out)
    assert leftovers(out) == []


def test_crash_during_overwrite_keeps_the_old_output(llama_dir, tmp_path, monkeypatch):
    out = tiny.convert_tiny(llama_dir, tmp_path / "moe")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_after(monkeypatch, 20, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tiny.convert_tiny(llama_dir, out, split="random", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == ["moe"]


def test_mixed_calibration_takes_an_equal_share_of_each_file(llama_dir, calib_text, tmp_path):
    """Several --calib-data files: an equal share of the sequences from the start of each, interleaved; one file
    gives its first tokens as before. A two-file conversion records both and differs from either alone."""
    from types import SimpleNamespace

    from factorllm_ds.calibration import calibration_ids
    from factorllm_ds.hf_io import load_tokenizer, read_config

    words = calib_text.read_text().split()
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(words)))  # the same words in another order: other token ids
    config = read_config(llama_dir)
    tok = load_tokenizer(llama_dir, model_config=config)
    first = {p: tok(p.read_text(), add_special_tokens=False)["input_ids"] for p in (calib_text, other)}
    cfg = SimpleNamespace(model=llama_dir, calib_data=[calib_text, other], calib_tokens=5 * 16 + 7, calib_seq_len=16)
    ids = calibration_ids(tok, config, cfg)
    assert ids.shape == (5, 16)  # whole sequences; the first file takes the odd one
    want = [first[calib_text][:16], first[other][:16], first[calib_text][16:32], first[other][16:32],
            first[calib_text][32:48]]
    assert ids.tolist() == want
    cfg.calib_data = calib_text  # one path (the Python API): its first tokens
    assert calibration_ids(tok, config, cfg).view(-1).tolist() == first[calib_text][:80]

    settings = dict(num_experts=E, top_k=2, shared_neurons="0.25", split="coactivation", calib_tokens=512,
                    calib_seq_len=128)
    mixed = tiny.convert_tiny(llama_dir, tmp_path / "mixed", calib_data=[calib_text, other], **settings)
    alone = tiny.convert_tiny(llama_dir, tmp_path / "alone", calib_data=calib_text, **settings)
    recorded = json.loads((mixed / MANIFEST_FILE).read_text())["settings"]["calib_data"]
    assert recorded == [str(calib_text), str(other)]
    name = keys.expert_key("down", 0, 0)
    assert not torch.equal(CheckpointReader(mixed).get(name), CheckpointReader(alone).get(name))
