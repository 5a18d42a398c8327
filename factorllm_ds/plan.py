"""plan: per-GPU memory of a FactorLLM training run, and the ep_size / ZeRO / offload that fit.

Every number is a closed-form count of what one rank holds (docs/cluster.md writes the
formulas out); nothing is loaded, so 70B plans take a second. Shapes come from a built-in
name, a dense or converted folder, or a config.json. On CPU ("GPU memory" = process RSS)
the runtime baseline is a constant measured on this project's CPU runs (tests/test_plan.py
checks the whole estimate against measured peak RSS).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from factorllm_ds.config import (
    MODEL_DEFAULTS,
    PRIOR_TEACHERS,
    TRAIN_SEQ_LEN,
    MoEFlags,
    arg,
    bound_problems,
    fail_if,
    size_bytes,
)
from factorllm_ds.errors import UserError
from factorllm_ds.shape import PLAN_WORDING, MoEShape, seq_len_problems, shape_problems

GiB = 2**30
MiB = 2**20

# Hugging Face config.json fields of the models people ask about (no download needed).
BUILTIN_MODELS: dict[str, dict] = {
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# DeepSpeed's default "reduce_bucket_size" (elements): ZeRO-1 and -2 allocate one such gradient bucket
# (two with overlap_comm) when the backward pass starts.
DEFAULT_REDUCE_BUCKET = 500_000_000
# GPU: CUDA context + NCCL communicators + caching-allocator slack. An allowance, not a measurement
# (no GPU was available when this was written); override with --runtime-memory.
GPU_RUNTIME_BYTES = 3 * GiB
# CPU: RSS of a training rank before its model exists (python, torch, deepspeed, transformers,
# datasets, the 32k tokenizer, gloo) plus glibc heap slack, measured with tiny models on
# torch 2.13 / deepspeed 0.19.8; see docs/cluster.md "Calibration".
CPU_RUNTIME_BYTES = 540 * MiB
# Routed slots per expert relative to a perfectly even split: capacity = max load (no drops).
DEFAULT_CAPACITY_FACTOR = 1.5
# A dense model is planned with the E and k that convert gives it by default: the shipped model config's.
DEFAULT_EXPERTS, DEFAULT_TOP_K = MODEL_DEFAULTS["num_experts"], MODEL_DEFAULTS["num_experts_per_tok"]


@dataclass
class PlanConfig:
    """factorllm-ds plan: per-GPU memory of a training run and the ep_size / ZeRO stage / offload that fit."""

    model: str = arg("built-in name (llama2-13b, llama3-8b, llama3-70b, smollm2-135m), a dense or converted "
                     "model folder, or a config.json", default=None, required=True)
    gpus: int = arg("number of GPUs (ranks) in the job", default=None, required=True)
    gpu_memory: str = arg("memory per GPU, e.g. 80GB or 40GiB (GB = GiB here, as GPU vendors count); "
                          "with --device cpu: memory per process", default="80GB")
    ep_size: int | None = arg("expert-parallel size to plan for (default: try every divisor of E and --gpus)",
                              default=None)
    zero: int | None = arg("ZeRO stage 1 or 2 (default: try both)", default=None)
    offload: bool | None = arg("optimizer state in host memory (ZeRO-Offload, stage 2); default: try "
                               "without, then with", default=None)
    seq_len: int | None = arg(f"tokens per training sequence (default: {TRAIN_SEQ_LEN}, or the model's "
                              "max_position_embeddings when that is smaller)", default=None)
    micro_batch_size: int = arg("sequences per rank per forward", default=1)
    prior: str = arg("PA teacher: frozen (a frozen copy of the local experts), self (none kept), none",
                     choices=PRIOR_TEACHERS, default=PRIOR_TEACHERS[0])
    dtype: str = arg("training dtype: bf16 (GPU) or fp32", choices=tuple(DTYPE_BYTES), default="bf16")
    distill: bool = arg("plan for train --teacher (distillation from the dense model): a frozen copy of the whole "
                        "dense model on every rank, its logits and the KL's", default=False)
    num_experts: int | None = arg(f"E for a dense model (default {DEFAULT_EXPERTS}); a converted folder has its own",
                                  default=None)
    top_k: int | None = arg(f"k for a dense model (default {DEFAULT_TOP_K}); a converted folder has its own",
                            default=None)
    shared_neurons: str | None = arg("shared expert of a dense model, as convert --shared-neurons: a fraction of "
                                     "the FFN (0.25) or a neuron count (384); default none. A converted folder has "
                                     "its own", default=None)
    activation_checkpointing: bool | None = arg("train --activation-checkpointing (recompute each layer in the "
                                                "backward); default: try without, then with", default=None)
    device: str = arg("gpu, or cpu: plan process memory of a CPU (gloo) run, adding the measured CPU runtime "
                      "baseline", choices=("gpu", "cpu"), default="gpu")
    capacity_factor: float = arg("expected max expert load / mean load (sets the MoE dispatch activations)",
                                 default=DEFAULT_CAPACITY_FACTOR)
    reduce_bucket_size: int = arg("DeepSpeed zero_optimization.reduce_bucket_size (elements)",
                                  default=DEFAULT_REDUCE_BUCKET)
    overlap_comm: bool | None = arg("DeepSpeed zero_optimization.overlap_comm (two gradient buckets); default: "
                                    "as in ds_configs/ (on for bf16, off for fp32)", default=None)
    gpus_per_node: int | None = arg("GPUs per node, for the host memory of --offload (default min(--gpus, 8))",
                                    default=None)
    host_memory: str | None = arg("host memory per node, e.g. 1TB: an offload plan fits only if its optimizer "
                                  "state fits there too (default: not checked)", default=None)
    runtime_memory: str | None = arg("fixed per-process overhead (CUDA context, NCCL, allocator slack); default "
                                     f"{GPU_RUNTIME_BYTES // GiB}GiB on GPU, {CPU_RUNTIME_BYTES // MiB}MiB on CPU",
                                     default=None)
    json: bool = arg("print the plan as JSON", default=False)

    def validate(self, model: Model | None, problems: list[str] | None = None) -> PlanConfig:
        """Every problem with the flags, reported together, before anything is printed; returns the config to plan
        with (nothing to resolve: itself).

        ``model`` None: --model could not be read (its problem is in ``problems``); the other flags are
        still checked. Only values the user passed are judged: a default never is.
        """
        problems = list(problems or [])
        for flag, text in (("--gpu-memory", self.gpu_memory), ("--host-memory", self.host_memory),
                           ("--runtime-memory", self.runtime_memory)):
            if text is None:
                continue
            try:
                size = parse_memory(text, flag)
            except UserError as err:
                problems.append(str(err))
                continue
            if size <= 0 and flag != "--runtime-memory":
                problems.append(f"{flag} {text}: must be a positive size, e.g. 80GB")
            elif size < 0:
                problems.append(f"{flag} {text}: must be a size >= 0")
        if self.gpus is None or self.gpus < 1:
            problems.append(f"--gpus {self.gpus}: must be >= 1")
        if self.zero is not None and self.zero not in (1, 2):
            problems.append(f"--zero {self.zero}: DeepSpeed MoE runs with ZeRO stage 1 or 2 (stage 3 is not supported "
                            "for native MoE); use --offload for the largest models")
        if self.zero == 1 and self.offload:
            problems.append("--offload with --zero 1: plan ZeRO-Offload with --zero 2")
        if self.seq_len is not None:  # train's rule, against the model's positions when it could be read
            problems += seq_len_problems(self.seq_len, model.max_positions if model else None)
        if self.capacity_factor < 1:
            problems.append(f"--capacity-factor {self.capacity_factor}: must be >= 1 (max load >= mean load)")
        bounded = ("micro_batch_size", "reduce_bucket_size", "gpus_per_node", "num_experts", "top_k")
        problems += bound_problems(self, dict.fromkeys(bounded + (() if model else ("ep_size",)), ">= 1"))
        if self.device == "cpu" and self.offload:
            problems.append("--offload with --device cpu: the host memory is the process memory; drop --offload")
        if self.device == "cpu" and self.dtype == "bf16":
            problems.append("--device cpu with --dtype bf16: CPU runs are calibrated in fp32; pass --dtype fp32")
        if model is not None:  # E is the model's or the flag's: --ep-size is judged against it
            problems += converted_problems(self, model)
            problems += shape_problems(model.moe, PLAN_WORDING, ep_size=self.ep_size, world=self.gpus)
        fail_if(problems, "plan: bad arguments")
        return self


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Model:
    """What plan counts of a FactorLLM model: its MoE shape and its parameters (every layer, every expert)."""

    name: str
    moe: MoEShape  # E, k, I, S, H, L and the routing
    vocab: int
    shared_params: int  # embeddings, attention, norms, lm_head: frozen, on every rank
    router_params: int  # all layers; trained, data-parallel over every rank
    expert_params: int  # all layers, all routed experts (with the shared expert's: the dense FFNs)
    max_positions: int | None
    converted: bool = False  # a FactorLLM folder: E and k are fixed
    shared_expert_params: int = 0  # all layers; trained, data-parallel over every rank

    @property
    def total_params(self) -> int:
        return self.shared_params + self.router_params + self.expert_params + self.shared_expert_params


def read_model_config(model: str) -> tuple[str, dict]:
    """(display name, config dict) from a built-in name, a folder, or a config.json path."""
    if model.lower() in BUILTIN_MODELS:
        return model.lower(), dict(BUILTIN_MODELS[model.lower()])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model}: not a built-in name ({', '.join(BUILTIN_MODELS)}) and no config.json "
                        "there. Pass a model folder, its config.json, or a built-in name.")
    try:
        return model, json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--model {path}: cannot read it as JSON ({err})") from err


def model_of(cfg: PlanConfig) -> Model:
    """Count parameters from the config alone (keys.dense_infos_from_config: the converter's own tensor list)."""
    import torch

    from factorllm_ds.keys import dense_infos_from_config

    name, config = read_model_config(cfg.model)
    converted = config.get("model_type") == "factorllm"
    dense = dict(config["text_config"]) if converted else config
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if k not in dense]
    if missing:
        raise UserError(f"--model {name}: config lacks {', '.join(missing)}; is it a LLaMA-family config?")
    if converted:
        moe = MoEShape.of_config(config)
    else:  # as convert makes it, with its default routing
        flags = MoEFlags(num_experts=cfg.num_experts or DEFAULT_EXPERTS, top_k=cfg.top_k or DEFAULT_TOP_K)
        moe = flags.shape_for(dense, shared_neurons_of(cfg, dense["intermediate_size"]))
    numel = {n: math.prod(i.shape) for n, i in dense_infos_from_config(dense, torch.float32).items()}
    ffn = sum(v for n, v in numel.items() if ".mlp." in n)
    shared_expert = moe.num_layers * sum(math.prod(s) for s in moe.shared_shapes().values())
    return Model(name=name, moe=moe, vocab=dense["vocab_size"], shared_params=sum(numel.values()) - ffn,
                 router_params=moe.num_layers * moe.num_experts * (moe.hidden_size + int(moe.router_bias)),
                 expert_params=ffn - shared_expert, max_positions=dense.get("max_position_embeddings"),
                 converted=converted, shared_expert_params=shared_expert)


