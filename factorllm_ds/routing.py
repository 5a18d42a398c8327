"""The gate: top-k routing, the Prior-Approximate (PA) loss and the balance loss.

Losses are pure functions of tensors the forward returns (docs/method.md §5). The DeepSpeed
gate at the bottom adapts FactorLLM routing to ``MOELayer``'s sparse-route contract.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from factorllm_ds.hf_model.modeling_factorllm import prior_topk, route

__all__ = ["route", "prior_topk", "prior_distribution", "pa_loss", "balance_loss", "prior_agreement",
           "FactorLLMGate"]

_EPS = 1e-7


def prior_distribution(prior_idx_TK: torch.Tensor, num_experts: int, tau: float = 1.0) -> torch.Tensor:
    """q = softmax(M / tau), M the one-hot mask of the prior's k experts: [T, E]."""
    mask_TE = torch.zeros(prior_idx_TK.shape[0], num_experts, device=prior_idx_TK.device)
    mask_TE.scatter_(1, prior_idx_TK, 1.0)
    return F.softmax(mask_TE / tau, dim=-1)


def pa_loss(probs_TE: torch.Tensor, prior_idx_TK: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(p || q) averaged over tokens, p and q clamped to [1e-7, 1 - 1e-7]."""
    q_TE = prior_distribution(prior_idx_TK, probs_TE.shape[-1], tau).clamp(_EPS, 1 - _EPS)
    p_TE = probs_TE.float().clamp(_EPS, 1 - _EPS)
    return (p_TE * (p_TE.log() - q_TE.log())).sum(dim=-1).mean()


def balance_loss(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's term: mean over tokens of sum_i topk_mask(p)_i * p_i."""
    top_p_TK = torch.topk(probs_TE.float(), k, dim=-1).values
    return top_p_TK.sum(dim=-1).mean()


def switch_balance_loss(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Switch/GShard l_aux: E * sum_i f_i * P_i (fraction routed times mean probability)."""
    num_experts = probs_TE.shape[-1]
    idx_TK = torch.topk(probs_TE, k, dim=-1).indices
    routed_E = torch.zeros(num_experts, device=probs_TE.device).scatter_add_(
        0, idx_TK.flatten(), torch.ones(idx_TK.numel(), device=probs_TE.device)) / idx_TK.numel()
    return num_experts * (routed_E * probs_TE.float().mean(dim=0)).sum()


def prior_agreement(probs_TE: torch.Tensor, prior_idx_TK: torch.Tensor) -> torch.Tensor:
    """Mean fraction of the router's top-k that the PA prior also picked."""
    k = prior_idx_TK.shape[-1]
    chosen_TK = torch.topk(probs_TE, k, dim=-1).indices
    hits = (chosen_TK.unsqueeze(-1) == prior_idx_TK.unsqueeze(-2)).any(dim=-1).float()
    return hits.mean()


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += rate * sign(mean load - load_e), in place."""
    counts = counts_E.float()
    bias_E += rate * torch.sign(counts.mean() - counts).to(bias_E)


class FactorLLMGate(nn.Module):
    """A DeepSpeed ``MOELayer`` gate with FactorLLM routing; no token is ever dropped.

    ``MOELayer`` calls ``gate(x, used_token, sparse_routes=True, use_tutel)`` and unpacks
    ``(l_aux, capacity, num_experts, indices[k,T], locations[k,T], gates[k,T], exp_counts)``.
    The router's probabilities are needed by the PA loss, which ``MOELayer`` gives no way
    to return, so the gate keeps the last ones in ``last_probs`` for its block to read
    right after the call (as DeepSpeed itself keeps ``l_aux``).
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, routing: str, scale: float, bias: bool,
                 router_grad: str = "none"):
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts, bias=bias)
        self.num_experts, self.k, self.routing, self.scale = num_experts, k, routing, scale
        self.straight_through = router_grad == "straight-through" and routing == "hard"
        self.ep_group = None
        # --balance-kind bias: added to the logits for the top-k choice only (hard routing weights are constant,
        # so it changes who is picked, not by how much); export folds it into the router bias.
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.last_probs: torch.Tensor | None = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, x_TH: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("FactorLLMGate supports only DeepSpeed's sparse-route dispatch (no tutel)")
        bias = None if self.router.bias is None else self.router.bias.float()
        logits_TE = F.linear(x_TH.float(), self.router.weight.float(), bias)
        idx_TK, weights_TK = route(logits_TE + self.selection_bias.float(), self.k, self.routing, self.scale)
        # The auxiliary losses train the router only (docs/method.md §5: experts learn from the LM loss),
        # so their probabilities see a detached input: no gradient into earlier layers' experts.
        aux_logits_TE = logits_TE if not x_TH.requires_grad else F.linear(x_TH.detach().float(),
                                                                          self.router.weight.float(), bias)
        self.last_probs = F.softmax(aux_logits_TE, dim=-1)
        if self.straight_through and self.last_probs.requires_grad:
            # Hard routing's weights are constants, so the next-token loss never reaches the router. Multiplying by
            # (1 + p - p.detach()) = 1 keeps every forward value and gives d loss / d p_e = s * <d loss / d y, E_e(x)>
            # for each selected expert e: the router learns which of its picks helped (docs/method.md §5).
            chosen_TK = self.last_probs.gather(1, idx_TK)
            weights_TK = weights_TK * (1.0 + chosen_TK - chosen_TK.detach())
        # Position of each (token, route) in its expert's buffer; capacity = the largest load
        # over the expert-parallel group, so nothing is dropped (drop_tokens=False semantics).
        mask_TE = torch.zeros_like(logits_TE, dtype=torch.long).scatter_(1, idx_TK, 1)
        exp_counts = mask_TE.sum(dim=0)
        locations_TE = torch.cumsum(mask_TE, dim=0) - 1
        capacity = exp_counts.max().clone()
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        locations_TK = locations_TE.gather(1, idx_TK)
        l_aux = logits_TE.new_zeros(())  # FactorLLM's losses are computed by the block
        return (l_aux, capacity, self.num_experts, idx_TK.t().to(torch.int32).contiguous(),
                locations_TK.t().to(torch.int32).contiguous(), weights_TK.t().contiguous(), exp_counts.detach())
