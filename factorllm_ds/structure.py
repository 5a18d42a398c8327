"""Pure functions: an MoE whose experts keep the model (docs/method.md §2, §4).

An equal split of a SwiGLU FFN throws away, on every token, half of the heavy-tailed neurons
that every token needs. Here the most important neurons form an always-on *shared expert* and
the rest are split into ``num_experts`` equal routed experts, of which ``k`` run per token, each
with weight 1. Convert calls these per layer; every function is a function of tensors.

The partition convention and the letters of tensor names (T, H, I, S, E, R, K, ...) are
:mod:`factorllm_ds.shape`'s.
"""

from __future__ import annotations

import torch

from factorllm_ds import split
from factorllm_ds.shape import ARGUMENT_WORDING, MoEShape, expert_problems

IMPORTANCE_KINDS = ("contribution", "activation_rate")


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
    if isinstance(spec, float) or any(c in text for c in ".eE"):  # a fraction
        if not 0.0 <= value < 1.0:
            raise ValueError(f"shared fraction {spec!r} must be in [0, 1)")
        count = round(value * intermediate_size)
    else:
        count = int(value)
    if not 0 <= count < intermediate_size:
        raise ValueError(f"shared size {spec!r} = {count} neurons; must be in [0, {intermediate_size}) "
                         f"(intermediate_size {intermediate_size})")
    return count


def check_shared_split(intermediate_size: int, num_shared: int, num_experts: int, top_k: int | None = None) -> None:
    """Raise one ValueError naming every problem with (I, S, E[, k]): the shape's rules (shape.py)."""
    shape = MoEShape(num_experts, num_experts if top_k is None else top_k, intermediate_size, num_shared)
    problems = expert_problems(shape, ARGUMENT_WORDING)
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
    local = split.partition(method, num_neurons, num_experts, seed, act_TI, weights, neurons_N=rest_N)
    return torch.cat([shared_S, rest_N[local]])


def routed_groups(perm: torch.Tensor, num_shared: int, num_experts: int) -> torch.Tensor:
    """Neuron ids of each routed expert: [E, R]."""
    return perm[num_shared:].view(num_experts, -1)


# ----------------------------------------------------------------------------- weights


def group_outputs(act_TI: torch.Tensor, down_HI: torch.Tensor, groups_GN: torch.Tensor) -> torch.Tensor:
    """Output of each neuron group from known activations: [G, T, H] (no second gate/up pass)."""
    act_GTN = act_TI.float()[:, groups_GN].permute(1, 0, 2)
    return torch.bmm(act_GTN, down_HI.float()[:, groups_GN].permute(1, 2, 0))


def neuron_gates(idx_TK: torch.Tensor, weights_TK: torch.Tensor, perm: torch.Tensor, num_shared: int,
                 num_experts: int) -> torch.Tensor:
    """Each neuron's weight in each token's output, as the MoE computes it: 1 for the shared neurons,
    the combine weight of the expert for the routed neurons of a selected expert, else 0. [T, I]."""
    device = idx_TK.device
    expert_of_I = torch.full((perm.numel(),), num_experts, dtype=torch.long, device=device)  # column E: shared
    expert_of_I[routed_groups(perm, num_shared, num_experts).to(device)] = \
        torch.arange(num_experts, device=device).unsqueeze(1)
    gates_TE = torch.zeros(idx_TK.shape[0], num_experts + 1, device=device)
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


# ----------------------------------------------------------------------------- routers


def k_hot(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx_TK.shape[0], num_experts, device=idx_TK.device).scatter_(1, idx_TK, 1.0)


def standardize(x_TH: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mean, std): the inputs standardised per feature (mean 0 only with a bias to absorb it)."""
    # FFN inputs' features differ in scale by orders of magnitude (massive activations): fit on
    # standardised features, then fold the scaling back into W and b.
    x = x_TH.float()
    mean_H = x.mean(dim=0) if bias else torch.zeros(x.shape[1], device=x.device)
    std_H = x.std(dim=0).clamp_min(1e-6)
    return (x - mean_H) / std_H, mean_H, std_H


def fold_standardization(w_EH: torch.Tensor, b_E: torch.Tensor | None, mean_H: torch.Tensor,
                         std_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A router fitted on :func:`standardize`'s z, as W and b on the raw inputs."""
    w = w_EH / std_H
    return w.detach(), (None if b_E is None else (b_E - w @ mean_H).detach())