def shared_neurons_of(cfg: PlanConfig, intermediate: int | None) -> int:
    """S from --shared-neurons, counted as convert counts it (structure.parse_shared)."""
    from factorllm_ds.structure import parse_shared

    if not cfg.shared_neurons or not intermediate:
        return 0
    try:
        return parse_shared(cfg.shared_neurons, intermediate)
    except ValueError as err:
        raise UserError(f"--shared-neurons {cfg.shared_neurons}: {err}") from err


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Choice:
    ep_size: int
    zero: int
    offload: bool
    activation_checkpointing: bool = False

    def label(self) -> str:
        return (f"ep={self.ep_size} zero={self.zero}{' offload' if self.offload else ''}"
                f"{' ckpt' if self.activation_checkpointing else ''}")


@dataclass
class Estimate:
    choice: Choice
    parts: dict[str, int]  # bytes per process, keyed as HEADERS
    host_offload: int  # bytes of host memory per process for offloaded optimizer state
    host_load: int = 0  # bytes of host memory per process while it reads its weights (before the GPU copy)
    pa_transient: int = 0  # the part of pa_teacher that exists only while a layer's PA target is computed
    fits: bool = False
    forward_backward: int | None = None  # peak of activations + PA transient together (default: their sum)

    @property
    def total(self) -> int:
        """The peak: all that persists + the larger of the forward/backward and optimizer-step transients."""
        p = self.parts
        apart = p["activations"] + self.pa_transient
        together = apart if self.forward_backward is None else self.forward_backward
        return sum(p.values()) - apart - p["optimizer_step"] + max(together, p["optimizer_step"])



