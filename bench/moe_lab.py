"""Research tools of bench_structures.py: a reference MoE forward, the oracle, and router variants.

None of this ships in factorllm_ds: convert uses only the ridge router that won here
(``structure.fit_linear_router``). What is kept is what the recorded comparisons in
bench/RESULTS.md ran: the PA, softmax-CE and per-expert BCE router fits, ridge to the
residual gains, and CMoE's representative-neuron router. tests/test_bench_lab.py tests it.

Shapes: T tokens, H hidden, I dense neurons, S shared neurons, E routed experts, R neurons per
routed expert, K experts per token, M representative neurons per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from factorllm_ds import structure as st
from factorllm_ds.hf_model.modeling_factorllm import prior_topk
from factorllm_ds.routing import pa_loss

ROUTER_LOSSES = ("pa", "ce", "bce", "ridge")

ActFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- weights and forward


class SharedMoEWeights(NamedTuple):
    """One layer's shared expert and routed experts (stacked), sliced from the dense FFN."""
    gate_SH: torch.Tensor
    up_SH: torch.Tensor
    down_HS: torch.Tensor
    gate_ERH: torch.Tensor
    up_ERH: torch.Tensor
    down_EHR: torch.Tensor


def slice_shared_moe(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor, perm: torch.Tensor,
                     num_shared: int, num_experts: int) -> SharedMoEWeights:
    """Exact slices of the dense weights (no arithmetic): the shared block and E routed experts."""
    shared = perm[:num_shared]
    groups_ER = st.routed_groups(perm, num_shared, num_experts)
    return SharedMoEWeights(gate_IH[shared], up_IH[shared], down_HI[:, shared],
                            gate_IH[groups_ER], up_IH[groups_ER], down_HI[:, groups_ER].permute(1, 0, 2).contiguous())


def ffn(x_TH: torch.Tensor, gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor,
        act_fn: ActFn = F.silu) -> torch.Tensor:
    """SwiGLU FFN on F neurons: down(act(gate x) * (up x)), [T, H]."""
    return (act_fn(x_TH @ gate_FH.T) * (x_TH @ up_FH.T)) @ down_HF.T


def shared_output(x_TH: torch.Tensor, w: SharedMoEWeights, act_fn: ActFn = F.silu) -> torch.Tensor:
    return ffn(x_TH, w.gate_SH, w.up_SH, w.down_HS, act_fn)


def routed_outputs(x_TH: torch.Tensor, w: SharedMoEWeights, act_fn: ActFn = F.silu) -> torch.Tensor:
    """Every routed expert's output on every token: [E, T, H] (the oracle needs them all)."""
    a_ETR = act_fn(torch.einsum("th,erh->etr", x_TH, w.gate_ERH)) * torch.einsum("th,erh->etr", x_TH, w.up_ERH)
    return torch.einsum("etr,ehr->eth", a_ETR, w.down_EHR)


