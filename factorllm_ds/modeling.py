"""The FactorLLM model as the package uses it: loaders on top of the shipped HF model code."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import check_model_folder, read_config
from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
from factorllm_ds.hf_model.modeling_factorllm import FactorLLMForCausalLM, FactorLLMSparseMoeBlock, prior_topk, route

__all__ = ["FactorLLMConfig", "FactorLLMForCausalLM", "FactorLLMSparseMoeBlock", "load_moe", "load_dense",
           "prior_topk", "route", "all_experts_mode"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = tuple(DTYPES)  # the first is the default of every command that runs a model
DEVICE_DEFAULT = "auto"


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N, or auto (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: not a device ({err}); use cpu, cuda, cuda:N or auto") from err
    if device.type not in ("cpu", "cuda"):  # meta, mps, ...: torch knows them, the commands run on neither
        raise UserError(f"--device {name}: not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def load_moe(moe_dir: Path, dtype: torch.dtype | None = torch.float32, flag: str = "--model") -> FactorLLMForCausalLM:
    config = read_config(moe_dir, flag)
    if config.get("model_type") != "factorllm":
        raise UserError(f"{flag} {moe_dir}: not a FactorLLM checkpoint (model_type {config.get('model_type')!r}). "
                        "Convert it first: factorllm-ds convert --model DENSE --out MOE_DIR")
    check_model_folder(moe_dir, flag, config)
    return FactorLLMForCausalLM.from_pretrained(moe_dir, dtype=dtype or "auto").eval()


def load_dense(dense_dir: Path, dtype: torch.dtype | None = torch.float32, flag: str = "--dense"):
    check_model_folder(dense_dir, flag)
    return AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype or "auto").eval()


def all_experts_mode(model: FactorLLMForCausalLM) -> None:
    """k = E, hard routing, scale 1: the model must then equal its dense source."""
    for block in model.moe_blocks():
        block.top_k = block.num_experts
        block.routing = "hard"
        block.scale = 1.0
        block.router_override = "learned"