def seq_len_of(cfg: PlanConfig, model: Model) -> int:
    """--seq-len, or the default capped at what the model can take (a default is never the user's error)."""
    if cfg.seq_len is not None:
        return cfg.seq_len
    return min(TRAIN_SEQ_LEN, model.max_positions or TRAIN_SEQ_LEN)


def tokens_of(cfg: PlanConfig, model: Model) -> int:
    """Tokens of one micro-batch on one rank."""
    return cfg.micro_batch_size * seq_len_of(cfg, model)


def activation_terms(model: Model, cfg: PlanConfig) -> tuple[float, float, float]:
    """Bytes per token: (what one layer keeps for its backward, the loss's logits at their peak, the rest).

    Frozen linears keep no input (no weight gradient is needed), so per token and layer:
    two RMSNorm inputs in fp32 (8H), SDPA's q, k, v, out (4H, k/v expanded to H), the router's
    fp32 input when training in bf16 (4H), per routed slot (k x capacity_factor per token)
    each expert's input and four R-wide intermediates, and the shared expert's input and
    four S-wide intermediates; softmax routing also keeps the k gathered expert outputs. The
    loss holds 12 bytes per logit at its peak (fp32 log-softmax output, its gradient, the
    gradient of the logits; +2 for the bf16 logits' gradient). Distillation adds 8: the KL keeps
    the teacher's and the student's fp32 log-probabilities for the backward (the teacher's logits
    and the KL's elementwise terms are gone by the loss's peak; measured, tests/test_plan.py).
    """
    b, moe = DTYPE_BYTES[cfg.dtype], model.moe
    h, r, s = moe.hidden_size, moe.expert_size, moe.shared_size
    slots = moe.top_k * cfg.capacity_factor
    per_layer = 8 * h + 4 * h * b + (4 * h if b < 4 else 0) + slots * (h + 4 * r) * b
    if s:
        per_layer += (h + 4 * s) * b
    if moe.routing == "softmax":
        per_layer += moe.top_k * h * b
    logits = 12 + (2 if b < 4 else 0) + (8 if cfg.distill else 0)
    return per_layer, model.vocab * logits, 4 * h


