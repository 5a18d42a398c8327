"""What `convert --device` puts on its device per layer, measured on the CPU, against convert_cost's GPU bound.

    python bench/bench_convert_memory.py [--hidden 256 --intermediate 1024 --calib-tokens 4096 --router-fit gate]

Converts a random tiny LLaMA (tests/tiny.py, fp32, 2 layers; shared 0.25, E=8, k=2, co-activation split, fitted
router, down refit) with --device cpu and, around the two per-layer phases that run on the device with
--device cuda (the calibration forward, CalibrationRunner.run_layer, and the structure step, convert's
layer_structure), adds the peak of the bytes torch's profiler sees allocated inside the phase to the bytes alive
at its start (the calibration runner's hidden states, MLP input, output and activations, and the layer's
gate/up/down, which a GPU would hold as a copy). On a GPU, bench/gpu_check.sh reads torch.cuda instead.
Prints each phase measured against factorllm_ds.convert_cost.phase_bytes (no workspace allowance).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402
from factorllm_ds import convert as convert_module  # noqa: E402
from factorllm_ds.calibration import CalibrationRunner  # noqa: E402
from factorllm_ds.convert_cost import LayerShape, phase_bytes  # noqa: E402
from factorllm_ds.hf_io import read_config  # noqa: E402
from factorllm_ds.structure import DATA_FREE_FITS  # noqa: E402


def peak_inside(fn, *args, **kwargs):
    """(result, peak bytes allocated inside ``fn`` above what it started with), from the profiler's events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--router-fit", default="gate")
    args = p.parse_args()
    torch.set_num_threads(1)
    phases = {"calibration forward": 0, "structure step": 0}
    run_layer, layer_structure = CalibrationRunner.run_layer, convert_module.layer_structure

    def measured_run_layer(runner, layer):
        start = runner.hidden.nbytes + sum(t.nbytes for t in runner.position_embeddings)
        _, inside = peak_inside(run_layer, runner, layer)
        phases["calibration forward"] = max(phases["calibration forward"], start + inside)

    def measured_layer_structure(cfg, layer, gate, up, down, calib, gen):
        start = sum(t.nbytes for t in (calib.hidden, calib.mlp_input, calib.mlp_output(), calib.mlp_activations(),
                                       gate, up, down))
        result, inside = peak_inside(layer_structure, cfg, layer, gate, up, down, calib, gen)
        phases["structure step"] = max(phases["structure step"], start + inside)
        return result

    CalibrationRunner.run_layer, convert_module.layer_structure = measured_run_layer, measured_layer_structure
    with tempfile.TemporaryDirectory() as work:
        dense = tiny.build_dense(Path(work) / "dense", "llama", hidden_size=args.hidden,
                                 intermediate_size=args.intermediate, num_attention_heads=8, num_key_value_heads=4)
        text = tiny.write_calibration_text(Path(work) / "calib.txt", chars=20 * args.calib_tokens)
        tiny.convert_tiny(dense, Path(work) / "moe", num_experts=8, top_k=2, shared_neurons="0.25",
                          split="coactivation", calib_data=text, calib_tokens=args.calib_tokens, calib_seq_len=512,
                          router_fit=args.router_fit, device="cpu")
        layer = LayerShape.of(read_config(dense), args.intermediate // 4)
    bounds = phase_bytes(layer, args.calib_tokens, 0 if args.router_fit in DATA_FREE_FITS else 8)
    print(f"H {args.hidden}, I {args.intermediate}, T {args.calib_tokens}, router fit {args.router_fit}:")
    for name, measured in phases.items():
        print(f"  {name}: {measured / 1e6:.1f} MB measured, {bounds[name] / 1e6:.1f} MB bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
