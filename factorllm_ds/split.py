"""Pure functions: partition a dense FFN's neurons into equal experts, and slice the weights.

A partition is a permutation ``perm`` of the I neurons: expert e owns
``perm[e*I/E : (e+1)*I/E]``. Every method returns one, so slicing, export and analysis
need not know which method made it.
"""

from __future__ import annotations

import torch

SPLIT_METHODS = ("contiguous", "random", "kmeans", "coactivation")


def contiguous_partition(num_neurons: int) -> torch.Tensor:
    return torch.arange(num_neurons)


def random_partition(num_neurons: int, seed: int) -> torch.Tensor:
    return torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed))


def balanced_assign(score_NE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign N items to E clusters, exactly ``capacity`` each, greedily by score.

    Rounds of proposals: every unassigned item proposes to its best open cluster, and each
    cluster keeps the best proposals that fit. At most E+1 rounds, all vectorized.
    """
    num_items, num_clusters = score_NE.shape
    labels_N = torch.full((num_items,), -1, dtype=torch.long)
    remaining_E = torch.full((num_clusters,), capacity, dtype=torch.long)
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
    gen = torch.Generator().manual_seed(seed)
    centroids_EF = features_NF[torch.randperm(num_items, generator=gen)[:num_clusters]].clone()
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
    order = torch.argsort(labels_N * len(labels_N) + torch.arange(len(labels_N)))
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


def expert_slice(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor, perm: torch.Tensor,
                 num_experts: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s (gate [I/E, H], up [I/E, H], down [H, I/E]), contiguous; exact, no arithmetic.

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
    """(gate [I/E, H], up [I/E, H], down [H, I/E]) for each expert: :func:`expert_slice` for all E."""
    return [expert_slice(gate_IH, up_IH, down_HI, perm, num_experts, e) for e in range(num_experts)]


def merge_experts(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`expert_slices`: dense (gate, up, down) in the original neuron order."""
    gate = torch.cat([g for g, _, _ in experts], dim=0)
    up = torch.cat([u for _, u, _ in experts], dim=0)
    down = torch.cat([d for _, _, d in experts], dim=1)
    inv = torch.argsort(perm)
    return gate.index_select(0, inv), up.index_select(0, inv), down.index_select(1, inv)