def checkpoint_bytes(model: Model, cfg: PlanConfig) -> int:
    """With activation checkpointing, what every layer keeps from its forward: its input hidden state
    (b x H per token) and, when there is a PA prior, the prior's k choices (int64) for the replay."""
    prior = 8 * model.moe.top_k if cfg.prior != "none" else 0
    return int(tokens_of(cfg, model) * model.moe.num_layers * (DTYPE_BYTES[cfg.dtype] * model.moe.hidden_size + prior))


def activation_bytes(model: Model, cfg: PlanConfig, checkpointing: bool = False) -> int:
    """Tensors autograd keeps from forward to backward on one rank, plus the loss's logits.

    ``checkpointing``: the layers keep only their checkpoints; the backward recomputes one layer at a
    time, after the logits' gradient is gone, so the larger of the two is what adds to them.
    """
    tokens = tokens_of(cfg, model)
    per_layer, logits, rest = activation_terms(model, cfg)
    if checkpointing:
        return checkpoint_bytes(model, cfg) + int(tokens * (max(per_layer, logits) + rest))
    return int(tokens * (model.moe.num_layers * per_layer + logits + rest))


def pa_transient_bytes(model: Model, cfg: PlanConfig) -> int:
    """The PA target of one layer, computed under no_grad: every expert on every token.

    The local experts (and their frozen copies) run on the tokens of the whole expert group,
    so each rank's intermediates add up to 3 x T x (I-S) values, and the [parts, E, T, H] outputs
    exist twice (before and after the all-to-all back). With the frozen prior the shared expert
    and its frozen copy also run on the rank's own tokens (3 x T x S each); the self prior does
    not need the shared expert. Activation checkpointing does not recompute it (the replay reuses
    the prior's choice).
    """
    if cfg.prior == "none":
        return 0
    parts = 2 if cfg.prior == "frozen" else 1
    shared = 2 * 3 * model.moe.shared_size if cfg.prior == "frozen" else 0
    return int(tokens_of(cfg, model) * DTYPE_BYTES[cfg.dtype]
               * (3 * model.moe.routed_size * parts + shared
                  + 2 * parts * model.moe.num_experts * model.moe.hidden_size))