def combine(shared_TH: torch.Tensor, routed_ETH: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """shared + the sum of each token's K chosen routed outputs, weight 1: [T, H]."""
    tokens = torch.arange(idx_TK.shape[0], device=idx_TK.device)
    chosen_TKH = routed_ETH[idx_TK, tokens.unsqueeze(1)]
    return shared_TH + chosen_TKH.sum(dim=1)


def moe_forward(x_TH: torch.Tensor, w: SharedMoEWeights, idx_TK: torch.Tensor, act_fn: ActFn = F.silu) -> torch.Tensor:
    """The MoE block as deployed: the shared expert on every token, each routed expert only on
    the tokens that chose it (weight 1), accumulated in fp32. [T, H]."""
    out_TH = (shared_output(x_TH.float(), w, act_fn) if w.gate_SH.shape[0]
              else torch.zeros_like(x_TH, dtype=torch.float32))
    for e in range(w.gate_ERH.shape[0]):
        tokens = torch.nonzero((idx_TK == e).any(dim=1)).squeeze(1)
        if tokens.numel():
            out_TH.index_add_(0, tokens, ffn(x_TH[tokens].float(), w.gate_ERH[e], w.up_ERH[e], w.down_EHR[e], act_fn))
    return out_TH.to(x_TH.dtype)


# ----------------------------------------------------------------------------- the oracle


def oracle_topk(routed_ETH: torch.Tensor, shared_TH: torch.Tensor, target_TH: torch.Tensor, k: int) -> torch.Tensor:
    """The K routed experts whose sum (weight 1) is closest to what the shared expert leaves of the
    dense output t: argmin_S ||sum_{e in S} E_e - (t - shared)||; [T, K]. Exact up to 512 subsets,
    greedy beyond (``prior_topk``)."""
    return prior_topk(routed_ETH, target_TH.float() - shared_TH.float(), k, target="subset", weight=1.0)


def residual_gain(routed_ETH: torch.Tensor, residual_TH: torch.Tensor) -> torch.Tensor:
    """How much adding expert e alone lowers ||residual||^2: 2<E_e, r> - ||E_e||^2, [T, E].

    A per-expert score whose top-K is the oracle's greedy first step when experts are
    near-orthogonal; a smooth regression target for a linear router.
    """
    return st.expert_gains(routed_ETH, residual_TH)


def topk_agreement(pred_idx_TK: torch.Tensor, target_idx_TK: torch.Tensor) -> float:
    """Mean share of the K target experts that the prediction also picked (1 = same sets)."""
    hits = (pred_idx_TK.unsqueeze(-1) == target_idx_TK.unsqueeze(-2)).any(dim=-1).float()
    return float(hits.mean()) if hits.numel() else 1.0


# ----------------------------------------------------------------------------- routers


def _fit_adam(z_TH: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], num_experts: int, bias: bool,
              steps: int, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.zeros(num_experts, z_TH.shape[1], requires_grad=True)
    b = torch.zeros(num_experts, requires_grad=True) if bias else None
    opt = torch.optim.Adam([weight] + ([b] if bias else []), lr=lr)
    with torch.enable_grad():  # callers convert under no_grad; the fit needs its own graph
        for _ in range(steps):
            opt.zero_grad()
            logits_TE = z_TH @ weight.T + (b if bias else 0.0)
            (loss_fn(logits_TE) + weight_decay * weight.pow(2).sum()).backward()
            opt.step()
    return weight.detach(), (None if b is None else b.detach())


def fit_router(x_TH: torch.Tensor, target_idx_TK: torch.Tensor, num_experts: int, bias: bool = True,
               loss: str = "pa", scores_TE: torch.Tensor | None = None, steps: int = 300, lr: float = 0.05,
               weight_decay: float = 0.0, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear router (W [E, H], b [E] or None, fp32) whose top-K on ``x_TH`` reproduces ``target_idx_TK``.

    ``pa``: KL to the PA prior's softmax(k-hot), the objective train uses. ``ce``: softmax
    cross-entropy to the k-hot target / K. ``bce``: one sigmoid per expert on the k-hot target.
    ``ridge``: ``structure.fit_linear_router`` (closed form, to ``scores_TE`` such as
    :func:`residual_gain`, or to the k-hot target when None). The iterative fits run full-batch
    Adam from zero on standardised inputs, like the ridge fit.
    """
    if loss not in ROUTER_LOSSES:
        raise ValueError(f"unknown router loss {loss!r}; expected one of {ROUTER_LOSSES}")
    if loss == "ridge":
        return st.fit_linear_router(x_TH, target_idx_TK, num_experts, bias, ridge=ridge, scores_TE=scores_TE)
    z_TH, mean_H, std_H = st.standardize(x_TH.detach(), bias)
    hot_TE = st.k_hot(target_idx_TK, num_experts)
    if loss == "pa":
        loss_fn = lambda logits: pa_loss(F.softmax(logits, dim=-1), target_idx_TK)  # noqa: E731
    elif loss == "ce":
        target_TE = hot_TE / hot_TE.sum(dim=1, keepdim=True)
        loss_fn = lambda logits: -(target_TE * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()  # noqa: E731
    else:
        loss_fn = lambda logits: F.binary_cross_entropy_with_logits(logits, hot_TE)  # noqa: E731
    w_EH, b_E = _fit_adam(z_TH, loss_fn, num_experts, bias, steps, lr, weight_decay)
    return st.fold_standardization(w_EH, b_E, mean_H, std_H)


def linear_topk(x_TH: torch.Tensor, w_EH: torch.Tensor, b_E: torch.Tensor | None, k: int) -> torch.Tensor:
    """The linear router's K experts per token: [T, K]."""
    return torch.topk(F.linear(x_TH.float(), w_EH, b_E), k, dim=-1).indices


def representative_neurons(act_TI: torch.Tensor, perm: torch.Tensor, num_shared: int, num_experts: int,
                           m: int) -> torch.Tensor:
    """Each routed expert's ``m`` most central neurons: [E, M] neuron ids.

    Central = the highest cosine between the neuron's |activation| profile over calibration
    tokens and its expert's mean profile, the feature co-activation clustering groups by; so a
    representative fires when its expert's neurons do (CMoE's router, with m >= 1).
    """
    groups_ER = st.routed_groups(perm, num_shared, num_experts)
    if not 1 <= m <= groups_ER.shape[1]:
        raise ValueError(f"m = {m} representatives must be in [1, {groups_ER.shape[1]}] (neurons per expert)")
    prof = act_TI.float().abs()
    prof_IT = (prof / prof.norm(dim=0, keepdim=True).clamp_min(1e-12)).T
    reps = []
    for idx in groups_ER:
        centre_T = prof_IT[idx].mean(dim=0)
        reps.append(idx[torch.topk(prof_IT[idx] @ centre_T, m).indices])
    return torch.stack(reps)


def representative_scores(x_TH: torch.Tensor, gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor,
                          reps_EM: torch.Tensor, act_fn: ActFn = F.silu) -> torch.Tensor:
    """Each routed expert's score: the summed |contribution| of its representatives, [T, E].

    sum_{i in reps(e)} |act(g_i x) * (u_i x)| * ||d_i||. Not a linear map of x: the SiLU and the
    gate-times-up product are what say whether a neuron fires, so it costs 2·E·M·H
    multiply-adds (E·M gate/up rows), against E·H for a linear router.
    """
    e, m = reps_EM.shape
    flat = reps_EM.flatten()
    a_TN = act_fn(x_TH.float() @ gate_IH[flat].float().T) * (x_TH.float() @ up_IH[flat].float().T)
    contrib_TN = a_TN.abs() * down_HI[:, flat].float().norm(dim=0)
    return contrib_TN.view(-1, e, m).sum(dim=-1)
