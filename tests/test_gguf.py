"""export --format gguf: the recommended structure (shared expert + hard routing) as a GGUF that llama.cpp
runs, checked in llama.cpp itself (llama-cpp-python, the test extra) against the FactorLLM model.

Tiny random models in fp32 (GGUF f32, KV cache f32). The converter is llama.cpp's own, from the pinned
llama-cpp-python sdist (a cached asset: fetched once from the package registry).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from factorllm_ds.cli import main
from factorllm_ds.modeling import all_experts_mode, load_moe

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the test extra) is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

E, K = tiny.SHARED_E, tiny.SHARED_K
GGML_F32 = 0  # ggml_type of an f32 KV cache (llama.cpp's default f16 would dominate the comparison)
TOL = 1e-3  # relative max |delta logit| against the FactorLLM model (the native-export bound)


def _convert(family: str, tmp_path: Path, calib_text: Path, **kw) -> Path:
    dense = tiny.build_dense(tmp_path / "dense", family, dtype=torch.float32)
    return tiny.convert_shared(dense, tmp_path / "moe", calib_text, **kw)


def llama_cpp_logits(gguf: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(64, len(ids)), logits_all=True, verbose=False,
                          n_threads=1, type_k=GGML_F32, type_v=GGML_F32)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_runs_in_llama_cpp_as_the_factorllm_model(family, calib_text, tmp_path, capsys):
    moe = _convert(family, tmp_path, calib_text)
    out = tmp_path / "gguf"
    rc = main(["export", "--model", str(moe), "--out", str(out), "--format", "gguf", "--gguf-type", "f32"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["factorllm_manifest.json", "model.gguf"]  # no Qwen2-MoE folder
    manifest = json.loads((out / "factorllm_manifest.json").read_text())
    assert "model.gguf" in manifest["files"] and any("convert_hf_to_gguf" in n for n in manifest["notes"])

    from gguf import GGUFReader  # what llama.cpp will read: its architecture and expert counts
    fields = GGUFReader(str(out / "model.gguf")).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "qwen2moe"
    assert int(fields["qwen2moe.expert_count"].parts[-1][0]) == E
    assert int(fields["qwen2moe.expert_used_count"].parts[-1][0]) == K

    ids = torch.randint(3, tiny.VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    got = llama_cpp_logits(out / "model.gguf", ids[0].tolist())
    model = load_moe(moe)
    with torch.no_grad():
        want = model(ids).logits[0]
        all_experts_mode(model)
        dense_like = model(ids).logits[0]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(dense_like, want) > 10 * TOL  # routing moves the logits: a wrong routing could not pass
    assert rel(got, want) < TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("kw, needle", [
    (dict(routing="softmax"), "--routing hard"),
    (dict(shared_neurons=None, num_experts=4), "--shared-neurons"),
], ids=["softmax", "no-shared"])
def test_what_llama_cpp_cannot_run_is_refused_before_writing(kw, needle, calib_text, tmp_path, capsys):
    moe = _convert("llama", tmp_path, calib_text, **kw)
    rc = main(["export", "--model", str(moe), "--out", str(tmp_path / "gguf"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format gguf: " in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]


def test_a_failing_converter_leaves_nothing(calib_text, tmp_path, capsys):
    moe = _convert("llama", tmp_path, calib_text)
    broken = tmp_path / "llama.cpp"
    broken.mkdir()
    (broken / "convert_hf_to_gguf.py").write_text("raise SystemExit('not a converter')\n")  # no conversion package
    rc = main(["export", "--model", str(moe), "--out", str(tmp_path / "gguf"), "--format", "gguf",
               "--llama-cpp", str(broken)])
    err = capsys.readouterr().err
    assert rc == 2 and "llama.cpp's converter" in err and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "llama.cpp", "moe"]


def test_gguf_flags_are_checked(tmp_path, tiny_moe_dir, capsys):
    rc = main(["export", "--model", str(tiny_moe_dir), "--out", str(tmp_path / "a"), "--format", "gguf",
               "--llama-cpp", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--llama-cpp {tmp_path}: no convert_hf_to_gguf.py" in err, err
    rc = main(["export", "--model", str(tiny_moe_dir), "--out", str(tmp_path / "b"), "--gguf-type", "f32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format gguf only" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_qwen3_base_is_refused_for_qwen2_moe_and_gguf(calib_text, tmp_path, capsys):
    moe = tiny.convert_shared(tiny.build_qwen3_dense(tmp_path / "dense"), tmp_path / "moe", calib_text)
    for fmt in ("qwen2-moe", "gguf"):
        rc = main(["export", "--model", str(moe), "--out", str(tmp_path / fmt), "--format", fmt])
        err = capsys.readouterr().err
        assert rc == 2 and "q_norm" in err and "--format mixtral" in err, err
        assert not (tmp_path / fmt).exists()


def test_scaled_rope_is_refused_for_gguf_only(calib_text, tmp_path, capsys):
    dense = tiny.build_dense(tmp_path / "dense", "llama", dtype=torch.float32,
                             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    moe = tiny.convert_shared(dense, tmp_path / "moe", calib_text)
    rc = main(["export", "--model", str(moe), "--out", str(tmp_path / "gguf"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and "rope_type 'linear'" in err and "--format qwen2-moe" in err, err
    assert main(["export", "--model", str(moe), "--out", str(tmp_path / "hf"), "--format", "qwen2-moe"]) == 0