def estimate(model: Model, cfg: PlanConfig, choice: Choice) -> Estimate:
    """Bytes one rank holds at its peak (the rank that also writes the shared checkpoint on CPU)."""
    b = DTYPE_BYTES[cfg.dtype]
    world, ep = cfg.gpus, choice.ep_size
    experts_local = model.expert_params // ep
    dense_trainable = model.router_params + model.shared_expert_params  # data parallel: on every rank
    trainable_local = experts_local + dense_trainable
    # ZeRO partitions expert state over the expert-data-parallel group (world / ep ranks that hold
    # the same experts) and router and shared-expert state over all ranks.
    partition = experts_local / (world // ep) + dense_trainable / world
    overlap = cfg.overlap_comm if cfg.overlap_comm is not None else cfg.dtype == "bf16"
    # The gradient reduce buckets are torch.empty: a GPU reserves them whole, a CPU process only
    # touches as much as the gradients fill.
    bucket = min(cfg.reduce_bucket_size, trainable_local) if cfg.device == "cpu" else cfg.reduce_bucket_size
    buckets = bucket * b * (2 if overlap else 1)
    optimizer = 12 * partition  # fp32 master copy + Adam exp_avg, exp_avg_sq
    step = 8 * partition  # during the step: the partition's gradients in fp32 + one Adam temporary
    host = 0
    if choice.offload:
        grads = buckets  # gradients stream through the buckets to fp32 buffers in host memory
        host = int(optimizer + step)
        optimizer = step = 0
    elif choice.zero == 1:
        # Every rank keeps full gradients until the step, then copies its partition out. On CPU
        # the bucket reuses the pages of the gradients it absorbs.
        grads = (0 if cfg.device == "cpu" else buckets) + trainable_local * b + partition * b
    else:
        grads = buckets + partition * b  # the bucket + only this rank's gradient partition
    runtime = (parse_memory(cfg.runtime_memory, "--runtime-memory") if cfg.runtime_memory is not None
               else CPU_RUNTIME_BYTES if cfg.device == "cpu" else GPU_RUNTIME_BYTES)
    if cfg.device == "cpu":
        # Saving a checkpoint clones (to host memory, which is the device here) the shared weights
        # on the writer rank and every rank's optimizer partition; glibc keeps the heap it grew.
        runtime += max((model.shared_params + model.shared_expert_params) * b, optimizer)
    # The frozen prior keeps a copy of the local experts and of the shared expert.
    teacher = (experts_local + model.shared_expert_params) * b if cfg.prior == "frozen" else 0
    pa_transient = pa_transient_bytes(model, cfg)
    activations = activation_bytes(model, cfg, choice.activation_checkpointing)
    forward_backward = None
    if choice.activation_checkpointing:  # the PA target is computed in the forward, the recompute in the backward
        kept = checkpoint_bytes(model, cfg)
        forward_backward = kept + max(pa_transient, activations - kept)
    # train --teacher: every rank holds the whole dense model (the FFNs = all experts + the shared expert).
    distill_teacher = (model.shared_params + model.expert_params + model.shared_expert_params) * b if cfg.distill else 0
    parts = {
        "frozen_weights": model.shared_params * b,
        "experts": trainable_local * b,
        "pa_teacher": teacher + pa_transient,
        "distill_teacher": distill_teacher,
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "optimizer_step": int(step),
        "activations": activations,
        "runtime": int(runtime),
    }
    # Each rank reads the shared weights, its experts and (frozen prior) their teacher copy into host
    # memory before DeepSpeed moves the model to its GPU.
    load = model.shared_params * b + trainable_local * b + teacher + distill_teacher
    return Estimate(choice, parts, host, load if cfg.device == "gpu" else 0, pa_transient,
                    forward_backward=forward_backward)


def parse_memory(text: str, flag: str) -> int:
    """'80GB', '80GiB', '512MB' -> bytes; GB and MB count in powers of two (as GPU memory is sold)."""
    t = text.strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1, "T": 2**40, "G": 2**30, "M": 2**20}
    example = "80GB, 40GiB or 512MB"
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return size_bytes(t[: -len(unit)], units[unit], example)  # 1e400GB: too large, not OverflowError
            except ValueError as err:
                raise UserError(f"{flag} {text!r}: {err}") from None
    raise UserError(f"{flag} {text!r}: expected a size like {example}")


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: Model
    budget: int
    estimates: list[Estimate]
    recommended: Estimate | None
    smallest: Estimate
    hints: list[str]


def ranks_per_node(cfg: PlanConfig) -> int:
    return cfg.gpus_per_node or min(cfg.gpus, 8)


def host_per_node(e: Estimate, cfg: PlanConfig) -> int:
    """Host memory of one node's ranks at their peak: loading the weights, or the offloaded optimizer."""
    return max(e.host_offload, e.host_load) * ranks_per_node(cfg)


