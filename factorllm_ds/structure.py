"""Pure functions: an MoE whose experts keep the model (docs/method.md §2, §4).

An equal split of a SwiGLU FFN throws away, on every token, half of the heavy-tailed neurons
that every token needs. Here the most important neurons form an always-on *shared expert* and
the rest are split into ``num_experts`` equal routed experts, of which ``k`` run per token, each
with weight 1. Convert calls these per layer; every function is a function of tensors.

Partition convention (as in :mod:`factorllm_ds.split`, with a shared block in front): a
permutation ``perm`` of the I neurons; ``perm[:S]`` is the shared expert and routed expert e owns
``perm[S + e*R : S + (e+1)*R]``, R = (I - S) / E.

Shapes: T tokens, H hidden, I dense neurons, S shared neurons, E routed experts, R neurons per
routed expert, K experts per token, M representative neurons per expert.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from factorllm_ds import split
from factorllm_ds.hf_model.modeling_factorllm import prior_topk
from factorllm_ds.routing import fit_router

IMPORTANCE_KINDS = ("contribution", "activation_rate")
ROUTED_SPLITS = ("coactivation", "kmeans", "contiguous", "random")
ROUTER_LOSSES = ("pa", "ce", "bce", "ridge")

ActFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- which neurons matter


def neuron_importance(act_TI: torch.Tensor, down_HI: torch.Tensor, kind: str = "contribution",
                      top_fraction: float = 0.1) -> torch.Tensor:
    """How much each neuron matters on calibration tokens: [I], larger = more important.

    ``act_TI`` = act(W_gate x) * (W_up x), the down projection's input.
    ``contribution``: mean over tokens of |a_i| * ||W_down[:, i]||, the size of the neuron's
    term in the FFN output (|a_i| alone would ignore that down columns differ in norm).
    ``activation_rate`` (CMoE, arXiv 2502.04416): the share of tokens on which the neuron is
    among the ``top_fraction`` of that token's neurons by |a_i|.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown importance kind {kind!r}; expected one of {IMPORTANCE_KINDS}")
    act = act_TI.float().abs()
    if kind == "contribution":
        return act.mean(dim=0) * down_HI.float().norm(dim=0)
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    top = max(1, round(top_fraction * act.shape[1]))
    marks_TI = torch.zeros_like(act).scatter_(1, torch.topk(act, top, dim=1).indices, 1.0)
    return marks_TI.mean(dim=0)


# ----------------------------------------------------------------------------- partition


def parse_shared(spec: str | int | float, intermediate_size: int) -> int:
    """The shared expert's neuron count from ``"0.25"`` (a fraction of I, in [0, 1)) or ``"384"`` (a count)."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"shared size {spec!r}: expected a fraction of the FFN like 0.25 or a neuron count "
                         f"like 384") from None
    is_fraction = isinstance(spec, float) or any(c in text for c in ".eE")
    if is_fraction:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"shared fraction {spec!r} must be in [0, 1)")
        count = round(value * intermediate_size)
    else:
        count = int(value)
    if not 0 <= count < intermediate_size:
        raise ValueError(f"shared size {spec!r} = {count} neurons; must be in [0, {intermediate_size}) "
                         f"(intermediate_size {intermediate_size})")
    return count


def valid_num_experts(intermediate_size: int, num_shared: int) -> list[int]:
    """Every routed expert count E that splits the I - S non-shared neurons equally."""
    routed = intermediate_size - num_shared
    return [e for e in range(1, routed + 1) if routed % e == 0]


def check_shared_split(intermediate_size: int, num_shared: int, num_experts: int, top_k: int | None = None) -> None:
    """Raise one ValueError naming every problem with (I, S, E[, k])."""
    problems = []
    if not 0 <= num_shared < intermediate_size:
        problems.append(f"num_shared {num_shared} must be in [0, {intermediate_size}) (intermediate_size)")
    else:
        routed = intermediate_size - num_shared
        if num_experts < 1 or num_experts > routed or routed % num_experts:
            valid = valid_num_experts(intermediate_size, num_shared)
            shown = ", ".join(map(str, valid[:24])) + (", ..." if len(valid) > 24 else "")
            problems.append(f"num_experts {num_experts} must divide the {routed} routed neurons "
                            f"(intermediate_size {intermediate_size} - num_shared {num_shared}); valid: {shown}")
    if top_k is not None and not 0 <= top_k <= num_experts:
        problems.append(f"top_k {top_k} must be in [0, num_experts {num_experts}]")
    if problems:
        raise ValueError("invalid shared-expert structure: " + "; ".join(problems))


def shared_partition(importance_I: torch.Tensor, num_shared: int, num_experts: int, method: str = "coactivation",
                     seed: int = 0, act_TI: torch.Tensor | None = None,
                     weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``perm`` [I]: the ``num_shared`` most important neurons, then ``num_experts`` equal routed groups.

    The routed neurons are grouped by ``method``: ``coactivation`` (needs ``act_TI``: neurons
    that fire together share an expert, so a token needs few experts), ``kmeans`` (needs
    ``weights`` = (gate_IH, up_IH, down_HI)), ``contiguous`` or ``random`` (no calibration).
    """
    num_neurons = importance_I.shape[0]
    check_shared_split(num_neurons, num_shared, num_experts)
    order = torch.argsort(importance_I.float(), descending=True, stable=True)
    shared_S = order[:num_shared].sort().values
    rest_N = order[num_shared:].sort().values
    if method == "coactivation":
        if act_TI is None:
            raise ValueError("the coactivation split needs calibration activations act_TI")
        local = split.coactivation_partition(act_TI[:, rest_N], num_experts, seed)
    elif method == "kmeans":
        if weights is None:
            raise ValueError("the kmeans split needs weights=(gate_IH, up_IH, down_HI)")
        gate_IH, up_IH, down_HI = weights
        local = split.kmeans_partition(gate_IH[rest_N], up_IH[rest_N], down_HI[:, rest_N], num_experts, seed)
    elif method == "contiguous":
        local = split.contiguous_partition(rest_N.numel())
    elif method == "random":
        local = split.random_partition(rest_N.numel(), seed)
    else:
        raise ValueError(f"unknown routed split {method!r}; expected one of {ROUTED_SPLITS}")
    return torch.cat([shared_S, rest_N[local]])


