"""Declarative maps from Hugging Face tensor names to their role, per supported family.

Dense and FactorLLM checkpoints share every key outside the MLP; inside it the dense
``gate/up/down_proj`` become ``router`` + ``experts.{e}.{gate,up,down}_proj``.
Unknown keys raise: a silent drop would lose weights.
"""

from __future__ import annotations

import re

import torch

from factorllm_ds.hf_io import TensorInfo
from factorllm_ds.shape import MLP_PARTS, part_shape

# model_type -> human name; every family here has the SwiGLU gate/up/down MLP.
SUPPORTED_FAMILIES = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

LAYER = "model.layers.{layer}."
DENSE_MLP = {part: LAYER + f"mlp.{part}_proj.weight" for part in MLP_PARTS}
EXPERT = {part: LAYER + "mlp.experts.{expert}." + f"{part}_proj.weight" for part in MLP_PARTS}
# The always-on shared expert (when the config's shared_intermediate_size > 0); Qwen2-MoE's name for it.
SHARED_EXPERT = {part: LAYER + f"mlp.shared_expert.{part}_proj.weight" for part in MLP_PARTS}
ROUTER_WEIGHT = LAYER + "mlp.router.weight"
ROUTER_BIAS = LAYER + "mlp.router.bias"

# Per-layer keys copied unchanged (optional ones appear only in some families).
LAYER_PASSTHROUGH = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
)
GLOBAL_PASSTHROUGH = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# Buffers some old exports saved; recomputed by the model, so not copied.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_of(name: str) -> int | None:
    m = _LAYER_KEY.fullmatch(name)
    return int(m.group(1)) if m else None


def classify_dense_key(name: str) -> tuple[str, int | None]:
    """('global' | 'layer' | 'mlp' | 'ignored', layer index) for a dense checkpoint key."""
    if name in GLOBAL_PASSTHROUGH:
        return "global", None
    if IGNORED.fullmatch(name):
        return "ignored", None
    m = _LAYER_KEY.fullmatch(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest in LAYER_PASSTHROUGH:
            return "layer", layer
        if LAYER + rest in DENSE_MLP.values():
            return "mlp", layer
    raise KeyError(name)


def expert_key(part: str, layer: int, expert: int) -> str:
    return EXPERT[part].format(layer=layer, expert=expert)


def shared_expert_key(part: str, layer: int) -> str:
    return SHARED_EXPERT[part].format(layer=layer)


def dense_mlp_key(part: str, layer: int) -> str:
    return DENSE_MLP[part].format(layer=layer)


def dense_infos_from_config(config: dict, dtype: torch.dtype) -> dict[str, TensorInfo]:
    """The tensor list a dense checkpoint of this config has; lets 70B plans run without files."""
    h, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    qkv_bias = config.get("model_type") == "qwen2" or config.get("attention_bias", False)
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(n_layers):
        p = LAYER.format(layer=i)
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        shapes.update({dense_mlp_key(part, i): part_shape(part, inter, h) for part in MLP_PARTS})
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return {name: TensorInfo(name, shape, dtype) for name, shape in shapes.items()}