def candidate_choices(model: Model, cfg: PlanConfig) -> list[Choice]:
    eps = [cfg.ep_size] if cfg.ep_size else [d for d in range(1, model.moe.num_experts + 1)
                                             if model.moe.num_experts % d == 0 and cfg.gpus % d == 0]
    zeros = [cfg.zero] if cfg.zero else [1, 2]
    offloads = [cfg.offload] if cfg.offload is not None else [False] if cfg.device == "cpu" else [False, True]
    ckpts = [cfg.activation_checkpointing] if cfg.activation_checkpointing is not None else [False, True]
    # ZeRO-Offload moves the optimizer of a stage-2 partition to the host; stage 1 is not planned with it.
    return [Choice(ep, z, off, ckpt) for off in offloads for ckpt in ckpts for ep in eps for z in zeros
            if not (off and z == 1)]


MAX_PLANNED_EXPERTS = PLAN_WORDING.valid_to  # the E plan suggests, from 2 up to this


def converted_problems(cfg: PlanConfig, model: Model) -> list[str]:
    """The flags that contradict a converted model's own shape."""
    if not model.converted:
        return []
    problems = []
    for flag, letter, given, own in (("--num-experts", "E", cfg.num_experts, model.moe.num_experts),
                                     ("--top-k", "k", cfg.top_k, model.moe.top_k)):
        if given not in (None, own):
            problems.append(f"{flag} {given}: {model.name} is converted with {letter}={own}; drop the flag "
                            "(or plan from the dense model)")
    if cfg.shared_neurons is not None:
        problems.append(f"--shared-neurons {cfg.shared_neurons}: {model.name} is converted with a shared expert of "
                        f"S={model.moe.shared_size} neurons; drop the flag (or plan from the dense model)")
    return problems


def make_plan(cfg: PlanConfig) -> Plan:
    try:
        model, problems = model_of(cfg), []
    except UserError as err:  # reported with every other flag's problem
        model, problems = None, [str(err)]
    cfg = cfg.validate(model, problems)
    budget = parse_memory(cfg.gpu_memory, "--gpu-memory")
    estimates = [estimate(model, cfg, c) for c in candidate_choices(model, cfg)]  # never empty: ep_size 1 divides all
    host_budget = parse_memory(cfg.host_memory, "--host-memory") if cfg.host_memory else None
    for e in estimates:
        e.fits = e.total <= budget and (host_budget is None or host_per_node(e, cfg) <= host_budget)
    # Preference among those that fit, fastest first: no offload (the optimizer step on the host is
    # the slowest), no activation checkpointing (one more forward of compute), then the smallest
    # ep_size (least all-to-all traffic), then ZeRO-2 over ZeRO-1 (same traffic, less memory).
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: (
        e.choice.offload, e.choice.activation_checkpointing, e.choice.ep_size, -e.choice.zero))
    smallest = min(estimates, key=lambda e: (not e.fits, e.total))
    return Plan(model, budget, estimates, fitting[0] if fitting else None, smallest,
                hints(model, cfg, smallest, budget))


def hints(model: Model, cfg: PlanConfig, best: Estimate, budget: int) -> list[str]:
    """What would make the smallest configuration fit, when it does not."""
    if best.total <= budget:
        return []
    out = []
    if cfg.prior == "frozen":
        saved = best.parts["pa_teacher"] - estimate(model, replace(cfg, prior="self"), best.choice).parts["pa_teacher"]
        out.append(f"--prior self keeps no frozen expert copy: saves {saved / GiB:.1f} GiB")
    if cfg.distill:
        saved = best.total - estimate(model, replace(cfg, distill=False), best.choice).total
        out.append(f"training without --teacher (plan without --distill) saves {saved / GiB:.1f} GiB")
    if not best.choice.activation_checkpointing and cfg.activation_checkpointing is None:
        with_ckpt = estimate(model, cfg, replace(best.choice, activation_checkpointing=True))
        out.append(f"--activation-checkpointing: saves {(best.total - with_ckpt.total) / GiB:.1f} GiB")
    activations = best.parts["activations"]
    if activations > best.total - budget:
        out.append(f"a shorter --seq-len or --micro-batch-size: activations are {activations / GiB:.1f} GiB")
    if not cfg.offload and not best.choice.offload:
        out.append("--offload moves the optimizer state to host memory")
    for gpus in (2 * cfg.gpus, 4 * cfg.gpus, 8 * cfg.gpus):
        trial = replace(cfg, gpus=gpus, ep_size=None)
        if min(estimate(model, trial, c).total for c in candidate_choices(model, trial)) <= budget:
            out.append(f"--gpus {gpus} would fit")
            break
    if best.choice.ep_size == model.moe.num_experts:
        more = [e for e in model.moe.valid_num_experts(2, MAX_PLANNED_EXPERTS)
                if e > model.moe.num_experts and e % model.moe.num_experts == 0]
        out.append(f"more experts (--num-experts {more[0] if more else 2 * model.moe.num_experts}"
                   f"{', converting the dense model again' if model.converted else ''}) allow ep_size above "
                   f"E={model.moe.num_experts}")
    return out


