"""verify: the converted model with every expert active must reproduce the dense logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from factorllm_ds.config import arg, bound_problems, fail_if
from factorllm_ds.errors import UserError
from factorllm_ds.layout import read_manifest
from factorllm_ds.modeling import DTYPE_CHOICES, DTYPES, all_experts_mode, load_dense, load_moe


@dataclass
class VerifyConfig:
    """factorllm-ds verify: MoE (k = E, hard, scale 1) vs dense logits on a few batches."""

    model: Path = arg("converted FactorLLM folder", default=None, required=True)
    dense: Path = arg("the dense folder it was converted from", default=None, required=True)
    batches: int = arg("number of random token batches", default=2)
    batch_size: int = arg("sequences per batch", default=2)
    seq_len: int = arg("tokens per sequence", default=64)
    dtype: str = arg("dtype both models run in (bfloat16 is compared against the dense model's own bf16 noise)",
                     choices=DTYPE_CHOICES, default=DTYPE_CHOICES[0])
    tolerance: float = arg("max |Δ logits| / max |logits| allowed in float32", default=1e-5)
    seed: int = arg("seed for the token batches", default=0)

    def validate(self) -> VerifyConfig:
        """Every flag problem at once; returns the config to run (nothing here needs resolving, so itself)."""
        problems = bound_problems(self, {"batches": ">= 1", "batch_size": ">= 1", "seq_len": ">= 1",
                                         "tolerance": "finite > 0"})
        for flag, path in (("--model", self.model), ("--dense", self.dense)):
            if not (Path(path) / "config.json").is_file():
                problems.append(f"{flag} {path}: no config.json there; pass a Hugging Face model folder")
        settings = (read_manifest(self.model) or {}).get("settings", {})
        if settings.get("refit_down"):
            problems.append(f"--model {self.model} was converted with --refit-down {settings['refit_down']}: its "
                            "down projections were refitted to the router's picks, so with every expert on it is "
                            "not the dense model by design. To check the split, convert with --refit-down 0")
        fail_if(problems, "verify: bad arguments")
        return self


@torch.no_grad()
def verify(cfg: VerifyConfig) -> dict:
    cfg = cfg.validate()
    dtype = DTYPES[cfg.dtype]
    moe = load_moe(cfg.model, dtype)
    dense = load_dense(cfg.dense, dtype)
    if moe.config.vocab_size != dense.config.vocab_size:
        raise UserError(f"--model and --dense have different vocabularies ({moe.config.vocab_size} vs "
                        f"{dense.config.vocab_size}); pass the dense folder the MoE was converted from.")
    all_experts_mode(moe)
    reference = load_dense(cfg.dense, torch.float32) if dtype != torch.float32 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    max_diff, noise, scale = 0.0, 0.0, 0.0
    for _ in range(cfg.batches):
        ids = torch.randint(0, dense.config.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
        want = dense(ids).logits.float()
        got = moe(ids).logits.float()
        max_diff = max(max_diff, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
        if reference is not None:
            noise = max(noise, (reference(ids).logits.float() - want).abs().max().item())
    relative = max_diff / max(scale, 1e-12)
    # In low precision both models sit within bf16 rounding noise of the fp32 dense logits, so by the
    # triangle inequality a lossless split differs from the dense model by at most twice that noise (0 in fp32).
    limit = max(cfg.tolerance, 2 * noise / max(scale, 1e-12))
    return {"max_abs_diff": max_diff, "logit_scale": scale, "relative": relative, "limit": limit,
            "dense_bf16_noise": noise if reference is not None else None, "ok": relative <= limit}
