"""convert --device: the calibrated steps run on one device, one decoder layer at a time (issue 26).

Without a GPU the device path is checked on the CPU: every tensor the conversion computes with must be placed
on purpose (on the data's device, or explicitly on the CPU), never left to torch's default device, or a CUDA
run would mix devices. With the default device set to ``meta``, a tensor made without a device is a meta
tensor, and the first operation mixing it with real data raises; the conversion must then still give the same
bytes as a plain run. The CUDA = CPU comparison itself is tests/test_gpu.py::test_convert_cuda_equals_cpu.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import tiny
from factorllm_ds.cli import main
from factorllm_ds.layout import MANIFEST_FILE
from factorllm_ds.structure import ROUTER_FITS

pytestmark = pytest.mark.usefixtures("one_thread")

# The recommended conversion at tiny size: shared expert, co-activation split, fitted router, down refit, so every
# device step runs (calibration forward, importance, clustering, router fit, refit); every router fit, the oracle's
# included, is run through the device path.
CALIBRATED = dict(num_experts=4, top_k=2, shared_neurons="0.25", split="coactivation", calib_tokens=256,
                  calib_seq_len=64)


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes): the header as a dict, since safetensors writes its metadata in no fixed order."""
    blob = path.read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def same_folder(a: Path, b: Path) -> None:
    """Every file byte for byte (a safetensors header as JSON), the manifest's settings but --out (its timing
    differs from run to run)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == MANIFEST_FILE:
            want, got = (json.loads((folder / name).read_text())["settings"] for folder in (a, b))
            assert {**want, "out": None} == {**got, "out": None}
        elif name.endswith(".safetensors"):
            assert _safetensors_parts(a / name) == _safetensors_parts(b / name), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("router_fit", ROUTER_FITS)
def test_device_path_places_every_tensor_and_keeps_the_cpu_bytes(llama_dir, calib_text, tmp_path, router_fit):
    """The CLI without --device, and the conversion with device='cpu' under a ``meta`` default device, give the
    same bytes: nothing in the device path is made on torch's default device."""
    settings = dict(CALIBRATED, router_fit=router_fit)
    plain = tmp_path / "plain"
    assert main(["convert", "--model", str(llama_dir), "--out", str(plain), "--calib-data", str(calib_text),
                 *_flags(settings)]) == 0
    placed = tmp_path / "placed"
    torch.set_default_device("meta")
    try:
        tiny.convert_tiny(llama_dir, placed, calib_data=calib_text, device="cpu", **settings)
    finally:
        torch.set_default_device(None)
    same_folder(plain, placed)
    assert json.loads((plain / MANIFEST_FILE).read_text())["settings"]["device"] == "cpu"


def test_device_cpu_flag_equals_no_flag(llama_dir, calib_text, tmp_path):
    """--device cpu is the default; --device auto resolves to the CPU here and the manifest records it."""
    outs = {}
    for name, extra in (("none", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto"])):
        if name == "auto" and torch.cuda.is_available():
            continue
        outs[name] = tmp_path / name
        assert main(["convert", "--model", str(llama_dir), "--out", str(outs[name]), "--calib-data", str(calib_text),
                     *_flags(CALIBRATED), *extra]) == 0
    for name in outs:
        same_folder(outs["none"], outs[name])


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "meta", "mps", "cpu:x"])
def test_unusable_device_is_one_error_and_nothing_written(llama_dir, calib_text, tmp_path, capsys, device):
    """A device this machine lacks, or one the commands do not run on, is refused before any work."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "moe"
    assert main(["convert", "--model", str(llama_dir), "--out", str(out), "--calib-data", str(calib_text),
                 *_flags(CALIBRATED), "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and device in err and ("--device cpu" in err or "use cpu, cuda" in err or
                                                    "cuda:0 to" in err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- predicted cost (convert_cost.py)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"


def test_cost_model_reproduces_its_measured_point_and_the_docs_table():
    """The CPU rate is the one measured point's (186 s per 13B layer at 4096 tokens); docs/cluster.md's table of
    predicted 13B / 70B conversions is what convert_cost computes."""
    from factorllm_ds import convert as convert_module
    from factorllm_ds.convert_cost import CPU_REFERENCE, ORACLE_BLOCK_BYTES, GiB, convert_cost
    from factorllm_ds.plan import BUILTIN_MODELS
    from factorllm_ds.structure import parse_shared

    assert ORACLE_BLOCK_BYTES == convert_module.ORACLE_BLOCK_BYTES
    ref = convert_cost(CPU_REFERENCE["config"], CPU_REFERENCE["tokens"])
    assert ref.cpu_layer_s == pytest.approx(CPU_REFERENCE["seconds"])
    docs = DOCS.read_text()
    for name, label in (("llama2-13b", "LLaMA-2-13B"), ("llama3-70b", "LLaMA-3-70B")):
        config = BUILTIN_MODELS[name]
        shared = parse_shared("0.25", config["intermediate_size"])
        costs = [convert_cost(config, t, shared) for t in (4096, 16384, 65536)]
        for cost in costs:
            row = (f"| {label} ({cost.layers} layers) | {cost.tokens:,} | {cost.gpu_bytes / GiB:.1f} | "
                   f"{cost.gpu_s / 60:.1f} | {cost.cpu_s / 3600:.1f} |")
            assert row in docs, row
        # more calibration text: more time and more GPU memory, on both devices
        assert [c.gpu_bytes for c in costs] == sorted(c.gpu_bytes for c in costs)
        assert costs[0].cpu_s < costs[1].cpu_s < costs[2].cpu_s and costs[0].gpu_s < costs[2].gpu_s


def test_oracle_fits_are_planned_with_their_token_blocks():
    """A router fit that runs the oracle holds every routed expert's output on a block of tokens: where that
    outgrows the refit's working set (a narrow FFN), the bound grows with it; a data-free fit is not charged."""
    from factorllm_ds.convert_cost import convert_cost

    config = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000)  # tests/test_gpu.py's conversion
    gate, picks, gate_w = (convert_cost(config, 4096, 256, num_experts=8, router_fit=fit).gpu_bytes
                           for fit in ("gate", "picks", "gate-w"))
    assert picks > gate == gate_w


def test_plan_prints_the_predicted_conversion_of_a_calibrated_structure(capsys):
    from factorllm_ds.convert_cost import PLAN_TOKENS, convert_cost, describe
    from factorllm_ds.plan import BUILTIN_MODELS

    assert main(["plan", "--model", "llama3-70b", "--gpus", "64", "--shared-neurons", "0.25", "--num-experts", "48",
                 "--top-k", "16", "--prior", "self"]) == 0
    out = capsys.readouterr().out
    for tokens in PLAN_TOKENS:
        line = describe(convert_cost(BUILTIN_MODELS["llama3-70b"], tokens, 7168, num_experts=48))
        assert f"  {line}\n" in out, out
    assert "one GPU (--device cuda)" in out and "GiB of GPU memory" in out
    # the paper's split has no calibration: nothing to predict
    assert main(["plan", "--model", "llama3-70b", "--gpus", "64", "--num-experts", "16", "--top-k", "4",
                 "--prior", "self"]) == 0
    assert "--device cuda" not in capsys.readouterr().out