# ----------------------------------------------------------------------------- output


HEADERS = {"frozen_weights": "frozen", "experts": "experts", "pa_teacher": "teacher", "distill_teacher": "distil",
           "gradients": "grads", "optimizer": "optim", "optimizer_step": "step", "activations": "activ",
           "runtime": "runtime"}


def ds_config_for(choice: Choice, cfg: PlanConfig) -> str:
    if choice.offload:
        return "ds_configs/zero2_offload_bf16.json"
    return f"ds_configs/zero{choice.zero}{'_bf16' if cfg.dtype == 'bf16' else ''}.json"


def report(plan: Plan, cfg: PlanConfig) -> str:
    s = plan.model
    columns = [k for k in HEADERS if k != "distill_teacher" or cfg.distill]
    unit = "process" if cfg.device == "cpu" else "GPU"
    shared_expert = (f", shared expert S={s.moe.shared_size} ({s.shared_expert_params / 1e9:.2f}B, data parallel)"
                     if s.moe.shared_size else "")
    lines = [f"model {s.name}: {s.total_params / 1e9:.2f}B params ({s.shared_params / 1e9:.2f}B shared, "
             f"{s.expert_params / 1e9:.2f}B in experts), {s.moe.num_layers} layers, E={s.moe.num_experts}, "
             f"k={s.moe.top_k}, {s.moe.routing} routing{shared_expert}",
             f"run: {cfg.gpus} ranks, {cfg.dtype}, seq_len {seq_len_of(cfg, s)} x micro-batch {cfg.micro_batch_size}, "
             f"prior {cfg.prior}; budget {plan.budget / GiB:.1f} GiB per {unit}",
             "",
             f"{'GiB per ' + unit:<26}" + "".join(f"{HEADERS[k]:>9}" for k in columns) + f"{'total':>9}  fits"]
    for e in plan.estimates:
        row = f"{e.choice.label():<26}" + "".join(f"{e.parts[k] / GiB:9.2f}" for k in columns)
        row += f"{e.total / GiB:9.2f}  {'yes' if e.fits else 'no'}"
        if cfg.device == "gpu":
            row += f"  host {host_per_node(e, cfg) / GiB:.0f}/node"
        lines.append(row)
    if cfg.device == "gpu":
        lines.append(f"host/node: host memory of the {ranks_per_node(cfg)} ranks of a node while "
                     "they load their weights, or hold the offloaded optimizer state"
                     + ("" if cfg.host_memory else "; not checked without --host-memory"))
    lines.append("")
    if plan.recommended:
        r = plan.recommended
        lines.append(f"recommended: --ep-size {r.choice.ep_size}, ZeRO-{r.choice.zero}"
                     f"{' with optimizer offload' if r.choice.offload else ''}"
                     f"{' and activation checkpointing' if r.choice.activation_checkpointing else ''}"
                     f" (--ds-config {ds_config_for(r.choice, cfg)})"
                     f": {r.total / GiB:.1f} of {plan.budget / GiB:.1f} GiB per {unit}")
        lines += ["", *commands(plan, cfg, r.choice)]
    return "\n".join(lines)


