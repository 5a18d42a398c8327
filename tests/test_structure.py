"""structure: shared + routed experts, importance, oracle and routers, on tiny random tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factorllm_ds import structure as st

H, I = 16, 48


@pytest.fixture(autouse=True)
def one_thread():
    # These tensors are tiny: on a busy machine extra intra-op threads only wait on each other
    # (the router fits ran 7x slower with 2 threads than with 1 on a loaded 2-core CI box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_ffn(seed: int = 0, tokens: int = 64):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(I, H, generator=g) / H ** 0.5
    up = torch.randn(I, H, generator=g) / H ** 0.5
    down = torch.randn(H, I, generator=g) / I ** 0.5
    x = torch.randn(tokens, H, generator=g)
    return x, gate, up, down


def acts(x, gate, up):
    return F.silu(x @ gate.T) * (x @ up.T)


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


@pytest.mark.parametrize("method", st.ROUTED_SPLITS)
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
    assert st.valid_num_experts(1536, 384) == [e for e in range(1, 1153) if 1152 % e == 0]


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
    dense = st.ffn(x, gate, up, down)
    perm = st.shared_partition(torch.rand(I), shared, experts, "random", seed=3)
    w = st.slice_shared_moe(gate, up, down, perm, shared, experts)
    routed = st.routed_outputs(x, w)
    all_idx = torch.arange(experts).expand(x.shape[0], -1)
    torch.testing.assert_close(st.combine(st.shared_output(x, w), routed, all_idx), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.moe_forward(x, w, all_idx), dense, atol=1e-5, rtol=0)
    # the same outputs from known activations (what calibration uses)
    act = acts(x, gate, up)
    torch.testing.assert_close(st.group_outputs(act, down, st.routed_groups(perm, shared, experts)), routed,
                               atol=1e-5, rtol=0)


def test_sparse_dispatch_equals_the_gathered_sum_of_the_chosen_experts() -> None:
    x, gate, up, down = tiny_ffn()
    w = st.slice_shared_moe(gate, up, down, st.shared_partition(torch.rand(I), 8, 5, "random"), 8, 5)
    idx = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2] for t in range(x.shape[0])])
    expected = st.combine(st.shared_output(x, w), st.routed_outputs(x, w), idx)
    torch.testing.assert_close(st.moe_forward(x, w, idx), expected, atol=1e-5, rtol=0)
    # and it is not the dense output: the check above can fail
    assert (expected - st.ffn(x, gate, up, down)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- oracle


def test_oracle_picks_the_subset_closest_to_the_residual() -> None:
    e0, e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 5.0]])
    routed = torch.stack([e0, e1, e2])
    shared = torch.tensor([[6.0, 6.0]])
    # t - shared = (1, 1) = e0 + e1; closest to t itself would be e2 + one of the others
    assert sorted(st.oracle_topk(routed, shared, torch.tensor([[7.0, 7.0]]), 2)[0].tolist()) == [0, 1]
    assert 2 in st.oracle_topk(routed, torch.zeros(1, 2), torch.tensor([[6.0, 6.0]]), 2)[0].tolist()


def test_oracle_with_all_experts_is_exact() -> None:
    x, gate, up, down = tiny_ffn()
    w = st.slice_shared_moe(gate, up, down, st.shared_partition(torch.rand(I), 12, 4, "random"), 12, 4)
    routed, shared = st.routed_outputs(x, w), st.shared_output(x, w)
    idx = st.oracle_topk(routed, shared, st.ffn(x, gate, up, down), 4)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(4).expand(x.shape[0], -1))


def test_residual_gain_is_the_error_drop_of_one_expert() -> None:
    routed = torch.randn(3, 5, 4)
    r = torch.randn(5, 4)
    gain = st.residual_gain(routed, r)
    drop = r.pow(2).sum(-1).unsqueeze(1) - (r.unsqueeze(0) - routed).pow(2).sum(-1).T
    torch.testing.assert_close(gain, drop, atol=1e-5, rtol=1e-5)


def test_topk_agreement() -> None:
    assert st.topk_agreement(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 0]])) == 0.75


# ----------------------------------------------------------------------------- routers


def planted(tokens: int = 2000, experts: int = 6, k: int = 2, seed: int = 0):
    """Tokens whose K experts a hidden linear router picks; features of very different scales."""
    w_true = torch.randn(experts, H, generator=torch.Generator().manual_seed(100))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-1, 1, H)
    return x, torch.topk(x @ w_true.T, k, dim=-1).indices


@pytest.mark.parametrize("loss", st.ROUTER_LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_fitted_router_finds_a_planted_linear_oracle(loss, bias) -> None:
    x, idx = planted()
    x_test, idx_test = planted(seed=1)  # same planted router, unseen tokens
    w, b = st.fit_linear_router(x, idx, 6, bias=bias, loss=loss)
    assert w.shape == (6, H) and (b is None) == (not bias)
    fitted = st.topk_agreement(st.linear_topk(x_test, w, b, 2), idx_test)
    w_rand = torch.randn(6, H, generator=torch.Generator().manual_seed(9))
    chance = st.topk_agreement(st.linear_topk(x_test, w_rand, None, 2), idx_test)
    assert fitted > 0.85 and chance < 0.5, (fitted, chance)


def test_ridge_router_to_scores_recovers_linear_scores() -> None:
    x, _ = planted()
    w_true = torch.randn(4, H, generator=torch.Generator().manual_seed(5))
    scores = x @ w_true.T + 3.0
    w, b = st.fit_linear_router(x, torch.topk(scores, 2).indices, 4, bias=True, loss="ridge", scores_TE=scores,
                                ridge=1e-6)
    torch.testing.assert_close(w, w_true, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b, torch.full((4,), 3.0), atol=1e-3, rtol=1e-3)


def test_router_fit_works_under_no_grad() -> None:
    x, idx = planted(tokens=200)
    with torch.no_grad():
        for loss in ("pa", "ce"):
            st.fit_linear_router(x, idx, 6, loss=loss, steps=5)


def test_unknown_router_loss_is_named() -> None:
    with pytest.raises(ValueError, match="router loss 'mse'"):
        st.fit_linear_router(torch.randn(4, H), torch.zeros(4, 1, dtype=torch.long), 2, loss="mse")


def test_representatives_are_the_most_central_neurons_and_scores_follow_them() -> None:
    x, gate, up, down = tiny_ffn(tokens=200)
    act = acts(x, gate, up)
    perm = st.shared_partition(st.neuron_importance(act, down), 8, 4, "coactivation", act_TI=act)
    reps = st.representative_neurons(act, perm, 8, 4, 3)
    assert reps.shape == (4, 3)
    for e, group in enumerate(st.routed_groups(perm, 8, 4)):
        assert set(reps[e].tolist()) <= set(group.tolist())
    scores = st.representative_scores(x, gate, up, down, reps)
    expected = (act[:, reps.flatten()].abs() * down[:, reps.flatten()].norm(dim=0)).view(-1, 4, 3).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="m = 11"):
        st.representative_neurons(act, perm, 8, 4, 11)


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
