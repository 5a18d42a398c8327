"""Shared (always-on) experts: convert, the HF model, the fitted router, exports and bad input.

Tiny random models in fp32; every numerical claim is asserted with a stated tolerance and each
parity test first checks that routing moves the logits, so a wrong expert order or weight could
not hide under the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from factorllm_ds import keys
from factorllm_ds.cli import main
from factorllm_ds.export import export
from factorllm_ds.hf_io import CheckpointReader
from factorllm_ds.layout import load_partition
from factorllm_ds.modeling import all_experts_mode, load_dense, load_moe
from factorllm_ds.sources import FolderSource
from factorllm_ds.verify import VerifyConfig, verify

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_TOL = 1e-5
E, K = tiny.SHARED_E, tiny.SHARED_K


def _dense(family: str, tmp_path: Path) -> Path:
    if family == "qwen3":
        return tiny.build_qwen3_dense(tmp_path / "dense")
    return tiny.build_dense(tmp_path / "dense", family, dtype=torch.float32)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_shared_plus_routed_is_lossless(family, calib_text, tmp_path):
    dense = _dense(family, tmp_path)
    moe = tiny.convert_shared(dense, tmp_path / "moe", calib_text, refit_down=0)  # exact slices (the default refits)
    config = json.loads((moe / "config.json").read_text())
    inter = json.loads((dense / "config.json").read_text())["intermediate_size"]
    shared = round(0.25 * inter)
    assert (config["shared_intermediate_size"], config["expert_intermediate_size"]) == (shared, (inter - shared) // E)
    assert config["combine_scale"] == 1.0 and config["prior_target"] == "subset"

    # Every weight is an exact slice of the dense FFN: shared = perm[:S], routed e = the next groups.
    dense_r, moe_r = CheckpointReader(dense), CheckpointReader(moe)
    size = (inter - shared) // E
    for layer, perm in load_partition(moe).items():
        assert torch.equal(perm.sort().values, torch.arange(inter))
        gate, up, down = (dense_r.get(keys.dense_mlp_key(p, layer)) for p in ("gate", "up", "down"))
        idx = perm[:shared]
        assert torch.equal(moe_r.get(keys.shared_expert_key("gate", layer)), gate[idx])
        assert torch.equal(moe_r.get(keys.shared_expert_key("down", layer)), down[:, idx])
        for e in range(E):
            idx = perm[shared + e * size: shared + (e + 1) * size]
            assert torch.equal(moe_r.get(keys.expert_key("up", layer, e)), up[idx])

    # All experts on = the dense model (fp32, <= 1e-5 of the logit scale); k of E routed = visibly not.
    result = verify(VerifyConfig(model=moe, dense=dense, batches=1, seq_len=32))
    assert result["ok"] and result["relative"] <= FP32_TOL, result
    model, want = load_moe(moe), load_dense(dense)(_ids()).logits.detach()
    with torch.no_grad():
        assert _rel(model(_ids()).logits, want) > 100 * FP32_TOL


def test_shared_neurons_are_the_most_important_on_the_calibration_text(llama_dir, calib_text, tmp_path):
    """Recompute layer 0's importance (its input does not depend on the conversion) and compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factorllm_ds.data import read_text
    from factorllm_ds.structure import neuron_importance

    moe = tiny.convert_shared(llama_dir, tmp_path / "moe", calib_text)
    dense = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(llama_dir)(read_text([calib_text], "--calib-data"),
                                                   add_special_tokens=False)["input_ids"][:512]
    captured = {}
    mlp = dense.model.layers[0].mlp
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("a", args[0]))
    with torch.no_grad():
        dense(torch.tensor(ids).view(4, 128))
    hook.remove()
    importance = neuron_importance(captured["a"].reshape(-1, 128), mlp.down_proj.weight, "contribution")
    shared = set(load_partition(moe)[0][:32].tolist())
    assert shared == set(torch.topk(importance, 32).indices.tolist())


def test_router_fitted_at_conversion_agrees_with_the_oracle(llama_dir, calib_text, tmp_path):
    # the router fitted to the oracle's picks (the default gate router reads no data: tests/test_convert.py)
    fitted = tiny.convert_shared(llama_dir, tmp_path / "fitted", calib_text, refit_down=0, router_fit="picks")
    normal = tiny.convert_shared(llama_dir, tmp_path / "normal", calib_text, router_init="normal")
    manifest = json.loads((fitted / "factorllm_manifest.json").read_text())
    assert manifest["settings"]["router_init"] == "prior"
    got = tiny.oracle_agreement(fitted, calib_text, tail=True)
    chance = tiny.oracle_agreement(normal, calib_text, tail=True)
    assert got > chance + 0.1, (got, chance)


