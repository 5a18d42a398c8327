"""What a calibrated conversion costs: seconds per decoder layer on the CPU and on one GPU, and the GPU memory of
``convert --device cuda``. Closed-form counts of the work convert does per layer (docs/cluster.md "Converting on
one GPU" writes them out); predictions, not measurements: ``bench/gpu_check.sh`` measures both on a GPU.

Per layer, T calibration tokens, H hidden, I dense neurons, S shared, P the decoder layer's parameters:

- flops: the calibration forward 2·T·P (plus attention 2·T·seq·H), the down refit's Gram matrix, right-hand
  side and the routed output 2·T·I² + 4·T·I·H, its Cholesky factor and solve I³/3 + 2·I²·H. The split's k-means
  (15·2·T·(I-S)·E) and a data-free router fit are small beside them; the oracle's work (the router fits outside
  structure.DATA_FREE_FITS) is not counted.
- CPU seconds: flops at the effective rate of the one end-to-end measurement (:data:`CPU_REFERENCE`).
- GPU seconds: flops at an assumed fp32 rate, plus reading the layer twice and writing it once at an assumed
  disk rate, plus a fixed allowance for kernel launches and host syncs.
- GPU bytes: the larger of the two phases of a layer. The calibration forward holds the decoder layer in fp32
  (4·P), the hidden states and what the MLP forward keeps (T·(6·H + 3·I) fp32). The structure step holds the
  layer's gate/up/down in the checkpoint's dtype (3·I·H·b), the hidden states, MLP input, output and activations
  (T·(3·H + I) fp32) and the refit's working set: the gated activations, their gates and a temporary (3·T·I),
  the I x I system and its Cholesky factor (2·I²) and three I x H matrices (fp32). The oracle, when the fit uses
  it, adds its token blocks. Plus :data:`GPU_WORKSPACE_BYTES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from factorllm_ds.keys import dense_infos_from_config, layer_of
from factorllm_ds.structure import DATA_FREE_FITS

GiB = 2**30
# The one measured point: a LLaMA-2-13B layer (H 5120, I 13824, 40 heads, bf16) with 4096 calibration tokens took
# 186 s on 2 loaded cores (bench/RESULTS.md "Peak memory of a calibrated conversion": shared 0.25, E=24, k=8,
# co-activation split, router fitted to the oracle's picks, refit). The oracle's work is not counted below, so for
# the default data-free router fit the CPU figures are on the high side.
CPU_REFERENCE = {"config": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=1, num_attention_heads=40,
                                num_key_value_heads=40, vocab_size=32000),
                 "tokens": 4096, "seq_len": 512, "seconds": 186.0, "cores": 2}
GPU_FP32_FLOPS = 25e12  # assumed: half of the ~50 TFLOP/s an H100 reaches on large fp32 matrix products (no TF32)
DISK_BYTES_PER_S = 2e9  # assumed: reading and writing the checkpoint files
GPU_LAYER_OVERHEAD_S = 1.0  # assumed: kernel launches and host syncs per layer (the balanced k-means rounds)
GPU_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS / cuSOLVER workspaces and allocator rounding
# = convert.ORACLE_BLOCK_BYTES (a test holds them equal); not imported, since convert imports transformers
ORACLE_BLOCK_BYTES = 256 * 2**20
PLAN_TOKENS = (4096, 16384)  # what plan shows: convert's --calib-tokens default and README's recommendation


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as the conversion sees it (T tokens of sequences of ``seq_len``)."""

    hidden: int  # H
    intermediate: int  # I
    shared: int  # S
    params: int  # P: every weight of the decoder layer
    weight_bytes: int  # the layer's bytes in the checkpoint's dtype
    dtype_bytes: int  # b

    @classmethod
    def of(cls, config: dict, shared: int = 0) -> LayerShape:
        """Layer 0 of the dense ``config`` (a config.json dict; every layer has its shape), bf16 unless it says."""
        dtype_bytes = 4 if (config.get("dtype") or config.get("torch_dtype")) == "float32" else 2
        infos = dense_infos_from_config({**config, "num_hidden_layers": 1}, torch.float32).values()
        params = sum(math.prod(i.shape) for i in infos if layer_of(i.name) == 0)
        return cls(config["hidden_size"], config["intermediate_size"], shared, params, params * dtype_bytes,
                   dtype_bytes)


