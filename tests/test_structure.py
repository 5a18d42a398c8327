"""structure: shared + routed experts, importance, the ridge router and the refit, on tiny random tensors.

The research tools of bench_structures.py (oracle, other router fits) are tested in test_bench_lab.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny
from factorllm_ds import structure as st
from factorllm_ds.shape import MoEShape
from factorllm_ds.split import SPLIT_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only wait on each other

H, I = 16, 48


def tiny_ffn(seed: int = 0, tokens: int = 64):
    return tiny.ffn_tensors(seed, tokens, H, I)


acts = tiny.swiglu_acts


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))


# ----------------------------------------------------------------------------- importance


def test_contribution_is_mean_abs_activation_times_down_norm() -> None:
    act = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, -1.0]])
    down = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # column norms 5, 1, 1
    imp = st.neuron_importance(act, down, "contribution")
    torch.testing.assert_close(imp, torch.tensor([2.0 * 5, 2.0 * 1, 0.5 * 1]))


def test_activation_rate_counts_tokens_where_the_neuron_is_in_the_top_share() -> None:
    # 4 neurons, top_fraction 0.5: the 2 largest |a| per token are marked.
    act = torch.tensor([[9.0, -8.0, 1.0, 0.0],    # neurons 0, 1
                        [0.0, 5.0, -6.0, 1.0],    # neurons 2, 1
                        [7.0, 0.1, 0.2, -3.0]])   # neurons 0, 3
    rate = st.neuron_importance(act, torch.ones(2, 4), "activation_rate", top_fraction=0.5)
    torch.testing.assert_close(rate, torch.tensor([2 / 3, 2 / 3, 1 / 3, 1 / 3]))


def test_activation_rate_ignores_down_norms_and_contribution_does_not() -> None:
    act = torch.ones(5, 3)
    down = torch.diag(torch.tensor([1.0, 10.0, 100.0]))
    assert torch.unique(st.neuron_importance(act, down, "activation_rate", top_fraction=1.0)).numel() == 1
    assert st.neuron_importance(act, down, "contribution").argmax() == 2


def test_unknown_importance_kind_is_named() -> None:
    with pytest.raises(ValueError, match="importance kind 'norm'"):
        st.neuron_importance(torch.ones(2, 3), torch.ones(2, 3), "norm")


# ----------------------------------------------------------------------------- partition


@pytest.mark.parametrize("method", SPLIT_METHODS)
@pytest.mark.parametrize("shared,experts", [(12, 4), (0, 6), (24, 3), (47, 1)])
def test_partition_is_a_permutation_with_the_most_important_neurons_shared(method, shared, experts) -> None:
    x, gate, up, down = tiny_ffn()
    act = acts(x, gate, up)
    imp = st.neuron_importance(act, down)
    perm = st.shared_partition(imp, shared, experts, method, seed=1, act_TI=act, weights=(gate, up, down))
    assert is_permutation(perm, I)
    top = set(torch.topk(imp, shared).indices.tolist())
    assert set(perm[:shared].tolist()) == top
    assert st.routed_groups(perm, shared, experts).shape == (experts, (I - shared) // experts)


def test_coactivation_groups_neurons_that_fire_together() -> None:
    # Two token populations: neurons 8..27 fire on the first, 28..47 on the second.
    act = torch.zeros(40, I)
    act[:20, 8:28] = torch.rand(20, 20) + 1
    act[20:, 28:] = torch.rand(20, 20) + 1
    act[:, :8] = 10.0  # the 8 heaviest: shared
    perm = st.shared_partition(st.neuron_importance(act, torch.ones(4, I)), 8, 2, "coactivation", act_TI=act)
    groups = {frozenset(g.tolist()) for g in st.routed_groups(perm, 8, 2)}
    assert groups == {frozenset(range(8, 28)), frozenset(range(28, 48))}


@pytest.mark.parametrize("shared,experts,needle", [
    (-1, 4, "num_shared -1"), (I, 4, "num_shared 48"), (8, 7, "num_experts 7"),
    (8, 0, "num_experts 0"), (8, 41, "num_experts 41"),
])
def test_bad_structure_raises_naming_the_problem(shared, experts, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        st.shared_partition(torch.rand(I), shared, experts, "contiguous")


def test_bad_num_experts_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid: 1, 2, 4, 5, 8, 10, 20, 40"):
        st.check_shared_split(I, 8, 7)
    with pytest.raises(ValueError, match="top_k 5"):
        st.check_shared_split(I, 8, 4, top_k=5)
    assert MoEShape(1, 1, 1536, 384).valid_num_experts() == [e for e in range(1, 1153) if 1152 % e == 0]


def test_calibrated_split_without_calibration_says_what_it_needs() -> None:
    with pytest.raises(ValueError, match="act_TI"):
        st.shared_partition(torch.rand(I), 8, 4, "coactivation")
    with pytest.raises(ValueError, match="weights"):
        st.shared_partition(torch.rand(I), 8, 4, "kmeans")


@pytest.mark.parametrize("spec,count", [("0.25", 384), ("0.125", 192), (0.375, 576), ("384", 384), ("0", 0),
                                        (0, 0), ("0.0", 0), (" 12 ", 12)])
def test_parse_shared(spec, count) -> None:
    assert st.parse_shared(spec, 1536) == count


@pytest.mark.parametrize("spec,needle", [("1.0", "fraction"), ("-0.1", "fraction"), ("1536", "1536 neurons"),
                                         ("-3", "-3 neurons"), ("quarter", "expected a fraction")])
def test_parse_shared_rejects(spec, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        st.parse_shared(spec, 1536)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("shared,experts", [(12, 4), (0, 3), (24, 8)])
def test_shared_plus_every_routed_expert_is_the_dense_ffn(shared, experts) -> None:
    x, gate, up, down = tiny_ffn()
    act = acts(x, gate, up)
    perm = st.shared_partition(torch.rand(I), shared, experts, "random", seed=3)
    shared_TH = st.group_outputs(act, down, perm[:shared].unsqueeze(0))[0]
    routed_ETH = st.group_outputs(act, down, st.routed_groups(perm, shared, experts))
    torch.testing.assert_close(shared_TH + routed_ETH.sum(dim=0), act @ down.T, atol=1e-5, rtol=0)
    # and one expert fewer is not: the check above can fail
    assert (shared_TH + routed_ETH[1:].sum(dim=0) - act @ down.T).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the router


def planted(tokens: int = 2000, experts: int = 6, k: int = 2, seed: int = 0):
    """Tokens whose K experts a hidden linear router picks; features of very different scales."""
    w_true = torch.randn(experts, H, generator=torch.Generator().manual_seed(100))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-1, 1, H)
    return x, torch.topk(x @ w_true.T, k, dim=-1).indices


def agreement(x_TH, w_EH, b_E, target_idx_TK) -> float:
    """Share of the target's experts that the router's top-K also picks."""
    pred_TK = torch.topk(F.linear(x_TH, w_EH, b_E), target_idx_TK.shape[1], dim=-1).indices
    return (pred_TK.unsqueeze(-1) == target_idx_TK.unsqueeze(-2)).any(dim=-1).float().mean().item()


@pytest.mark.parametrize("bias", [True, False])
def test_fitted_router_finds_a_planted_linear_oracle(bias) -> None:
    x, idx = planted()
    x_test, idx_test = planted(seed=1)  # same planted router, unseen tokens
    w, b = st.fit_linear_router(x, idx, 6, bias=bias)
    assert w.shape == (6, H) and (b is None) == (not bias)
    w_rand = torch.randn(6, H, generator=torch.Generator().manual_seed(9))
    fitted, chance = agreement(x_test, w, b, idx_test), agreement(x_test, w_rand, None, idx_test)
    assert fitted > 0.85 and chance < 0.5, (fitted, chance)


def test_ridge_router_to_scores_recovers_linear_scores() -> None:
    x, _ = planted()
    w_true = torch.randn(4, H, generator=torch.Generator().manual_seed(5))
    scores = x @ w_true.T + 3.0
    w, b = st.fit_linear_router(x, torch.topk(scores, 2).indices, 4, bias=True, ridge=1e-6, scores_TE=scores)
    torch.testing.assert_close(w, w_true, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b, torch.full((4,), 3.0), atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- down-projection refit


def test_neuron_gates_follow_the_routing() -> None:
    perm = torch.tensor([6, 5, 0, 1, 2, 3, 4, 7])
    idx_TK = torch.tensor([[0, 2], [1, 2]])
    weights_TK = torch.tensor([[1.0, 0.5], [2.0, 1.0]])
    gates_TI = st.neuron_gates(idx_TK, weights_TK, perm, num_shared=2, num_experts=3)
    # neurons 6, 5 shared; expert 0 = {0, 1}, expert 1 = {2, 3}, expert 2 = {4, 7}
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.5],
                         [0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(gates_TI, want)


def _refit_problem(seed: int = 0, tokens: int = 400, inter: int = 24, hidden: int = 8):
    gen = torch.Generator().manual_seed(seed)
    # correlated neurons (as in a real FFN): the ones left on can stand in for the ones switched off
    act_TI = torch.randn(tokens, 6, generator=gen) @ torch.randn(6, inter, generator=gen)
    act_TI += 0.1 * torch.randn(tokens, inter, generator=gen)
    down_HI = torch.randn(hidden, inter, generator=gen)
    gates_TI = (torch.rand(tokens, inter, generator=gen) < 0.5).float()
    return act_TI, gates_TI, down_HI, act_TI @ down_HI.T


def test_refit_down_minimises_its_objective() -> None:
    """Stationary point of ‖(a⊙g)Wᵀ − t‖² + Σ d_i‖W_i − W0_i‖² (the objective is convex, so it is the minimum),
    and its data term is below the dense slice's (the penalty is 0 there)."""
    act_TI, gates_TI, down_HI, target_TH = _refit_problem()
    ridge = 0.5
    w_HI = st.refit_down(act_TI, gates_TI, down_HI, target_TH, ridge).double()
    a_TI, d_I = (act_TI * gates_TI).double(), ridge * act_TI.double().pow(2).sum(0) + 1e-8
    grad_IH = a_TI.T @ (a_TI @ w_HI.T - target_TH.double()) + d_I.unsqueeze(1) * (w_HI - down_HI.double()).T
    assert grad_IH.abs().max() <= 1e-4 * (a_TI.T @ target_TH.double()).abs().max()
    err = lambda w: (a_TI @ w.double().T - target_TH.double()).pow(2).sum().item()  # noqa: E731
    assert err(w_HI) < err(down_HI)
    assert err(st.refit_down(act_TI, gates_TI, down_HI, target_TH, 1e-3)) < 0.9 * err(down_HI)