def test_oracle_in_token_blocks_converts_the_same(llama_dir, calib_text, tmp_path, monkeypatch):
    """The oracle picks a block of tokens at a time (bounded memory at 13B-70B); blocks of 7 tokens give
    the same routers and refitted experts as one block of all 512."""
    from factorllm_ds import convert as convert_module

    # router fits that read the oracle: its picks, and each expert's gain (a [T, E] target built block by block)
    for fit in ("picks", "gain"):
        whole = tiny.convert_shared(llama_dir, tmp_path / f"whole-{fit}", calib_text, router_fit=fit)
        hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
        monkeypatch.setattr(convert_module, "ORACLE_BLOCK_BYTES", 7 * 4 * E * hidden)
        blocks = tiny.convert_shared(llama_dir, tmp_path / f"blocks-{fit}", calib_text, router_fit=fit)
        monkeypatch.undo()
        _assert_same_checkpoint(whole, blocks)


def _assert_same_checkpoint(whole: Path, blocks: Path) -> None:
    want, got = CheckpointReader(whole), CheckpointReader(blocks)
    assert sorted(got.infos) == sorted(want.infos)
    for name in want.infos:
        assert torch.allclose(got.get(name).float(), want.get(name).float(), rtol=0, atol=1e-6), name


def _logit_error(model, dense, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids).logits - dense(ids).logits).pow(2).mean().item()