def commands(plan: Plan, cfg: PlanConfig, choice: Choice) -> list[str]:
    """The convert (for a dense model) and launch commands of ``choice``; DATA and OUT are placeholders."""
    s = plan.model
    lines = []
    if s.converted:
        moe = cfg.model
    else:
        moe = f"runs/{Path(s.name).name}-moe-e{s.moe.num_experts}"
        dense = f"/path/to/{s.name}" if s.name in BUILTIN_MODELS else s.name
        shared = (f" --shared-neurons {cfg.shared_neurons} --calib-data CALIB.txt" if s.moe.shared_size else "")
        lines += ["convert:", f"  factorllm-ds convert --model {dense} --out {moe} --num-experts {s.moe.num_experts} "
                              f"--top-k {s.moe.top_k}{shared}"]
        if s.moe.shared_size:  # a calibrated conversion: its predicted time and GPU memory
            from factorllm_ds.convert_cost import PLAN_TOKENS, convert_cost, describe

            config = read_model_config(cfg.model)[1]
            lines += [f"  {describe(convert_cost(config, t, s.moe.shared_size, num_experts=s.moe.num_experts))}"
                      for t in PLAN_TOKENS]
    teacher = "" if not cfg.distill else f" --teacher {dense if not s.converted else 'DENSE_DIR'}"
    flags = (f"--seq-len {seq_len_of(cfg, s)} --micro-batch-size {cfg.micro_batch_size} --prior {cfg.prior}{teacher}"
             f"{' --activation-checkpointing' if choice.activation_checkpointing else ''}")
    ds = ds_config_for(choice, cfg)
    train_args = f"--model {moe} --data DATA.jsonl --out runs/OUT --ep-size {choice.ep_size} --ds-config {ds} {flags}"
    lines += ["train (the flags of every rank):", f"  factorllm-ds train {train_args}"]
    if cfg.device == "cpu":
        return lines + ["launch:", f"  DEVICE=cpu NPROC={cfg.gpus} launch/torchrun.sh {train_args}"]
    per_node = ranks_per_node(cfg)
    nodes = math.ceil(cfg.gpus / per_node)
    script = "slurm/train_multinode.sbatch" if nodes > 1 else "slurm/train_1node.sbatch"
    lines += ["sbatch:", f"  MODEL={moe} DATA=DATA.jsonl EP_SIZE={choice.ep_size} DS_CONFIG={ds} sbatch "
                         f"{f'--nodes={nodes} ' if nodes > 1 else ''}--gpus-per-node={per_node} {script} {flags}"]
    return lines


def no_fit_message(plan: Plan, cfg: PlanConfig) -> str:
    best, unit = plan.smallest, "process" if cfg.device == "cpu" else "GPU"
    host = f"{host_per_node(best, cfg) / GiB:.0f} GiB of host memory per node, above --host-memory {cfg.host_memory}"
    without_offload = [e.total for e in plan.estimates if not e.choice.offload]
    if best.total > plan.budget:
        msg = (f"nothing fits: the smallest requirement is {best.total / GiB:.1f} GiB per {unit} "
               f"({best.choice.label()}), above the {plan.budget / GiB:.1f} GiB of --gpu-memory {cfg.gpu_memory}")
    elif without_offload:  # from here on, only the host memory of offload was short
        msg = (f"nothing fits: {best.choice.label()} needs {best.total / GiB:.1f} GiB per {unit} but {host}; "
               f"without offload the smallest requirement is {min(without_offload) / GiB:.1f} GiB per {unit}")
    else:
        msg = f"nothing fits: {best.choice.label()} needs {host}"
    if plan.hints:
        msg += "\n  options: " + "; ".join(plan.hints)
    return msg


def model_json(model: Model) -> dict:
    """The model as --json has always printed it: its counts and shape, in one flat object."""
    moe = model.moe
    return {"name": model.name, "layers": moe.num_layers, "hidden": moe.hidden_size,
            "intermediate": moe.intermediate_size, "vocab": model.vocab, "num_experts": moe.num_experts,
            "top_k": moe.top_k, "routing": moe.routing, "shared_params": model.shared_params,
            "router_params": model.router_params, "expert_params": model.expert_params,
            "max_positions": model.max_positions, "converted": model.converted,
            "shared_intermediate": moe.shared_size, "shared_expert_params": model.shared_expert_params}


def as_json(plan: Plan, cfg: PlanConfig) -> dict:
    return {"model": model_json(plan.model), "budget_bytes": plan.budget,
            "estimates": [{**asdict(e.choice), "parts": e.parts, "total": e.total, "fits": e.fits,
                           "host_offload": e.host_offload, "host_load": e.host_load} for e in plan.estimates],
            "recommended": asdict(plan.recommended.choice) if plan.recommended else None,
            "commands": commands(plan, cfg, plan.recommended.choice) if plan.recommended else None,
            "smallest": {**asdict(plan.smallest.choice), "total": plan.smallest.total},
            "hints": plan.hints}


def run_command(cfg: PlanConfig) -> int:
    plan = make_plan(cfg)
    print(json.dumps(as_json(plan, cfg), indent=2) if cfg.json else report(plan, cfg))
    if plan.recommended is None:
        # 2, "bad input": the flags ask for more than the memory given (1 would say the tool crashed).
        print(f"factorllm-ds plan: {no_fit_message(plan, cfg)}", file=sys.stderr)
        return 2
    return 0