def test_refit_down_limits() -> None:
    act_TI, gates_TI, down_HI, target_TH = _refit_problem(seed=1)
    # nothing to correct (every neuron on): the dense slice is the answer at any ridge (fp32 solve, low-rank a)
    assert torch.allclose(st.refit_down(act_TI, torch.ones_like(gates_TI), down_HI, target_TH, 1e-3), down_HI,
                          atol=5e-3)
    # a very strong ridge keeps the dense slice; a weak one moves away from it
    assert torch.allclose(st.refit_down(act_TI, gates_TI, down_HI, target_TH, 1e6), down_HI, atol=1e-4)
    assert (st.refit_down(act_TI, gates_TI, down_HI, target_TH, 0.01) - down_HI).abs().max() > 0.1


# ----------------------------------------------------------------------------- router fits (convert --router-fit)


def _layer(tokens: int = 600, hidden: int = 12, neurons: int = 48, experts: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    gate, up, down = (torch.randn(neurons, hidden, generator=gen), torch.randn(neurons, hidden, generator=gen),
                      torch.randn(hidden, neurons, generator=gen))
    act = F.silu(x @ gate.T) * (x @ up.T)
    groups = torch.randperm(neurons, generator=gen).view(experts, -1)
    return x, gate, up, down, act, groups


@pytest.mark.parametrize("method", st.ROUTER_FITS)
def test_every_router_fit_is_one_linear_router(method) -> None:
    from factorllm_ds.hf_model.modeling_factorllm import prior_topk

    x, gate, up, down, act, groups = _layer()
    routed = st.group_outputs(act, down, groups)
    oracle = prior_topk(routed, routed.sum(0), 2, "subset", 1.0)
    targets = None if method in st.DATA_FREE_FITS else st.router_targets(method, routed, oracle)
    w, b = st.fit_router(method, x, targets, act, groups, gate, up, down)
    assert w.shape == (6, 12) and b.shape == (6,) and torch.isfinite(w).all() and torch.isfinite(b).all()
    w_nb, b_nb = st.fit_router(method, x, targets, act, groups, gate, up, down, bias=False)
    assert b_nb is None and w_nb.shape == (6, 12)


def test_gate_router_is_each_experts_mean_gate_row_and_reads_no_data() -> None:
    x, gate, up, down, act, groups = _layer()
    w, b = st.fit_router("gate", x, None, act, groups, gate, up, down)
    assert torch.allclose(w, gate[groups].mean(dim=1)) and not b.any()
    w2, _ = st.fit_router("gate", x[:10] * 7, None, act[:10], groups, gate, up, down)
    assert torch.equal(w, w2)  # no calibration token changes it


def test_gate_b_picks_each_expert_as_often_as_the_oracle() -> None:
    from factorllm_ds.hf_model.modeling_factorllm import prior_topk

    x, gate, up, down, act, groups = _layer(tokens=2000)
    routed = st.group_outputs(act, down, groups)
    oracle = prior_topk(routed, routed.sum(0), 2, "subset", 1.0)
    w, b = st.fit_router("gate-b", x, st.router_targets("gate-b", routed, oracle), act, groups, gate, up, down)
    share = st.k_hot(torch.topk(x @ w.T + b, 2).indices, 6).mean(0)
    target = st.k_hot(oracle, 6).mean(0)
    plain = st.k_hot(torch.topk(x @ w.T, 2).indices, 6).mean(0)
    assert (share - target).abs().max() < 0.02 < (plain - target).abs().max()


def test_lowrank_router_is_the_sum_of_its_neuron_predictions() -> None:
    """Deja Vu's neuron predictor, folded: expert e's score regresses the summed contributions of e's neurons (a
    sum of linear per-neuron predictions is one linear row); the scores keep that target's mean and follow it."""
    x, gate, up, down, act, groups = _layer(hidden=12)
    w, b = st.fit_router("lowrank", x, None, act, groups, gate, up, down)
    contrib = (act.abs() * down.norm(dim=0))[:, groups].sum(-1)  # what each expert's score regresses
    scores = x @ w.T + b
    # a least-squares fit with an intercept reproduces the target's mean, and correlates with it
    scale = contrib.std()
    assert torch.allclose(scores.mean(0), contrib.mean(0) / scale, atol=1e-3)
    assert all(torch.corrcoef(torch.stack([scores[:, e], contrib[:, e]]))[0, 1] > 0.3 for e in range(6))
