"""Pure functions: partition a dense FFN's neurons into equal experts, and slice the weights.

A partition is a permutation ``perm`` of the I neurons: expert e owns
``perm[e*R : (e+1)*R]``, R = I/E (the letters are shape.py's; with a shared expert, structure.py
splits the I - S other neurons this way). Every method returns one, so slicing, export and analysis
need not know which method made it.
"""

from __future__ import annotations

import torch

SPLIT_METHODS = ("contiguous", "random", "kmeans", "coactivation")


def contiguous_partition(num_neurons: int) -> torch.Tensor:
    return torch.arange(num_neurons, device="cpu")


def random_partition(num_neurons: int, seed: int) -> torch.Tensor:
    # The CPU generator: the same permutation whichever device the conversion computes on.
    return torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed), device="cpu")


def balanced_assign(score_NE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign N items to E clusters, exactly ``capacity`` each, greedily by score.

    Rounds of proposals: every unassigned item proposes to its best open cluster, and each
    cluster keeps the best proposals that fit. At most E+1 rounds, all vectorized.
    """
    num_items, num_clusters = score_NE.shape
    labels_N = torch.full((num_items,), -1, dtype=torch.long, device=score_NE.device)
    remaining_E = torch.full((num_clusters,), capacity, dtype=torch.long, device=score_NE.device)
    while True:
        unassigned = torch.nonzero(labels_N < 0).squeeze(1)
        if unassigned.numel() == 0:
            return labels_N
        scores = score_NE[unassigned].masked_fill(remaining_E.unsqueeze(0) <= 0, float("-inf"))
        best, choice = scores.max(dim=1)
        for e in choice.unique().tolist():
            proposers = torch.nonzero(choice == e).squeeze(1)
            take = min(proposers.numel(), int(remaining_E[e]))
            keep = proposers[torch.topk(best[proposers], take).indices]
            labels_N[unassigned[keep]] = e
            remaining_E[e] -= take


def balanced_kmeans(features_NF: torch.Tensor, num_clusters: int, seed: int, iters: int = 15) -> torch.Tensor:
    """Equal-size spherical k-means: cluster labels [N] for unit-normalized rows.

    Similarity is the dot product (cosine, since rows are normalized); assignment is
    :func:`balanced_assign`, so every cluster gets exactly N/E rows.
    """
    num_items = features_NF.shape[0]
    capacity = num_items // num_clusters
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start whichever device computes
    start_E = torch.randperm(num_items, generator=gen, device="cpu")[:num_clusters]
    centroids_EF = features_NF[start_E.to(features_NF.device)].clone()
    labels_N = None
    for _ in range(iters):
        new_labels = balanced_assign(features_NF @ centroids_EF.T, capacity)
        if labels_N is not None and torch.equal(new_labels, labels_N):
            break
        labels_N = new_labels
        for e in range(num_clusters):
            centroid = features_NF[labels_N == e].mean(dim=0)
            centroids_EF[e] = centroid / centroid.norm().clamp_min(1e-12)
    return labels_N


def labels_to_partition(labels_N: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Permutation listing cluster 0's items (ascending), then cluster 1's, ..."""
    order = torch.argsort(labels_N * len(labels_N) + torch.arange(len(labels_N), device=labels_N.device))
    counts = torch.bincount(labels_N, minlength=num_clusters)
    if not bool((counts == counts[0]).all()):
        raise RuntimeError(f"internal error: unbalanced clusters {counts.tolist()}")
    return order


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kmeans_partition(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor,
                     num_experts: int, seed: int) -> torch.Tensor:
    """Balanced k-means over each neuron's normalized [W_gate row, W_up row, W_down column]."""
    features = _unit_rows(torch.cat([gate_IH.float(), up_IH.float(), down_HI.float().T], dim=1))
    return labels_to_partition(balanced_kmeans(features, num_experts, seed), num_experts)


def coactivation_partition(activations_TI: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """Neurons that fire together share an expert.

    Each neuron is described by its |activation| over the calibration tokens; normalized,
    the dot product of two profiles is their co-activation (cosine) similarity, and the
    balanced spherical k-means groups neurons with similar firing patterns.
    """
    features = _unit_rows(activations_TI.float().abs().T.contiguous())
    return labels_to_partition(balanced_kmeans(features, num_experts, seed), num_experts)


def partition(method: str, num_neurons: int, num_experts: int, seed: int, act_TI: torch.Tensor | None = None,
              weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              neurons_N: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation ``method`` makes of ``num_neurons`` neurons into ``num_experts`` equal groups: the one place
    a split method is chosen. ``neurons_N``: split only these of the neurons (the result then numbers positions in
    it). ``coactivation`` needs the activations ``act_TI``, ``kmeans`` the ``weights`` = (gate_IH, up_IH, down_HI);
    ``contiguous`` and ``random`` need neither."""
    every = neurons_N is None
    if method == "coactivation":
        if act_TI is None:
            raise ValueError("the coactivation split needs calibration activations act_TI")
        return coactivation_partition(act_TI if every else act_TI[:, neurons_N], num_experts, seed)
    if method == "kmeans":
        if weights is None:
            raise ValueError("the kmeans split needs weights=(gate_IH, up_IH, down_HI)")
        gate_IH, up_IH, down_HI = weights
        if not every:
            gate_IH, up_IH, down_HI = gate_IH[neurons_N], up_IH[neurons_N], down_HI[:, neurons_N]
        return kmeans_partition(gate_IH, up_IH, down_HI, num_experts, seed)
    count = num_neurons if every else neurons_N.numel()
    if method == "contiguous":
        return contiguous_partition(count)
    if method == "random":
        return random_partition(count, seed)
    raise ValueError(f"unknown routed split {method!r}; expected one of {SPLIT_METHODS}")


def expert_slice(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor, perm: torch.Tensor,
                 num_experts: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s (gate [R, H], up [R, H], down [H, R]), R = len(perm) / E, contiguous; exact, no arithmetic.

    When the expert's neurons are one consecutive range (the ``contiguous`` split), gate and up
    are row views of the inputs rather than copies (clone them before changing them in place).
    """
    size = perm.numel() // num_experts
    idx = perm[expert * size:(expert + 1) * size]
    first = int(idx[0]) if size else 0
    if torch.equal(idx, torch.arange(first, first + size, dtype=idx.dtype, device=idx.device)):
        return (gate_IH.narrow(0, first, size).contiguous(), up_IH.narrow(0, first, size).contiguous(),
                down_HI.narrow(1, first, size).contiguous())
    # Columns of down: gather with the index broadcast over rows picks exactly down[:, idx], and
    # runs about 4x faster than index_select(1, idx) on CPU (bf16, TinyLlama shapes).
    return (gate_IH.index_select(0, idx).contiguous(), up_IH.index_select(0, idx).contiguous(),
            torch.gather(down_HI, 1, idx.to(down_HI.device).expand(down_HI.shape[0], -1)))


def expert_slices(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor,
                  perm: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate [R, H], up [R, H], down [H, R]) for each expert: :func:`expert_slice` for all E."""
    return [expert_slice(gate_IH, up_IH, down_HI, perm, num_experts, e) for e in range(num_experts)]


def merge_experts(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`expert_slices`: dense (gate, up, down) in the original neuron order."""
    gate = torch.cat([g for g, _, _ in experts], dim=0)
    up = torch.cat([u for _, u, _ in experts], dim=0)
    down = torch.cat([d for _, _, d in experts], dim=1)
    inv = torch.argsort(perm)
    return gate.index_select(0, inv), up.index_select(0, inv), down.index_select(1, inv)