def routed_groups(perm: torch.Tensor, num_shared: int, num_experts: int) -> torch.Tensor:
    """Neuron ids of each routed expert: [E, R]."""
    return perm[num_shared:].view(num_experts, -1)


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
    groups_ER = routed_groups(perm, num_shared, num_experts)
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


def group_outputs(act_TI: torch.Tensor, down_HI: torch.Tensor, groups_GN: torch.Tensor) -> torch.Tensor:
    """Output of each neuron group from known activations: [G, T, H] (no second gate/up pass)."""
    act, down = act_TI.float(), down_HI.float()
    return torch.stack([act[:, idx] @ down[:, idx].T for idx in groups_GN])


def neuron_gates(idx_TK: torch.Tensor, weights_TK: torch.Tensor, perm: torch.Tensor, num_shared: int,
                 num_experts: int) -> torch.Tensor:
    """Each neuron's weight in each token's output, as the MoE computes it: 1 for the shared neurons,
    the combine weight of the expert for the routed neurons of a selected expert, else 0. [T, I]."""
    expert_of_I = torch.full((perm.numel(),), num_experts, dtype=torch.long)  # column E: the shared expert
    expert_of_I[routed_groups(perm, num_shared, num_experts)] = torch.arange(num_experts).unsqueeze(1)
    gates_TE = torch.zeros(idx_TK.shape[0], num_experts + 1)
    gates_TE[:, num_experts] = 1.0
    gates_TE.scatter_add_(1, idx_TK, weights_TK.float())
    return gates_TE[:, expert_of_I]


def refit_down(act_TI: torch.Tensor, gates_TI: torch.Tensor, down_HI: torch.Tensor, target_TH: torch.Tensor,
               ridge: float) -> torch.Tensor:
    """Down projection refitted so that the routed FFN reproduces ``target`` on the calibration tokens:
    W = argmin_W ‖(a ⊙ g)·Wᵀ − t‖² + Σ_i d_i·‖W[:, i] − W0[:, i]‖², d_i = ridge · Σ_t a_ti²  (docs/method.md §4).

    a: the neurons' activations act(gate x)·(up x), g: :func:`neuron_gates` (zero where a neuron's expert is
    not selected), W0 the dense down projection. The penalty pulls each neuron's column toward its dense
    value in proportion to the neuron's own energy, so rarely selected experts stay close to the slice and
    ``ridge → ∞`` returns W0. Only the down projection changes: gate/up stay exact slices. [H, I], float32.
    """
    a_TI = act_TI.float() * gates_TI
    w0_IH = down_HI.float().T
    d_I = ridge * act_TI.float().pow(2).sum(dim=0) + 1e-8
    lhs_II = a_TI.T @ a_TI
    lhs_II.diagonal().add_(d_I)
    rhs_IH = a_TI.T @ target_TH.float() + d_I.unsqueeze(1) * w0_IH
    chol, info = torch.linalg.cholesky_ex(lhs_II)
    if int(info) == 0:
        return torch.cholesky_solve(rhs_IH, chol).T.contiguous()
    return torch.linalg.solve(lhs_II.double(), rhs_IH.double()).T.float().contiguous()  # ill-conditioned: fp64


# ----------------------------------------------------------------------------- the oracle


def oracle_topk(routed_ETH: torch.Tensor, shared_TH: torch.Tensor, target_TH: torch.Tensor, k: int) -> torch.Tensor:
    """The K routed experts whose sum (weight 1) is closest to what the shared expert leaves of the
    dense output t: argmin_S ||sum_{e in S} E_e - (t - shared)||; [T, K]. Exact up to 512 subsets,
    greedy beyond (:func:`prior_topk`)."""
    return prior_topk(routed_ETH, target_TH.float() - shared_TH.float(), k, target="subset", weight=1.0)


