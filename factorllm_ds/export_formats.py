"""The export formats: per ``--format``, a class that names and computes each layer's MLP
tensors, writes the config, and says what it cannot represent. ``FORMATS`` is the table;
``open_format`` checks a source against one. Tensors outside the MLP are the stage's business.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from factorllm_ds import keys, split
from factorllm_ds.config import fail_if
from factorllm_ds.gguf_convert import CONVERTER as GGUF_CONVERTER
from factorllm_ds.hf_io import TensorInfo
from factorllm_ds.layout import PARTITION_FILE, load_partition
from factorllm_ds.shape import part_shape
from factorllm_ds.sources import ExportSource

# FactorLLM tensor names: every key a FactorLLM checkpoint may hold, by role. Unknown keys raise.
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_SHARED_KEY = re.compile(r"mlp\.shared_expert\.(gate|up|down)_proj\.weight")

# The largest relative error allowed on each selected expert's weight when a hard-routed model is written
# to a standard MoE class, for any input (export --weight-tolerance; docs/serving.md). A guaranteed bound, so
# loose: on real text the weights stay far closer. A tighter one scales the router further down, and then
# fp32 softmax can no longer tell near-tied router scores apart: on SmolLM2, 1e-3 changed 5.7% of layer 0's
# expert choices, 0.05 0.4% (docs/serving.md).
WEIGHT_TOLERANCE = 0.05
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's converter writes without a calibration step


@dataclass(frozen=True)
class ExportOptions:
    """The settings a format may use besides its source (export's flags of the same names)."""

    weight_tolerance: float = WEIGHT_TOLERANCE
    gguf_type: str = "f16"
    llama_cpp: Path | None = None  # a llama.cpp tree holding convert_hf_to_gguf.py (None: the cached one)


def classify_moe_key(name: str) -> tuple[str, int | None]:
    """('global' | 'layer' | 'router' | 'expert' | 'shared' | 'ignored', layer) for a FactorLLM checkpoint key."""
    if name in keys.GLOBAL_PASSTHROUGH:
        return "global", None
    if keys.IGNORED.fullmatch(name):
        return "ignored", None
    m = _LAYER_KEY.fullmatch(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest in keys.LAYER_PASSTHROUGH:
            return "layer", layer
        if rest in ("mlp.router.weight", "mlp.router.bias"):
            return "router", layer
        if _EXPERT_KEY.fullmatch(rest):
            return "expert", layer
        if _SHARED_KEY.fullmatch(rest):
            return "shared", layer
    raise KeyError(name)


def structure_problems(source: ExportSource) -> list[str]:
    """Unknown keys, missing experts or routers, unequal expert sizes."""
    problems, present = [], set()
    for name in source.names():
        try:
            role, layer = classify_moe_key(name)
        except KeyError:
            problems.append(f"{source.description}: unknown tensor {name} (not a FactorLLM / "
                            f"{', '.join(keys.SUPPORTED_FAMILIES.values())} key); refusing to drop it")
            continue
        if layer is not None and not 0 <= layer < source.shape.num_layers:
            problems.append(f"{source.description}: tensor {name} for layer {layer}, but the config has "
                            f"{source.shape.num_layers} layers")
        present.add(name)
    for layer in range(source.shape.num_layers):
        need = [keys.ROUTER_WEIGHT.format(layer=layer)]
        need += [keys.expert_key(p, layer, e) for e in range(source.shape.num_experts) for p in keys.MLP_PARTS]
        need += [keys.shared_expert_key(p, layer) for p in keys.MLP_PARTS] if source.shape.shared_size else []
        missing = [n for n in need if n not in present]
        if missing:
            problems.append(f"{source.description}: layer {layer} lacks {missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            continue
        shapes = {tuple(source.info(keys.expert_key("gate", layer, e)).shape) for e in range(source.shape.num_experts)}
        if len(shapes) != 1:
            problems.append(f"{source.description}: layer {layer} has experts of different sizes {sorted(shapes)}")
    return problems


class ExportFormat(ABC):
    """One output format. The stage plans the folder with ``mlp_plan``, writes each layer's
    ``mlp_tensors`` in that order (one layer's experts in memory at a time), then ``save_config``.

    ``problems`` runs before anything is built; ``notes`` end up in the manifest.
    """

    def __init__(self, source: ExportSource, options: ExportOptions = ExportOptions()):
        self.source, self.shape = source, source.shape
        self.source_names = set(source.names())
        self.options = options
        self.notes: list[str] = []

    @classmethod
    def for_model(cls, source: ExportSource) -> type[ExportFormat]:
        """The concrete class for this model (a format may depend on the base family)."""
        return cls

    @classmethod
    def problems(cls, source: ExportSource) -> list[str]:
        """Why ``source`` cannot be written in this format (empty: it can). The reasons do not name the format:
        one class serves several ``--format`` values (qwen2-moe, and mixtral of a Qwen2 base), so
        :func:`open_format` prefixes the one the user gave."""
        return []

    @abstractmethod
    def mlp_plan(self, layer: int) -> list[TensorInfo]:
        """Name, shape and dtype of each output tensor of layer ``layer``'s MLP, in write order."""

    @abstractmethod
    def mlp_tensors(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for layer ``layer``'s MLP, as ``mlp_plan`` lists them."""

    @abstractmethod
    def save_config(self, folder: Path) -> None:
        """config.json and any other file the format needs beside the weights."""

    def extra_plan(self) -> list[TensorInfo]:
        """Tensors outside the layers that the format adds to the source's (written last)."""
        return []

    def extra_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for ``extra_plan``, in its order."""
        return iter(())

    def finish(self, folder: Path) -> None:  # noqa: B027 (optional step, nothing by default)
        """The last step inside the output folder, after the weights, config and side files (e.g. a GGUF file)."""


class RoutedFormat(ExportFormat):
    """A format that keeps router and experts one tensor each, under the source's names unless
    a subclass renames them, ``down_proj`` possibly transformed. A shared expert (an always-on
    dense part of the MLP) enters through ``shared_expert_plan`` and ``shared_expert_tensors``:
    by default copied as it is (formats without one refuse a model that has one).
    """

    def router_names(self, layer: int) -> dict[str, str]:
        """Source router tensor name -> output name."""
        names = (keys.ROUTER_WEIGHT.format(layer=layer), keys.ROUTER_BIAS.format(layer=layer))
        return {n: n for n in names if n in self.source_names}

    down_dtype: torch.dtype | None = None  # routed down_proj (and scaled router) dtype out (None: the source's)

    def expert_name(self, part: str, layer: int, expert: int) -> str:
        return keys.expert_key(part, layer, expert)

    def expert_down(self, down: torch.Tensor) -> torch.Tensor:
        return down

    def shared_expert_plan(self, layer: int) -> list[TensorInfo]:
        if not self.shape.shared_size:
            return []
        return [self.source.info(keys.shared_expert_key(p, layer)) for p in keys.MLP_PARTS]

    def shared_expert_tensors(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self.shared_expert_plan(layer):
            yield info.name, self.source.shared_tensor(info.name)

    def mlp_plan(self, layer: int) -> list[TensorInfo]:
        info = self.source.info
        plan = [replace(info(name), name=out) for name, out in self.router_names(layer).items()]
        plan += [replace(info(keys.expert_key(part, layer, e)), name=self.expert_name(part, layer, e),
                         **({"dtype": self.down_dtype} if part == "down" and self.down_dtype else {}))
                 for e in range(self.shape.num_experts) for part in keys.MLP_PARTS]
        return plan + self.shared_expert_plan(layer)

    def router_tensor(self, layer: int, name: str) -> torch.Tensor:
        """The output tensor for the source router tensor ``name`` (by default unchanged)."""
        return self.source.shared_tensor(name)

    def mlp_tensors(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        for name, out in self.router_names(layer).items():
            yield out, self.router_tensor(layer, name)
        for e, tensors in enumerate(self.source.expert_tensors(layer)):
            for part, tensor in zip(keys.MLP_PARTS, tensors):
                yield self.expert_name(part, layer, e), self.expert_down(tensor) if part == "down" else tensor
        yield from self.shared_expert_tensors(layer)


class FactorLLMFormat(RoutedFormat):
    """The FactorLLM folder itself (config, model code, partition file), e.g. to turn a DeepSpeed
    training run back into a folder ``from_pretrained`` loads."""

    def save_config(self, folder: Path) -> None:
        from factorllm_ds.hf_model import AUTO_MAP, MODEL_CODE_DIR, MODEL_CODE_FILES

        config = dict(self.source.config, architectures=["FactorLLMForCausalLM"], auto_map=dict(AUTO_MAP))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in MODEL_CODE_FILES:
            shutil.copy2(MODEL_CODE_DIR / name, folder / name)
        if self.source.partition_file is not None:
            shutil.copy2(self.source.partition_file, folder / PARTITION_FILE)


def fold_scale(down: torch.Tensor, scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """s * W_down, computed in fp32 and cast to ``dtype`` (default: back to its own; exact when s is a power of
    two, e.g. E = 4 or 8, or when ``dtype`` is fp32 and the source is narrower)."""
    dtype = dtype or down.dtype
    if scale == 1.0:
        return down.to(dtype)
    return (down.float() * scale).to(dtype)


def is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def router_logit_spread_bound(router_EH: torch.Tensor, norm_H: torch.Tensor) -> float:
    """An upper bound on max_i z_i - min_j z_j over every input of the router z = W x, where x is an RMSNorm
    output ``n * norm_H`` with ||n|| <= sqrt(H) (RMSNorm divides by the root mean square): for each pair,
    (W_i - W_j) . (n * norm) <= ||(W_i - W_j) * norm|| sqrt(H) (Cauchy-Schwarz)."""
    w_EH = router_EH.double() * norm_H.double()
    sq_E = (w_EH * w_EH).sum(dim=1)
    dist2_EE = (sq_E[:, None] + sq_E[None, :] - 2 * w_EH @ w_EH.T).clamp_min(0)
    return float(dist2_EE.max().sqrt()) * router_EH.shape[1] ** 0.5


def uniform_router_scale(spread: float, tolerance: float) -> float:
    """The largest power of two a with exp(a * spread) - 1 <= tolerance: scaled by a, softmax weights over any
    set of experts are within ``tolerance`` (relative) of equal, since each is a ratio of exponentials whose
    exponents lie within a * spread of one another. A power of two scales the router's logits exactly, so
    the ranking, and the experts each token selects, is the router's own (ties aside)."""
    if spread <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(math.log1p(tolerance) / spread))


def _sliding_layers(text: dict) -> list[str]:
    return [t for t in (text.get("layer_types") or []) if t == "sliding_attention"]


# Base-config fields that carry over to the MoE config unchanged (attention, norms, rope, tokens).
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                  "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                  "attention_dropout", "rope_parameters", "dtype")


GROUPED_MM_NEURONS = 8  # 16-byte rows in bf16/fp16: what torch's grouped_mm asks of every expert's stride


class StandardMoEFormat(RoutedFormat):
    """``--format mixtral``: the standard HF MoE class of the base family (``BY_FAMILY``), loadable
    by plain transformers (and vLLM, llama.cpp, ...) without our code. Those classes weight each
    selected expert by its softmax probability, renormalized over the top k (``norm_topk``) or not:

    - ``softmax`` routing is exactly that, with the combine scale s folded into every ``down_proj``.
    - ``hard`` routing (every selected expert weighs s) is written with the router scaled by a power of
      two a per layer, small enough that the softmax weights are equal within ``weight_tolerance``
      (``uniform_router_scale``), and s * k (renormalized) or s * E (not) folded into ``down_proj``.
      Scaling by a power of two keeps the router's ranking, so each token selects the same experts
      unless two router scores are within about 2^-24 / a of each other (a near tie). With k = 1 and
      renormalization the weight is exactly 1 and the router is kept as it is.

    A router bias cannot be represented (the router input has no constant component): a bias of zeros
    is dropped, any other is refused. Expert names are ours (Qwen-MoE's); the router is ``mlp.gate``.
    """

    model_type = architecture = "?"
    moe_block = "mlp"  # the MoE module's name inside a decoder layer
    has_shared_expert = False

    def __init__(self, source: ExportSource, options: ExportOptions = ExportOptions()):
        super().__init__(source, options)
        f = source.shape
        self.uniform = f.routing == "hard" and not (f.top_k == 1 and self.norm_topk())
        self.down_scale = f.scale * ((f.top_k if self.norm_topk() else f.num_experts) if self.uniform else 1)
        self.router_scales = {layer: self._router_scale(layer) for layer in range(f.num_layers)} if self.uniform \
            else {}
        down_dtype = self.down_dtype or source.info(keys.expert_key("down", 0, 0)).dtype
        if not is_power_of_two(self.down_scale) and down_dtype != torch.float32:
            self.notes.append(f"the fold of {self.down_scale:g} (not a power of two) rounds each routed down_proj "
                              f"weight once more to {str(down_dtype).removeprefix('torch.')}")
        if self.down_scale != 1.0:
            self.notes.append(f"{self.down_scale:g} folded into every routed expert's down_proj"
                              + (f" (combine scale s={f.scale:g} times "
                                 f"{'k' if self.norm_topk() else 'E'}, the inverse of each equal weight)"
                                 if self.uniform else f" (combine scale s={f.scale:g})"))
        if self.uniform:
            low, high = min(self.router_scales.values()), max(self.router_scales.values())
            self.notes.append(
                f"hard routing written as softmax routing: each layer's router scaled by a power of two "
                f"(2^{math.log2(high):g} .. 2^{math.log2(low):g}), so every selected expert's weight is s within a "
                f"relative {options.weight_tolerance:g} for any input (export --weight-tolerance); the experts "
                "selected are the router's own except where two router scores tie within about "
                f"{2.0 ** -24 / low:.2g}")
        if f.router_bias:
            self.notes.append("the router bias is all zeros and was dropped")
        if f.expert_size % GROUPED_MM_NEURONS:
            self.notes.append(
                f"warning: each routed expert has {f.expert_size} neurons; transformers' grouped matmul, which its MoE "
                f"classes use, needs each expert's rows to span a multiple of 16 bytes ({GROUPED_MM_NEURONS} neurons "
                "in bf16/fp16), and may stop with 'strides should be multiple of 16 bytes' (measured with 6 neurons "
                "in fp32: bench/RESULTS.md \"Finer experts\"). Convert with an E that gives a multiple of "
                f"{GROUPED_MM_NEURONS} neurons, or serve with --format factorllm")
            print(f"export: {self.notes[-1]}", file=sys.stderr)
        router_dtype = self.down_dtype or source.info(keys.ROUTER_WEIGHT.format(layer=0)).dtype
        if self.uniform and router_dtype == torch.float16:
            self.notes.append("warning: the scaled router is stored in float16, whose small numbers lose precision "
                              "(subnormals); load the model in bfloat16 or float32 for the router's own choices")

    def norm_topk(self) -> bool:
        """Whether the class renormalizes the top-k probabilities (Mixtral and Qwen3-MoE always do)."""
        return True

    def _router_scale(self, layer: int) -> float:
        router = self.source.shared_tensor(keys.ROUTER_WEIGHT.format(layer=layer))
        norm = self.source.shared_tensor(keys.LAYER.format(layer=layer) + "post_attention_layernorm.weight")
        return uniform_router_scale(router_logit_spread_bound(router, norm), self.options.weight_tolerance)

    @classmethod
    def for_model(cls, source: ExportSource) -> type[ExportFormat]:
        return BY_FAMILY.get(source.base_type, cls)

    @classmethod
    def problems(cls, source: ExportSource) -> list[str]:
        refusals = cls.refusals(source)
        if not refusals:
            return []
        named = f" ({cls.architecture})" if cls.architecture != "?" else ""
        return [f"{source.description} cannot be written as a standard Hugging Face MoE checkpoint{named}:"
                "\n      * " + "\n      * ".join(refusals)
                + "\n    Formats that represent it exactly: --format factorllm (our HF folder, "
                "trust_remote_code or `import factorllm_ds`), and --format dense (all experts active, weight 1)."]

    @classmethod
    def refusals(cls, source: ExportSource) -> list[str]:
        """Why this model's function has no standard HF MoE equivalent (empty list: it has)."""
        problems = []
        if source.base_type not in BY_FAMILY:
            problems.append(f"base model_type {source.base_type!r} has no standard Hugging Face MoE counterpart here "
                            f"(supported: {', '.join(f'{b} -> {c.architecture}' for b, c in BY_FAMILY.items())})")
        if source.shape.routing not in ("hard", "softmax"):
            problems.append(f"unknown routing {source.shape.routing!r}")
        if source.shape.router_bias and any(
                source.shared_tensor(keys.ROUTER_BIAS.format(layer=layer)).any()
                for layer in range(source.shape.num_layers) if keys.ROUTER_BIAS.format(layer=layer) in source.names()):
            problems.append("the router has a bias that is not zero (r = W x + b, trained or fitted): Mixtral / "
                            "Qwen-MoE routers are W x only, and a bias cannot be folded into W (the router input has "
                            "no constant component). For a native export, convert with --no-router-bias (and train "
                            "that model); docs/serving.md gives the measured cost")
        if source.shape.shared_size and not cls.has_shared_expert:
            problems.append(f"the model has an always-on shared expert ({source.shape.shared_size} neurons per layer) "
                            f"and {cls.architecture} has none; --format qwen2-moe has one (Qwen2MoeForCausalLM)")
        override = source.config.get("router_override", "learned")
        if override != "learned":
            problems.append(f"config.json has router_override={override!r} (an evaluation-time "
                            "choice); a standard MoE always uses its learned router: set it to 'learned' first")
        return problems

    def router_names(self, layer: int) -> dict[str, str]:
        out = keys.LAYER.format(layer=layer) + f"{self.moe_block}.gate.weight"
        return {keys.ROUTER_WEIGHT.format(layer=layer): out}

    def router_tensor(self, layer: int, name: str) -> torch.Tensor:
        return fold_scale(super().router_tensor(layer, name), self.router_scales.get(layer, 1.0), self.down_dtype)

    def mlp_plan(self, layer: int) -> list[TensorInfo]:
        plan = super().mlp_plan(layer)
        routers = set(self.router_names(layer).values())
        return [replace(i, dtype=self.down_dtype) if i.name in routers and self.down_dtype else i for i in plan]

    def expert_down(self, down: torch.Tensor) -> torch.Tensor:
        return fold_scale(down, self.down_scale, self.down_dtype)

    def config_fields(self, expert_size: int) -> dict:
        """The config of the MoE class as keyword arguments; subclasses add their own."""
        text = self.source.text  # head_dim None: the class's default
        fields = {k: text[k] for k in _SHARED_FIELDS if k in text and not (k == "head_dim" and text[k] is None)}
        return fields | dict(num_experts_per_tok=self.shape.top_k, output_router_logits=False)

    def save_config(self, folder: Path) -> None:
        """MixtralConfig / Qwen2MoeConfig / Qwen3MoeConfig equal in function to the FactorLLM model."""
        from transformers import AutoConfig

        expert_size = self.source.info(keys.expert_key("gate", 0, 0)).shape[0]
        config = AutoConfig.for_model(self.model_type, **self.config_fields(expert_size))
        config.architectures = [self.architecture]
        config.save_pretrained(folder)


class MixtralFormat(StandardMoEFormat):
    model_type, architecture, moe_block = "mixtral", "MixtralForCausalLM", "block_sparse_moe"

    @classmethod
    def refusals(cls, source: ExportSource) -> list[str]:
        return super().refusals(source) + [
            f"the {source.base_type} base has {flag}=true; MixtralForCausalLM has no such biases"
            for flag in ("attention_bias", "mlp_bias") if source.text.get(flag)]

    def expert_name(self, part: str, layer: int, expert: int) -> str:
        # The legacy per-expert names: what every Mixtral consumer reads.
        w = {"gate": "w1", "up": "w3", "down": "w2"}[part]
        return keys.LAYER.format(layer=layer) + f"{self.moe_block}.experts.{expert}.{w}.weight"

    def config_fields(self, expert_size: int) -> dict:
        # LLaMA has no sliding window; Mistral applies its window to every layer, as Mixtral does.
        text = self.source.text
        return super().config_fields(expert_size) | dict(
            intermediate_size=expert_size, num_local_experts=self.shape.num_experts, router_jitter_noise=0.0,
            sliding_window=text.get("sliding_window") if self.source.base_type == "mistral" else None)


class _QwenMoEFormat(StandardMoEFormat):
    def config_fields(self, expert_size: int) -> dict:
        f, text = self.shape, self.source.text
        return super().config_fields(expert_size) | dict(
            moe_intermediate_size=expert_size, num_experts=f.num_experts, norm_topk_prob=self.norm_topk(),
            decoder_sparse_step=1, mlp_only_layers=[],
            intermediate_size=expert_size * f.num_experts,  # used by mlp_only_layers only
            use_sliding_window=bool(_sliding_layers(text)), sliding_window=text.get("sliding_window"),
            max_window_layers=text.get("max_window_layers", f.num_layers))


class Qwen2MoeFormat(_QwenMoEFormat):
    """Qwen2-MoE: routed experts plus its ``shared_expert``, which adds sigmoid(shared_expert_gate . x) times its
    output. The gate is a tiny constant row (``shared_gate_value``): sigmoid of a number that small is 1/2 in
    floating point, so 2 is folded into the shared ``down_proj`` and the sum is ours (weight 1); not zero, because
    llama.cpp computes that sigmoid as silu(y) / y, which is 0/0 at y = 0. Without a shared expert it gets one of
    size 0, which adds exactly 0. The top-k probabilities are renormalized (``norm_topk_prob``), so a hard-routed
    model folds s k, a power of two for the usual k, exact in bf16 too. ``lm_head`` is always written (llama.cpp's
    qwen2moe needs it even when the base ties it).
    Qwen2 bases, and LLaMA / Mistral bases whose attention Qwen2 reproduces (no o_proj bias, no sliding window),
    via --format qwen2-moe."""

    model_type, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    has_shared_expert = True

    @classmethod
    def refusals(cls, source: ExportSource) -> list[str]:
        problems = super().refusals(source)
        if any(name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for name in source.names()):
            problems.append(f"the {source.base_type} base normalizes queries and keys (q_norm / k_norm), which "
                            "Qwen2-MoE's attention lacks; --format mixtral writes Qwen3MoeForCausalLM for a Qwen3 "
                            "base (it has no shared expert: convert without --shared-neurons for it)")
        if source.base_type != "qwen2":
            if source.text.get("attention_bias") or source.text.get("mlp_bias"):
                problems.append(f"the {source.base_type} base has attention or MLP biases that Qwen2-MoE lacks")
            if source.text.get("sliding_window") is not None:
                problems.append(f"the {source.base_type} base uses a sliding window on every layer; Qwen2-MoE "
                                "configures windows differently")
        return problems

    def config_fields(self, expert_size: int) -> dict:
        fields = super().config_fields(expert_size) | dict(shared_expert_intermediate_size=self.shape.shared_size,
                                                           qkv_bias=self.source.base_type == "qwen2",
                                                           tie_word_embeddings=False)
        if self.source.text.get("layer_types"):
            fields["layer_types"] = list(self.source.text["layer_types"])
        return fields

    def extra_plan(self) -> list[TensorInfo]:
        if "lm_head.weight" in self.source_names:
            return []
        return [replace(self.source.info("model.embed_tokens.weight"), name="lm_head.weight")]

    def extra_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self.extra_plan():  # the tied head, written out
            yield info.name, self.source.shared_tensor("model.embed_tokens.weight")

    def shared_expert_plan(self, layer: int) -> list[TensorInfo]:
        p = keys.LAYER.format(layer=layer) + "mlp.shared_expert"
        router = self.source.info(keys.ROUTER_WEIGHT.format(layer=layer))
        gate, down = (self.source.info(keys.expert_key(part, layer, 0)) for part in ("gate", "down"))
        hidden, size = router.shape[1], self.shape.shared_size
        dtypes = {"gate": gate.dtype, "up": gate.dtype, "down": down.dtype}
        return [TensorInfo(f"{p}.{part}_proj.weight", part_shape(part, size, hidden), dtypes[part])
                for part in keys.MLP_PARTS] + [TensorInfo(p + "_gate.weight", (1, hidden), router.dtype)]

    def shared_expert_tensors(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        for info, part in zip(self.shared_expert_plan(layer), (*keys.MLP_PARTS, "shared_expert_gate")):
            if part in keys.MLP_PARTS:  # an empty tensor for a size-0 shared expert
                tensor = self.source.shared_tensor(keys.shared_expert_key(part, layer)) if self.shape.shared_size \
                    else torch.zeros(info.shape, dtype=info.dtype)
                yield info.name, fold_scale(tensor, 2.0) if part == "down" else tensor  # sigmoid(~0) = 1/2
            else:
                yield info.name, torch.full(info.shape, shared_gate_value(info.dtype), dtype=info.dtype)


def shared_gate_value(dtype: torch.dtype) -> float:
    """The constant of Qwen2-MoE's shared-expert gate row: the smallest power of two ``dtype`` holds above
    2^-40, so that the gate's input y is tiny (sigmoid(y) = 1/2 to well within fp32) but not 0."""
    return max(2.0 ** -40, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps) \
        if dtype.is_floating_point else 0.0


class Qwen2MoeTarget(StandardMoEFormat):
    """``--format qwen2-moe``: Qwen2MoeForCausalLM whatever the base family (it has a shared expert)."""

    @classmethod
    def for_model(cls, source: ExportSource) -> type[ExportFormat]:
        return Qwen2MoeFormat


class GGUFFormat(Qwen2MoeFormat):
    """``--format gguf``: ``model.gguf``, written by llama.cpp's own converter (``gguf_convert``) from a Qwen2-MoE
    folder made for it (then removed), as llama.cpp's ``qwen2moe`` architecture. That architecture never
    renormalizes the top-k probabilities, so a hard-routed model folds s E into each routed ``down_proj``,
    in fp32 (the converter casts to ``--gguf-type`` once); softmax routing cannot be represented, and a model
    without a shared expert is refused too (qwen2moe requires one). --format qwen2-moe takes both."""

    down_dtype = torch.float32

    def norm_topk(self) -> bool:
        return False

    @classmethod
    def refusals(cls, source: ExportSource) -> list[str]:
        problems = super().refusals(source)
        if source.shape.routing == "softmax":
            problems.append("routing is 'softmax' (top-k probabilities renormalized), which llama.cpp's qwen2moe "
                            "does not do; convert with --routing hard (the default) for a GGUF, or use --format "
                            "qwen2-moe for transformers / vLLM")
        if not source.shape.shared_size:
            problems.append("the model has no shared expert, which llama.cpp's qwen2moe requires; convert with "
                            "--shared-neurons (e.g. 0.25, the recommended structure)")
        rope = source.text.get("rope_parameters") or source.text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            problems.append(f"the base scales its rotary embeddings (rope_type {rope_type!r}), which llama.cpp's "
                            "qwen2moe is not known here to read back; --format qwen2-moe carries it for "
                            "transformers / vLLM")
        return problems

    def finish(self, folder: Path) -> None:
        import subprocess

        from factorllm_ds.errors import UserError

        tree = self.options.llama_cpp
        if tree is None:
            from factorllm_ds.assets import llama_cpp_converter

            try:
                tree = llama_cpp_converter()
            except RuntimeError as err:
                raise UserError(f"--format gguf: {err} Or pass --llama-cpp LLAMA_CPP_DIR (a llama.cpp "
                                "checkout).") from err
        out = folder / GGUF_FILE
        cmd = [sys.executable, "-m", "factorllm_ds.gguf_convert", str(tree), str(folder),
               "--outtype", self.options.gguf_type, "--outfile", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n      ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise UserError(f"--format gguf: llama.cpp's converter ({tree / GGUF_CONVERTER}) failed on "
                            f"the Qwen2-MoE folder; nothing was written. Its last lines:\n      {tail}\n    "
                            "A newer llama.cpp (--llama-cpp DIR) may know this tokenizer; --format qwen2-moe "
                            "writes the folder alone")
        for path in folder.iterdir():  # the Qwen2-MoE folder made for the converter (this export's own temp folder)
            if path.is_file() and path.name != GGUF_FILE and not path.name.startswith("."):
                path.unlink()
        self.notes.append(f"{GGUF_FILE} ({self.options.gguf_type}) written by llama.cpp's convert_hf_to_gguf.py "
                          f"from {tree}, architecture qwen2moe")


GGUF_FILE = "model.gguf"


class GGUFTarget(StandardMoEFormat):
    """``--format gguf``: :class:`GGUFFormat` whatever the base family."""

    @classmethod
    def for_model(cls, source: ExportSource) -> type[ExportFormat]:
        return GGUFFormat


class Qwen3MoeFormat(_QwenMoEFormat):
    model_type, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"

    @classmethod
    def refusals(cls, source: ExportSource) -> list[str]:
        sliding = _sliding_layers(source.text)
        partial = sliding and len(sliding) != len(source.text.get("layer_types") or [])
        return super().refusals(source) + (["the Qwen3 base uses sliding-window attention on some layers only; "
                                           "Qwen3MoE applies its window to every layer or none"] if partial else [])

    def config_fields(self, expert_size: int) -> dict:
        return super().config_fields(expert_size) | dict(
            attention_bias=bool(self.source.text.get("attention_bias", False)))


# The standard HF MoE class for each base family.
BY_FAMILY: dict[str, type[StandardMoEFormat]] = {
    "llama": MixtralFormat, "mistral": MixtralFormat, "qwen2": Qwen2MoeFormat, "qwen3": Qwen3MoeFormat}


class DenseFormat(ExportFormat):
    """The base architecture, each layer's experts concatenated back in the partition's neuron order.

    It is the MoE with *all experts active, each with weight 1* (hard routing, k = E, scale 1):
    for a freshly converted model the original dense model, bit for bit; for a trained model a
    different function from the routed MoE that was trained (the router and s are dropped).
    """

    def __init__(self, source: ExportSource, options: ExportOptions = ExportOptions()):
        super().__init__(source, options)
        self.notes.append("dense = the MoE with all experts active, each with weight 1 (router and combine scale "
                          "dropped)")
        if source.partition_file is not None:
            self.partitions = load_partition(source.partition_file)
            fail_if(self._partition_problems(), f"export to dense: cannot export {source.description}")
        else:
            self.notes.append(f"no {PARTITION_FILE} in the source: experts concatenated in expert order (the same "
                              "function as the original neuron order, but tensors differ from the original checkpoint)")
            print(f"export: warning: {self.notes[-1]}", file=sys.stderr)
            self.partitions = {layer: torch.arange(self._neurons(layer)) for layer in range(source.shape.num_layers)}

    @classmethod
    def problems(cls, source: ExportSource) -> list[str]:
        return [] if source.base_type in keys.SUPPORTED_FAMILIES else [
            f"unsupported base model_type {source.base_type!r}"]

    def _partition_problems(self) -> list[str]:
        problems = []
        for layer in range(self.shape.num_layers):
            perm, inter = self.partitions.get(layer), self._neurons(layer)
            if perm is None or perm.numel() != inter or not torch.equal(torch.sort(perm).values, torch.arange(inter)):
                problems.append(f"{self.source.partition_file}: no valid permutation of {inter} neurons for "
                                f"layer {layer}")
        return problems

    def _neurons(self, layer: int) -> int:
        """The dense MLP's intermediate size: every expert's neurons and the shared expert's."""
        return self.source.info(keys.expert_key("gate", layer, 0)).shape[0] * self.shape.num_experts \
            + self.shape.shared_size

    def mlp_plan(self, layer: int) -> list[TensorInfo]:
        gate, down = (self.source.info(keys.expert_key(part, layer, 0)) for part in ("gate", "down"))
        inter, hidden = self._neurons(layer), gate.shape[1]
        dtypes = {"gate": gate.dtype, "up": gate.dtype, "down": down.dtype}
        return [TensorInfo(keys.dense_mlp_key(part, layer), part_shape(part, inter, hidden), dtypes[part])
                for part in keys.MLP_PARTS]

    def mlp_tensors(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        experts = self.source.expert_tensors(layer)
        if self.shape.shared_size:  # the partition lists the shared neurons first (layout.py)
            shared = tuple(self.source.shared_tensor(keys.shared_expert_key(p, layer)) for p in keys.MLP_PARTS)
            experts = [shared] + experts
        for part, tensor in zip(keys.MLP_PARTS, split.merge_experts(experts, self.partitions[layer])):
            yield keys.dense_mlp_key(part, layer), tensor

    def save_config(self, folder: Path) -> None:
        """The base model's own config (the FactorLLM ``text_config``) with its CausalLM architecture."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        base = self.source.base_type
        generic = ("architectures", "auto_map", "transformers_version", "_name_or_path", "model_type")
        config = AutoConfig.for_model(base, **{k: v for k, v in self.source.text.items() if k not in generic})
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]]
        config.save_pretrained(folder)


FORMATS: dict[str, type[ExportFormat]] = {"factorllm": FactorLLMFormat, "mixtral": StandardMoEFormat,
                                          "qwen2-moe": Qwen2MoeTarget, "gguf": GGUFTarget, "dense": DenseFormat}


def open_format(source: ExportSource, fmt: str, options: ExportOptions = ExportOptions()) -> ExportFormat:
    """``fmt`` for ``source``, after every check; one UserError lists all problems, before anything is written."""
    what = f"export to {fmt}: cannot export {source.description}"
    if fmt not in FORMATS:
        fail_if([f"--format {fmt!r}: expected one of {', '.join(FORMATS)}"], what)
    cls = FORMATS[fmt].for_model(source)
    fail_if(structure_problems(source) + [f"--format {fmt}: {p}" for p in cls.problems(source)], what)
    return cls(source, options)
