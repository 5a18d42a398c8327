"""bench-speed: prefill and decode tokens/s of a FactorLLM model vs its dense source, in one process.

Both models see the same random token batch. Each phase is timed ``--reps`` times after
``--warmup`` untimed runs, the variants interleaved within every repetition (dense, dense
without FFN, MoE) so that clock or thermal drift hits all of them alike; the median is kept.

- prefill: one forward pass over ``[batch, seq_len]`` tokens, no cache.
- decode: after an untimed prefill of the same batch (with a KV cache), ``--decode-tokens``
  single-token steps; the tokens fed are fixed in advance (not the argmax), so both models
  do identical work apart from the FFN.

FFN share f of the dense model's time, by ablation: the same dense model is timed with every
decoder layer's MLP swapped for a module returning zeros, and ``f = 1 - t(no FFN) / t(dense)``.
That measures what the FFNs actually cost in this run (kernels, memory traffic, launch
overhead), with none of the per-module synchronization a hook-based timer would add on a GPU.

With a shared expert of S neurons and k of E routed experts of R neurons each, only the active
fraction a = (S + k R) / (S + E R) of the FFN's work remains (k/E without a shared expert), so
Amdahl's law bounds the speedup: ``limit = 1 / ((1 - f) + f * a)``. ``speedup / limit`` says how much of that
bound the sparse dispatch realises (routing, gather/scatter and small matmuls cost extra).
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from factorllm_ds import __version__
from factorllm_ds.config import arg, bound_problems, fail_if
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import read_config
from factorllm_ds.modeling import DEVICE_DEFAULT, DTYPE_CHOICES, resolve_device
from factorllm_ds.outputs import FILE_MARKER, check_output_file, write_text_atomic
from factorllm_ds.shape import MODEL_WORDING, MoEShape, shape_problems


@dataclass
class SpeedConfig:
    """factorllm-ds bench-speed: MoE vs dense throughput (prefill and decode), FFN share, Amdahl limit."""

    model: Path = arg("FactorLLM folder (the MoE)", default=None, required=True)
    dense: Path = arg("the dense folder it was converted from", default=None, required=True)
    batch: int = arg("sequences per batch", default=8)
    seq_len: int = arg("prompt tokens per sequence (prefill length)", default=256)
    decode_tokens: int = arg("single-token decode steps after the prefill (0: skip decode)", default=32)
    top_k: int | None = arg("experts per token (default: the model's k)", default=None)
    dtype: str = arg("dtype both models run in", choices=DTYPE_CHOICES, default=DTYPE_CHOICES[0])
    device: str = arg("device: cpu, cuda, cuda:N or auto (cuda when available)", default=DEVICE_DEFAULT)
    reps: int = arg("timed repetitions per variant (the median is reported)", default=5)
    warmup: int = arg("untimed warm-up runs per variant", default=1)
    threads: int | None = arg("torch CPU threads (default: torch's choice)", default=None)
    seed: int = arg("seed of the random token batch", default=0)
    report: Path | None = arg("write the JSON result here", default=None)
    shape: MoEShape | None = field(default=None)  # --model's with --top-k, resolved by validate(); not a flag

    def validate(self, moe_config: dict, dense_config: dict) -> SpeedConfig:
        """Every flag problem at once, against both folders' config.json; returns the resolved config, whose
        ``shape`` is the MoE's with --top-k applied."""
        problems, shape = [], None
        if moe_config.get("model_type") != "factorllm":
            problems.append(f"--model {self.model}: not a FactorLLM folder (model_type "
                            f"{moe_config.get('model_type')!r}); pass the converted MoE folder")
        else:
            shape = MoEShape.of_config(moe_config)
            if self.top_k is not None:
                shape = replace(shape, top_k=self.top_k)
                problems += shape_problems(shape, MODEL_WORDING)
            if dense_config.get("model_type") == "factorllm":
                problems.append(f"--dense {self.dense}: is a FactorLLM folder; pass the dense model")
            elif moe_config.get("text_config", {}).get("model_type") != dense_config.get("model_type") or \
                    moe_config.get("vocab_size") != dense_config.get("vocab_size"):
                problems.append(f"--dense {self.dense} ({dense_config.get('model_type')}, vocab "
                                f"{dense_config.get('vocab_size')}) does not match the MoE's base model")
        problems += bound_problems(self, {"batch": ">= 1", "seq_len": ">= 1", "decode_tokens": ">= 0", "reps": ">= 1",
                                          "warmup": ">= 0", "threads": ">= 1"})
        try:  # before the benchmark: a report that cannot be written must not cost a run
            check_output_file(self.report, "--report", {"--model": self.model, "--dense": self.dense})
        except UserError as err:
            problems.append(str(err))
        fail_if(problems, "bench-speed: bad arguments")
        return replace(self, shape=shape)


class ZeroFFN(nn.Module):
    """Stands in for an MLP when timing the model without FFNs: the residual add gets zeros."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@contextmanager
def ffn_removed(model):
    """Temporarily replace every decoder layer's ``mlp`` with :class:`ZeroFFN`."""
    layers = model.model.layers
    saved = [layer.mlp for layer in layers]
    try:
        for layer in layers:
            layer.mlp = ZeroFFN()
        yield model
    finally:
        for layer, mlp in zip(layers, saved):
            layer.mlp = mlp


