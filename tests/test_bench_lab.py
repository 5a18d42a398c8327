"""bench/moe_lab.py: the reference MoE forward, the oracle and the router variants that
bench_structures.py compares (their numbers are in bench/RESULTS.md), on tiny random tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny
from factorllm_ds import structure as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import moe_lab as lab  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only wait on each other

H, I = 16, 48


def tiny_ffn(seed: int = 0, tokens: int = 64):
    return tiny.ffn_tensors(seed, tokens, H, I)


acts = tiny.swiglu_acts


# ----------------------------------------------------------------------------- the reference forward


@pytest.mark.parametrize("shared,experts", [(12, 4), (0, 3), (24, 8)])
def test_shared_plus_every_routed_expert_is_the_dense_ffn(shared, experts) -> None:
    x, gate, up, down = tiny_ffn()
    dense = lab.ffn(x, gate, up, down)
    perm = st.shared_partition(torch.rand(I), shared, experts, "random", seed=3)
    w = lab.slice_shared_moe(gate, up, down, perm, shared, experts)
    routed = lab.routed_outputs(x, w)
    all_idx = torch.arange(experts).expand(x.shape[0], -1)
    torch.testing.assert_close(lab.combine(lab.shared_output(x, w), routed, all_idx), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(lab.moe_forward(x, w, all_idx), dense, atol=1e-5, rtol=0)
    # the same outputs from known activations (what calibration uses)
    torch.testing.assert_close(st.group_outputs(acts(x, gate, up), down, st.routed_groups(perm, shared, experts)),
                               routed, atol=1e-5, rtol=0)


def test_sparse_dispatch_equals_the_gathered_sum_of_the_chosen_experts() -> None:
    x, gate, up, down = tiny_ffn()
    w = lab.slice_shared_moe(gate, up, down, st.shared_partition(torch.rand(I), 8, 5, "random"), 8, 5)
    idx = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2] for t in range(x.shape[0])])
    expected = lab.combine(lab.shared_output(x, w), lab.routed_outputs(x, w), idx)
    torch.testing.assert_close(lab.moe_forward(x, w, idx), expected, atol=1e-5, rtol=0)
    # and it is not the dense output: the check above can fail
    assert (expected - lab.ffn(x, gate, up, down)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- oracle


def test_oracle_picks_the_subset_closest_to_the_residual() -> None:
    e0, e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 5.0]])
    routed = torch.stack([e0, e1, e2])
    shared = torch.tensor([[6.0, 6.0]])
    # t - shared = (1, 1) = e0 + e1; closest to t itself would be e2 + one of the others
    assert sorted(lab.oracle_topk(routed, shared, torch.tensor([[7.0, 7.0]]), 2)[0].tolist()) == [0, 1]
    assert 2 in lab.oracle_topk(routed, torch.zeros(1, 2), torch.tensor([[6.0, 6.0]]), 2)[0].tolist()


def test_oracle_with_all_experts_is_exact() -> None:
    x, gate, up, down = tiny_ffn()
    w = lab.slice_shared_moe(gate, up, down, st.shared_partition(torch.rand(I), 12, 4, "random"), 12, 4)
    routed, shared = lab.routed_outputs(x, w), lab.shared_output(x, w)
    idx = lab.oracle_topk(routed, shared, lab.ffn(x, gate, up, down), 4)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(4).expand(x.shape[0], -1))


def test_residual_gain_is_the_error_drop_of_one_expert() -> None:
    routed = torch.randn(3, 5, 4)
    r = torch.randn(5, 4)
    gain = lab.residual_gain(routed, r)
    drop = r.pow(2).sum(-1).unsqueeze(1) - (r.unsqueeze(0) - routed).pow(2).sum(-1).T
    torch.testing.assert_close(gain, drop, atol=1e-5, rtol=1e-5)


def test_topk_agreement() -> None:
    assert lab.topk_agreement(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 0]])) == 0.75


# ----------------------------------------------------------------------------- routers


def planted(tokens: int = 2000, experts: int = 6, k: int = 2, seed: int = 0):
    """Tokens whose K experts a hidden linear router picks; features of very different scales."""
    w_true = torch.randn(experts, H, generator=torch.Generator().manual_seed(100))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-1, 1, H)
    return x, torch.topk(x @ w_true.T, k, dim=-1).indices


@pytest.mark.parametrize("loss", lab.ROUTER_LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_fitted_router_finds_a_planted_linear_oracle(loss, bias) -> None:
    x, idx = planted()
    x_test, idx_test = planted(seed=1)  # same planted router, unseen tokens
    w, b = lab.fit_router(x, idx, 6, bias=bias, loss=loss)
    assert w.shape == (6, H) and (b is None) == (not bias)
    fitted = lab.topk_agreement(lab.linear_topk(x_test, w, b, 2), idx_test)
    w_rand = torch.randn(6, H, generator=torch.Generator().manual_seed(9))
    chance = lab.topk_agreement(lab.linear_topk(x_test, w_rand, None, 2), idx_test)
    assert fitted > 0.85 and chance < 0.5, (fitted, chance)


def test_router_fit_works_under_no_grad() -> None:
    x, idx = planted(tokens=200)
    with torch.no_grad():
        for loss in ("pa", "ce"):
            w, _ = lab.fit_router(x, idx, 6, loss=loss, steps=5)
            assert w.abs().sum() > 0  # it moved from its zero start


def test_unknown_router_loss_is_named() -> None:
    with pytest.raises(ValueError, match="router loss 'mse'"):
        lab.fit_router(torch.randn(4, H), torch.zeros(4, 1, dtype=torch.long), 2, loss="mse")


def test_representatives_are_the_most_central_neurons_and_scores_follow_them() -> None:
    x, gate, up, down = tiny_ffn(tokens=200)
    act = acts(x, gate, up)
    perm = st.shared_partition(st.neuron_importance(act, down), 8, 4, "coactivation", act_TI=act)
    reps = lab.representative_neurons(act, perm, 8, 4, 3)
    assert reps.shape == (4, 3)
    for e, group in enumerate(st.routed_groups(perm, 8, 4)):
        assert set(reps[e].tolist()) <= set(group.tolist())
    scores = lab.representative_scores(x, gate, up, down, reps)
    expected = (act[:, reps.flatten()].abs() * down[:, reps.flatten()].norm(dim=0)).view(-1, 4, 3).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="m = 11"):
        lab.representative_neurons(act, perm, 8, 4, 11)