def test_refit_down_brings_the_routed_model_closer_to_dense(llama_dir, calib_text, tmp_path, capsys):
    """--refit-down (the default with a fitted router) changes only the down projections, and the routed model
    with its own router is closer to the dense one on the calibration text than the exact slices are."""
    from transformers import AutoTokenizer

    from factorllm_ds.config import REFIT_DOWN_RIDGE
    from factorllm_ds.data import read_text

    exact = tiny.convert_shared(llama_dir, tmp_path / "exact", calib_text, refit_down=0)
    refit = tiny.convert_shared(llama_dir, tmp_path / "refit", calib_text)
    settings = json.loads((refit / "factorllm_manifest.json").read_text())["settings"]
    assert settings["refit_down"] == REFIT_DOWN_RIDGE > 0

    dense_r, refit_r = CheckpointReader(llama_dir), CheckpointReader(refit)
    inter = json.loads((llama_dir / "config.json").read_text())["intermediate_size"]
    shared, size, changed = round(0.25 * inter), (inter - round(0.25 * inter)) // E, 0
    for layer, perm in load_partition(refit).items():
        gate, up, down = (dense_r.get(keys.dense_mlp_key(p, layer)) for p in ("gate", "up", "down"))
        assert torch.equal(refit_r.get(keys.shared_expert_key("gate", layer)), gate[perm[:shared]])
        changed += not torch.equal(refit_r.get(keys.shared_expert_key("down", layer)), down[:, perm[:shared]])
        for e in range(E):
            idx = perm[shared + e * size: shared + (e + 1) * size]
            assert torch.equal(refit_r.get(keys.expert_key("gate", layer, e)), gate[idx])
            assert torch.equal(refit_r.get(keys.expert_key("up", layer, e)), up[idx])
    assert changed == len(load_partition(refit))

    dense = load_dense(llama_dir)
    ids = AutoTokenizer.from_pretrained(llama_dir)(read_text([calib_text], "--calib-data"),
                                                   add_special_tokens=False)["input_ids"][:512]
    calib_ids = torch.tensor(ids).view(4, 128)
    err_exact, err_refit = _logit_error(load_moe(exact), dense, calib_ids), _logit_error(load_moe(refit), dense,
                                                                                          calib_ids)
    assert err_refit < 0.95 * err_exact, (err_refit, err_exact)  # measured 0.87x (a random tiny model)

    # verify refuses it (every expert on is not the dense model by design) and says how to check a split
    rc = main(["verify", "--model", str(refit), "--dense", str(llama_dir), "--batches", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--refit-down 0" in err and "Traceback" not in err, err
    # the dense export folds the refitted experts: it equals the MoE with every expert on
    dense_out = export(FolderSource(refit), tmp_path / "dense", "dense", progress=False)
    model = load_moe(refit)
    all_experts_mode(model)
    with torch.no_grad():
        assert _rel(load_dense(dense_out)(_ids()).logits, model(_ids()).logits) <= FP32_TOL


def test_refit_down_needs_the_fitted_router(llama_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["convert", "--model", str(llama_dir), "--out", str(out), "--calib-data", str(calib_text),
               "--router-init", "normal", "--refit-down", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--refit-down 2" in err and "--router-init prior" in err, err
    rc = main(["convert", "--model", str(llama_dir), "--out", str(out), "--calib-data", str(calib_text),
               "--refit-down", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--refit-down -1" in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def shared_softmax(tmp_path_factory, llama_dir, calib_text) -> Path:
    return tiny.convert_shared(llama_dir, tmp_path_factory.mktemp("shared") / "moe", calib_text, routing="softmax")


def test_qwen2_moe_export_holds_the_shared_expert_exactly(shared_softmax, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(FolderSource(shared_softmax), tmp_path / "hf", "qwen2-moe", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert hf.config.shared_expert_intermediate_size == 32
    moe = load_moe(shared_softmax)
    with torch.no_grad():
        routed, mine = hf(_ids()).logits, moe(_ids()).logits
        all_experts_mode(moe)
        assert _rel(mine, moe(_ids()).logits) > 100 * FP32_TOL  # routing matters here
    assert _rel(routed, mine) < FP32_TOL


def test_mixtral_refuses_a_shared_expert_and_names_qwen2_moe(shared_softmax, tmp_path, capsys):
    rc = main(["export", "--model", str(shared_softmax), "--out", str(tmp_path / "hf"), "--format", "mixtral"])
    err = capsys.readouterr().err
    assert rc == 2 and "shared expert" in err and "--format qwen2-moe" in err, err
    assert not (tmp_path / "hf").exists()


NATIVE_TOL = 1e-3  # the bound for a native export of hard routing (fp32, relative max |delta logit|)

BLOCKED_LOAD = tiny.hiding("factorllm_ds") + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=False).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": model(ids).logits, "cls": type(model).__name__}, sys.argv[3])
"""


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_recommended_structure_exports_natively_to_qwen2_moe(family, calib_text, tmp_path):
    """Shared expert + hard weight-1 routing (the recommended structure) as Qwen2MoeForCausalLM: loaded with
    factorllm_ds blocked and no remote code, its logits are the FactorLLM model's within 1e-3."""
    import subprocess
    import sys

    moe = tiny.convert_shared(_dense(family, tmp_path), tmp_path / "moe", calib_text)
    config = json.loads((moe / "config.json").read_text())  # a shared expert: no router bias by default
    assert config["router_bias"] is False and keys.ROUTER_BIAS.format(layer=0) not in CheckpointReader(moe).names()
    out = export(FolderSource(moe), tmp_path / "hf", "qwen2-moe", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["norm_topk_prob"] is True and config["tie_word_embeddings"] is False  # s k folded; head written
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and "auto_map" not in config
    assert not any(p.suffix == ".py" for p in out.iterdir())
    reader = CheckpointReader(out)
    if json.loads((tmp_path / "dense" / "config.json").read_text()).get("tie_word_embeddings"):
        assert torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight"))  # written out
    assert "lm_head.weight" in reader.names()
    gate = reader.get("model.layers.0.mlp.shared_expert_gate.weight")
    assert bool((gate != 0).all()) and gate.abs().max() < 1e-6  # llama.cpp: sigmoid(y) = silu(y)/y, NaN at 0
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                   check=True)
    got = torch.load(tmp_path / "o.pt")
    assert got["cls"] == "Qwen2MoeForCausalLM"
    model = load_moe(moe)
    with torch.no_grad():
        mine = model(ids).logits
        all_experts_mode(model)
        assert _rel(mine, model(ids).logits) > 10 * NATIVE_TOL  # routing matters here
    assert _rel(got["logits"], mine) < NATIVE_TOL
    # eval and the other commands check a native export's config against its weights as they do ours
    from factorllm_ds.errors import UserError
    from factorllm_ds.hf_io import check_model_folder

    check_model_folder(out)
    (out / "config.json").write_text(json.dumps(config | {"moe_intermediate_size": 7}))
    with pytest.raises(UserError, match="moe_intermediate_size 7"):
        check_model_folder(out)


def test_dense_and_factorllm_exports_of_a_shared_model(llama_dir, calib_text, tmp_path):
    moe = tiny.convert_shared(llama_dir, tmp_path / "moe", calib_text, refit_down=0)
    dense_out = export(FolderSource(moe), tmp_path / "dense", "dense", progress=False)
    src, back = CheckpointReader(llama_dir), CheckpointReader(dense_out)
    for name in src.infos:  # the original checkpoint, bit for bit
        assert torch.equal(src.get(name), back.get(name)), name
    again = export(FolderSource(moe), tmp_path / "again", "factorllm", progress=False)
    with torch.no_grad():
        assert torch.equal(load_moe(again)(_ids()).logits, load_moe(moe)(_ids()).logits)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, needles", [
    (["--shared-neurons", "128"], ["--shared-neurons 128", "must be in [0, 128)"]),
    (["--shared-neurons", "-3"], ["--shared-neurons -3"]),
    (["--shared-neurons", "1.5"], ["--shared-neurons 1.5", "[0, 1)"]),
    (["--shared-neurons", "124", "--num-experts", "6"], ["leaves 4 routed neurons for 6 experts"]),
    (["--shared-neurons", "30", "--num-experts", "4"], ["--num-experts 4 does not divide the 98 routed neurons",
                                                        "valid E: 2, 7, 14, 49, 98"]),
], ids=["all", "negative", "fraction-above-1", "too-few-routed", "not-divisible"])
def test_bad_shared_flags_one_clear_error_nothing_written(extra, needles, llama_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["convert", "--model", str(llama_dir), "--out", str(out), "--calib-data", str(calib_text), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_shared_without_calibration_text_is_refused(llama_dir, tmp_path, capsys):
    rc = main(["convert", "--model", str(llama_dir), "--out", str(tmp_path / "out"), "--shared-neurons", "0.25",
               "--num-experts", "6"])
    err = capsys.readouterr().err
    assert rc == 2 and "--shared-neurons" in err and "--calib-data" in err, err