def fit_linear_router(x_TH: torch.Tensor, target_idx_TK: torch.Tensor, num_experts: int, bias: bool = True,
                      ridge: float = 1e-2, scores_TE: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear router (W [E, H], b [E] or None, fp32) whose top-K on ``x_TH`` reproduces ``target_idx_TK``.

    Closed-form ridge regression (strength ``ridge``·T on standardised inputs) to the k-hot target,
    or to ``scores_TE`` when given. It beat fits of the PA loss, softmax CE and per-expert BCE
    (bench/bench_structures.py, bench/moe_lab.py; docs/method.md §4), and needs no iterations.
    """
    z_TH, mean_H, std_H = standardize(x_TH.detach(), bias)
    y_TE = k_hot(target_idx_TK, num_experts) if scores_TE is None else scores_TE.float()
    y_mean_E = y_TE.mean(dim=0) if bias else torch.zeros(num_experts, device=y_TE.device)
    w_EH = _ridge_solve(z_TH, y_TE - y_mean_E, ridge).T
    return fold_standardization(w_EH, y_mean_E if bias else None, mean_H, std_H)


def _ridge_solve(z_TF: torch.Tensor, y_TO: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_C ||z C - y||^2 + ridge*T ||C||^2: [F, O] (z standardised, y centred)."""
    gram_FF = z_TF.T @ z_TF
    gram_FF.diagonal().add_(ridge * z_TF.shape[0])
    return torch.linalg.solve(gram_FF, z_TF.T @ y_TO)


def fit_expert_local_router(x_TH: torch.Tensor, y_TE: torch.Tensor, groups_ER: torch.Tensor, gate_IH: torch.Tensor,
                            up_IH: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router whose expert e sees x only through its own neurons' gate and up projections.

    Expert e's score is a ridge regression of its target column ``y_TE[:, e]`` on the 2R features
    (g_i·x, u_i·x), i in e, folded back to one row W[e] = sum_i c_i g_i + c'_i u_i (and a bias). Fitting
    2R coefficients per expert instead of H makes it a far smaller model than a free E x H fit, anchored
    in the weights rather than in the calibration text's hidden states. (W [E, H], b [E]), fp32.
    """
    x = x_TH.float()
    num_experts, hidden = groups_ER.shape[0], x.shape[1]
    w_EH, b_E = torch.zeros(num_experts, hidden, device=x.device), torch.zeros(num_experts, device=x.device)
    for e, idx in enumerate(groups_ER):
        basis_FH = torch.cat([gate_IH[idx], up_IH[idx]]).float()
        f_TF = x @ basis_FH.T
        mean_F, std_F = f_TF.mean(dim=0), f_TF.std(dim=0).clamp_min(1e-6)
        y_T = y_TE[:, e].float()
        c_F = _ridge_solve((f_TF - mean_F) / std_F, (y_T - y_T.mean()).unsqueeze(1), ridge)[:, 0] / std_F
        w_EH[e] = c_F @ basis_FH
        b_E[e] = y_T.mean() - c_F @ mean_F
    return w_EH, b_E


def expert_gains(routed_ETH: torch.Tensor, target_TH: torch.Tensor) -> torch.Tensor:
    """How much adding expert e alone lowers ||target||^2 (the routed part of the FFN output):
    2<E_e, t> - ||E_e||^2, per token and expert, [T, E]."""
    out = routed_ETH.float()
    return 2 * torch.einsum("eth,th->te", out, target_TH.float()) - out.pow(2).sum(dim=-1).T


ROUTER_FITS = ("gate", "gate-w", "gate-z", "gate-b", "picks", "gain", "norm", "lowrank", "local-picks", "local-gain")
DATA_FREE_FITS = ("gate", "gate-w", "gate-z")  # need neither the oracle nor any expert's output
LOWRANK_RANK = 64  # the rank of the "lowrank" neuron-contribution predictor


def router_targets(method: str, routed_ETH: torch.Tensor, oracle_TK: torch.Tensor) -> torch.Tensor | None:
    """What ``method`` regresses, per token and expert, from one block of tokens: [T, E] (None: nothing).

    ``picks``: the oracle's k-hot choice; ``gain``: :func:`expert_gains` against the sum of the routed experts;
    ``norm``: each expert's output norm ||E_e(x)|| (D2DMoE, arXiv 2310.04361)."""
    if method in ("picks", "local-picks", "gate-b"):
        return k_hot(oracle_TK, routed_ETH.shape[0])
    if method in ("gain", "local-gain"):
        return expert_gains(routed_ETH, routed_ETH.sum(dim=0))
    if method == "norm":
        return routed_ETH.float().norm(dim=-1).T
    return None


def frequency_bias(scores_TE: torch.Tensor, target_share_E: torch.Tensor, k: int, steps: int = 200) -> torch.Tensor:
    """b [E] such that top-k of ``scores + b`` picks each expert on about ``target_share`` of the tokens."""
    bias_E = torch.zeros(scores_TE.shape[1], device=scores_TE.device)
    step = scores_TE.std() * 0.05
    for _ in range(steps):
        picked_TE = k_hot(torch.topk(scores_TE + bias_E, k, dim=-1).indices, scores_TE.shape[1])
        bias_E += step * torch.sign(target_share_E - picked_TE.mean(dim=0))
        step *= 0.98
    return bias_E


def fit_router(method: str, x_TH: torch.Tensor, y_TE: torch.Tensor | None, act_TI: torch.Tensor,
               groups_ER: torch.Tensor, gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor,
               ridge: float = 0.1, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's linear router (W [E, H], b [E] or None without ``bias``, fp32) by ``method`` (docs/method.md §4).

    ``gate`` (EMoE, arXiv 2310.10908): W[e] = the mean gate row of e's neurons, b = 0: no data, so nothing of
    the calibration text is learned. ``gate-w``: the same mean, each neuron's row weighted by the size of its term
    when its gate opens (mean |u_i x| on the calibration tokens times ||W_down[:, i]||). ``picks`` / ``gain`` /
    ``norm``: ridge on x to :func:`router_targets` (``y_TE``). ``lowrank`` (Deja Vu): each neuron's contribution
    |a_i|·||d_i|| predicted from a rank-64 projection of x; summed over an expert, the predictor folds into the
    router. ``local-*``: :func:`fit_expert_local_router` to the picks or the gains.
    """
    if not bias and method not in ("picks", "gain", "norm"):  # a fit without an intercept where there is one
        return fit_router(method, x_TH, y_TE, act_TI, groups_ER, gate_IH, up_IH, down_HI, ridge)[0], None
    num_experts = groups_ER.shape[0]
    down_norm_I = down_HI.float().norm(dim=0)
    if method in DATA_FREE_FITS or method == "gate-b":
        weight_I = (x_TH.float() @ up_IH.float().T).abs().mean(dim=0) * down_norm_I if method == "gate-w" else \
            torch.ones_like(down_norm_I)
        w_ER = weight_I[groups_ER]
        rows_EH = (gate_IH[groups_ER].float() * w_ER.unsqueeze(-1)).sum(dim=1) / w_ER.sum(dim=1, keepdim=True)
        bias_E = torch.zeros(num_experts, device=rows_EH.device)
        if method == "gate-z":  # every expert's score in units of its own spread on the calibration tokens
            scores_TE = x_TH.float() @ rows_EH.T
            std_E = scores_TE.std(dim=0).clamp_min(1e-12)
            rows_EH, bias_E = rows_EH / std_E.unsqueeze(1), -scores_TE.mean(dim=0) / std_E
        elif method == "gate-b":  # one bias per expert: picked as often as the oracle picks it
            bias_E = frequency_bias(x_TH.float() @ rows_EH.T, y_TE.float().mean(dim=0), int(y_TE[0].sum()))
        return rows_EH, bias_E
    if method == "lowrank":
        y_TE = (act_TI.float().abs() * down_norm_I)[:, groups_ER].sum(dim=-1)
    elif y_TE is None:
        raise ValueError(f"unknown router fit {method!r}; expected one of {ROUTER_FITS}")
    y_TE = y_TE.float()
    if method not in ("picks", "local-picks"):  # regression targets in units of their spread
        y_TE = y_TE / y_TE.std().clamp_min(1e-12)
    if method.startswith("local-"):
        return fit_expert_local_router(x_TH, y_TE, groups_ER, gate_IH, up_IH, ridge)
    if method == "lowrank":
        z_TH, mean_H, std_H = standardize(x_TH, True)
        basis_QH = torch.linalg.svd(z_TH[:: max(1, z_TH.shape[0] // 8192)], full_matrices=False)[2][:LOWRANK_RANK]
        coef_QE = _ridge_solve(z_TH @ basis_QH.T, y_TE - y_TE.mean(dim=0), ridge)
        return fold_standardization(coef_QE.T @ basis_QH, y_TE.mean(dim=0), mean_H, std_H)
    if method in ("picks", "gain", "norm"):
        return fit_linear_router(x_TH, None, num_experts, bias, ridge=ridge, scores_TE=y_TE)
    raise ValueError(f"unknown router fit {method!r}; expected one of {ROUTER_FITS}")