def layer_flops(layer: LayerShape, tokens: int, seq_len: int) -> float:
    """The arithmetic of one layer's calibrated conversion (module docstring)."""
    t, h, i = tokens, layer.hidden, layer.intermediate
    forward = 2 * t * layer.params + 2 * t * min(seq_len, t) * h
    refit = 2 * t * i * i + 4 * t * i * h + i ** 3 / 3 + 2 * i * i * h
    return forward + refit


def phase_bytes(layer: LayerShape, tokens: int, oracle_experts: int = 0) -> dict[str, int]:
    """Bytes on the device in each phase of one layer (module docstring), without the workspace allowance.

    ``oracle_experts``: E when the router fit runs the oracle (0: it does not). The oracle takes a block of ``rows``
    tokens at a time: every routed expert's output on them (at most ORACLE_BLOCK_BYTES), their sum and the
    gathered activations and down columns it multiplies, each about twice (a gather, then a contiguous copy).
    """
    t, h, i, f32 = tokens, layer.hidden, layer.intermediate, 4
    work = f32 * (3 * t * i + 2 * i * i + 3 * i * h)
    if oracle_experts:
        rows = min(t, max(1, ORACLE_BLOCK_BYTES // (f32 * oracle_experts * h)))
        routed = i - layer.shared
        work = max(work, f32 * (2 * rows * oracle_experts * h + rows * h + 2 * rows * routed + 2 * h * routed))
    return {"calibration forward": f32 * layer.params + f32 * t * (6 * h + 3 * i),
            "structure step": 3 * i * h * layer.dtype_bytes + f32 * t * (3 * h + i) + work}


def gpu_bytes(layer: LayerShape, tokens: int, oracle_experts: int = 0) -> int:
    """Peak bytes ``convert --device cuda`` allocates on the GPU for one layer: the larger phase, plus workspaces."""
    return int(max(phase_bytes(layer, tokens, oracle_experts).values()) + GPU_WORKSPACE_BYTES)


def cpu_rate() -> float:
    """Effective flop/s of the measured CPU point."""
    ref = CPU_REFERENCE
    return layer_flops(LayerShape.of(ref["config"]), ref["tokens"], ref["seq_len"]) / ref["seconds"]


@dataclass(frozen=True)
class ConvertCost:
    layers: int
    tokens: int
    cpu_layer_s: float  # on CPU_REFERENCE's 2 cores
    gpu_layer_s: float
    gpu_bytes: int

    @property
    def cpu_s(self) -> float:
        return self.layers * self.cpu_layer_s

    @property
    def gpu_s(self) -> float:
        return self.layers * self.gpu_layer_s


def convert_cost(config: dict, tokens: int, shared: int = 0, *, num_experts: int = 0, seq_len: int = 512,
                 router_fit: str = "gate") -> ConvertCost:
    """The predicted cost of converting the dense ``config`` (a config.json dict) with ``tokens`` calibration
    tokens, a shared expert of ``shared`` neurons and ``num_experts`` routed experts (needed for the memory of a
    router fit that runs the oracle)."""
    layer = LayerShape.of(config, shared)
    flops = layer_flops(layer, tokens, seq_len)
    io = 3 * layer.weight_bytes / DISK_BYTES_PER_S
    return ConvertCost(layers=config["num_hidden_layers"], tokens=tokens, cpu_layer_s=flops / cpu_rate(),
                       gpu_layer_s=flops / GPU_FP32_FLOPS + io + GPU_LAYER_OVERHEAD_S,
                       gpu_bytes=gpu_bytes(layer, tokens, 0 if router_fit in DATA_FREE_FITS else num_experts))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def describe(cost: ConvertCost) -> str:
    """One line: the prediction at ``cost.tokens`` calibration tokens."""
    return (f"with --calib-tokens {cost.tokens} (predicted, docs/cluster.md): one GPU (--device cuda) "
            f"{_duration(cost.gpu_s)} and {cost.gpu_bytes / GiB:.1f} GiB of GPU memory; {CPU_REFERENCE['cores']} "
            f"CPU cores {_duration(cost.cpu_s)}")