def residual_gain(routed_ETH: torch.Tensor, residual_TH: torch.Tensor) -> torch.Tensor:
    """How much adding expert e alone lowers ||residual||^2: 2<E_e, r> - ||E_e||^2, [T, E].

    A per-expert score whose top-K is the oracle's greedy first step when experts are
    near-orthogonal; a smooth regression target for a linear router.
    """
    out = routed_ETH.float()
    return (2 * torch.einsum("eth,th->te", out, residual_TH.float()) - out.pow(2).sum(dim=-1).T)


def topk_agreement(pred_idx_TK: torch.Tensor, target_idx_TK: torch.Tensor) -> float:
    """Mean share of the K target experts that the prediction also picked (1 = same sets)."""
    hits = (pred_idx_TK.unsqueeze(-1) == target_idx_TK.unsqueeze(-2)).any(dim=-1).float()
    return float(hits.mean()) if hits.numel() else 1.0


# ----------------------------------------------------------------------------- routers


def k_hot(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx_TK.shape[0], num_experts, device=idx_TK.device).scatter_(1, idx_TK, 1.0)


def _standardize(x_TH: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # FFN inputs' features differ in scale by orders of magnitude (massive activations): fit on
    # standardised features, then fold the scaling back into W and b.
    x = x_TH.float()
    mean_H = x.mean(dim=0) if bias else torch.zeros(x.shape[1], device=x.device)
    std_H = x.std(dim=0).clamp_min(1e-6)
    return (x - mean_H) / std_H, mean_H, std_H


def _fold(w_EH: torch.Tensor, b_E: torch.Tensor | None, mean_H: torch.Tensor,
          std_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = w_EH / std_H
    return w.detach(), (None if b_E is None else (b_E - w @ mean_H).detach())


def _fit_adam(z_TH: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], num_experts: int, bias: bool,
              steps: int, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.zeros(num_experts, z_TH.shape[1], requires_grad=True)
    b = torch.zeros(num_experts, requires_grad=True) if bias else None
    opt = torch.optim.Adam([weight] + ([b] if bias else []), lr=lr)
    for _ in range(steps):  # (under enable_grad: callers convert under no_grad)
        opt.zero_grad()
        logits_TE = z_TH @ weight.T + (b if bias else 0.0)
        (loss_fn(logits_TE) + weight_decay * weight.pow(2).sum()).backward()
        opt.step()
    return weight.detach(), (None if b is None else b.detach())


def fit_linear_router(x_TH: torch.Tensor, target_idx_TK: torch.Tensor, num_experts: int, bias: bool = True,
                      loss: str = "pa", scores_TE: torch.Tensor | None = None, steps: int = 300, lr: float = 0.05,
                      weight_decay: float = 0.0, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear router (W [E, H], b [E] or None, fp32) whose top-K on ``x_TH`` reproduces ``target_idx_TK``.

    ``pa``: :func:`routing.fit_router` (KL to the PA prior's softmax(k-hot)), the objective train uses.
    ``ce``: softmax cross-entropy to the k-hot target / K. ``bce``: one sigmoid per expert on the
    k-hot target (each expert's in/out decision on its own). ``ridge``: closed-form least squares
    (ridge ``ridge``·T on standardised inputs) to ``scores_TE`` (e.g. :func:`residual_gain`),
    or to the k-hot target when None; no iterations.
    """
    if loss not in ROUTER_LOSSES:
        raise ValueError(f"unknown router loss {loss!r}; expected one of {ROUTER_LOSSES}")
    x_TH = x_TH.detach()
    if loss == "pa":
        with torch.enable_grad():  # callers convert under no_grad; the fit needs its own graph
            return fit_router(x_TH, target_idx_TK, num_experts, bias, steps=steps, lr=lr)
    z_TH, mean_H, std_H = _standardize(x_TH, bias)
    hot_TE = k_hot(target_idx_TK, num_experts)
    if loss == "ridge":
        y_TE = (hot_TE if scores_TE is None else scores_TE.float())
        y_mean_E = y_TE.mean(dim=0) if bias else torch.zeros(num_experts)
        gram_HH = z_TH.T @ z_TH + ridge * z_TH.shape[0] * torch.eye(z_TH.shape[1])
        w_EH = torch.linalg.solve(gram_HH, z_TH.T @ (y_TE - y_mean_E)).T
        return _fold(w_EH, y_mean_E if bias else None, mean_H, std_H)
    if loss == "ce":
        target_TE = hot_TE / hot_TE.sum(dim=1, keepdim=True)
        loss_fn = lambda logits: -(target_TE * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()  # noqa: E731
    else:
        loss_fn = lambda logits: F.binary_cross_entropy_with_logits(logits, hot_TE)  # noqa: E731
    with torch.enable_grad():
        w_EH, b_E = _fit_adam(z_TH, loss_fn, num_experts, bias, steps, lr, weight_decay)
    return _fold(w_EH, b_E, mean_H, std_H)


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
    groups_ER = routed_groups(perm, num_shared, num_experts)
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