def amdahl_limit(ffn_share: float, active_fraction: float) -> float:
    """Best possible speedup when the FFN part (share f of the time) shrinks to the active fraction of its work."""
    return 1.0 / ((1.0 - ffn_share) + ffn_share * active_fraction)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work) -> float:
    """Seconds ``work()`` takes, with the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def _cache_of(out):
    return out.cache if hasattr(out, "cache") and out.cache is not None else getattr(out, "past_key_values", None)


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def run_prefill(model, ids: torch.Tensor) -> float:
    """Seconds for one forward pass over ``ids`` (no cache)."""
    return _timed(ids.device, lambda: model(input_ids=ids, use_cache=False))


@torch.no_grad()
def run_decode(model, ids: torch.Tensor, step_ids: torch.Tensor) -> float:
    """Seconds for ``step_ids.shape[1]`` single-token steps after an (untimed) cached prefill of ``ids``."""
    cache_kw = _cache_kwarg(model)
    cache = _cache_of(model(input_ids=ids, use_cache=True))

    def steps():
        nonlocal cache
        for t in range(step_ids.shape[1]):
            position = torch.full((ids.shape[0], 1), ids.shape[1] + t, dtype=torch.long, device=ids.device)
            cache = _cache_of(model(input_ids=step_ids[:, t:t + 1], position_ids=position, use_cache=True,
                                    **{cache_kw: cache}))

    return _timed(ids.device, steps)


def _time_variants(variants: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    """Median-ready timings: every variant once per repetition, interleaved."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(fn())
    return times


def _phase_result(times: dict[str, list[float]], tokens: int, active_fraction: float) -> dict:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ffn_share = min(max(1.0 - med["dense_no_ffn"] / med["dense"], 0.0), 1.0)
    speedup = med["dense"] / med["moe"]
    limit = amdahl_limit(ffn_share, active_fraction)
    return {
        "tokens": tokens,
        **{f"{name}_tokens_per_s": tokens / med[name] for name in ("dense", "moe", "dense_no_ffn")},
        "median_seconds": med,
        "all_seconds": times,
        "ffn_share": ffn_share,
        "speedup": speedup,
        "amdahl_limit": limit,
        "speedup_over_limit": speedup / limit,
    }


def bench_speed(cfg: SpeedConfig) -> dict:
    from factorllm_ds.modeling import DTYPES, load_dense, load_moe

    moe_config, dense_config = read_config(cfg.model, "--model"), read_config(cfg.dense, "--dense")
    cfg = cfg.validate(moe_config, dense_config)
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype]
    moe = load_moe(cfg.model, dtype).to(device)
    dense = load_dense(cfg.dense, dtype).to(device)
    if cfg.top_k is not None:
        moe.set_top_k(cfg.top_k)
    block = moe.moe_blocks()[0]
    active = cfg.shape.active_fraction

    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq_len), generator=gen).to(device)
    step_ids = torch.randint(0, vocab, (cfg.batch, cfg.decode_tokens), generator=gen).to(device)

    def dense_no_ffn(run):
        with ffn_removed(dense):
            return run(dense)

    result = {FILE_MARKER.decode(): __version__, "model": str(cfg.model), "dense": str(cfg.dense),
              "top_k": block.top_k, "num_experts": block.num_experts,
              "shared_intermediate_size": cfg.shape.shared_size, "active_fraction": active,
              "routing": block.routing, "batch": cfg.batch, "seq_len": cfg.seq_len,
              "decode_tokens": cfg.decode_tokens, "dtype": cfg.dtype, "device": str(device),
              "threads": torch.get_num_threads() if device.type == "cpu" else None, "reps": cfg.reps,
              "ffn_share_method": "ablation: 1 - t(dense, MLPs return zeros) / t(dense)"}
    phases = {"prefill": (partial(run_prefill, ids=ids), cfg.batch * cfg.seq_len)}
    if cfg.decode_tokens > 0:
        phases["decode"] = (partial(run_decode, ids=ids, step_ids=step_ids), cfg.batch * cfg.decode_tokens)
    for phase, (run, tokens) in phases.items():
        times = _time_variants({"dense": partial(run, dense), "dense_no_ffn": partial(dense_no_ffn, run),
                                "moe": partial(run, moe)}, cfg.reps, cfg.warmup)
        result[phase] = _phase_result(times, tokens, active)
    if cfg.report is not None:  # whole or not at all: a full disk leaves the previous report, not an empty file
        write_text_atomic(cfg.report, json.dumps(result, indent=2) + "\n", "--report")
    return result


def summary_lines(result: dict) -> list[str]:
    threads = f" ({result['threads']} threads)" if result["threads"] else ""
    shared = result.get("shared_intermediate_size") or 0
    lines = [f"k/E = {result['top_k']}/{result['num_experts']}"
             + (f" + shared expert ({shared} neurons)" if shared else "")
             + f", active {result['active_fraction']:.3f} of the FFN, batch {result['batch']} x {result['seq_len']} "
             f"tokens, {result['dtype']} on {result['device']}{threads}",
             f"{'phase':8} {'dense tok/s':>12} {'moe tok/s':>12} {'FFN share':>10} {'speedup':>8} {'limit':>7} "
             f"{'ratio':>6}"]
    for phase in ("prefill", "decode"):
        if phase in result:
            r = result[phase]
            lines.append(f"{phase:8} {r['dense_tokens_per_s']:12.1f} {r['moe_tokens_per_s']:12.1f} "
                         f"{r['ffn_share']:10.3f} {r['speedup']:8.3f} {r['amdahl_limit']:7.3f} "
                         f"{r['speedup_over_limit']:6.3f}")
    return lines


def run_command(cfg: SpeedConfig) -> int:
    result = bench_speed(cfg)
    for line in summary_lines(result):
        print(line)
    if cfg.report is not None:
        print(f"report: {cfg.report}")
    return 0


__all__ = ["SpeedConfig", "bench_speed", "amdahl_limit", "ffn_removed", "run_prefill", "run_decode",
           "summary_lines"]
