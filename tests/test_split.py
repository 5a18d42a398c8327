"""split: partitions, balanced assignment, slicing; and the 70B conversion plan on the meta device."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import pytest
import torch

from factorllm_ds import convert as convert_mod, hf_io as hf_io_mod, keys, split
from factorllm_ds.config import ConvertConfig, parse_size
from factorllm_ds.hf_io import StreamingSafetensorsWriter, TensorInfo
from factorllm_ds.layout import MANIFEST_FILE, load_partition

GEN = torch.Generator


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.dtype == torch.long and perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))


def synthetic_ffn(inter: int, hidden: int, seed: int = 0):
    g = GEN().manual_seed(seed)
    return torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), \
        torch.randn(hidden, inter, generator=g)


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("inter,experts", [(128, 4), (96, 8), (60, 3), (64, 1), (32, 32)])
@pytest.mark.parametrize("method", split.SPLIT_METHODS)
def test_every_method_gives_a_permutation_of_equal_groups(method, inter, experts):
    gate, up, down = synthetic_ffn(inter, 16)
    if method == "contiguous":
        perm = split.contiguous_partition(inter)
    elif method == "random":
        perm = split.random_partition(inter, seed=3)
    elif method == "kmeans":
        perm = split.kmeans_partition(gate, up, down, experts, seed=3)
    else:
        acts = torch.randn(200, inter, generator=GEN().manual_seed(4))
        perm = split.coactivation_partition(acts, experts, seed=3)
    assert is_permutation(perm, inter)
    pieces = split.expert_slices(gate, up, down, perm, experts)
    assert len(pieces) == experts
    size = inter // experts
    for g, u, d in pieces:
        assert g.shape == u.shape == (size, 16) and d.shape == (16, size)
    # Each group is a set of distinct neurons, and together they cover all of them exactly once.
    covered = torch.cat([perm[e * size:(e + 1) * size] for e in range(experts)])
    assert torch.equal(covered.sort().values, torch.arange(inter))


def test_contiguous_and_random_partitions():
    assert torch.equal(split.contiguous_partition(12), torch.arange(12))
    a, b, c = (split.random_partition(1000, s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != torch.arange(1000)).float().mean() > 0.9  # actually shuffled


def test_balanced_assign_exact_capacities_even_when_every_item_wants_one_cluster():
    scores = torch.randn(100, 5, generator=GEN().manual_seed(0))
    scores[:, 2] += 10  # all 100 items prefer cluster 2, which holds 20
    labels = split.balanced_assign(scores, capacity=20)
    assert labels.min() >= 0
    assert torch.bincount(labels, minlength=5).tolist() == [20] * 5
    # Cluster 2 keeps the 20 items that want it most.
    assert set(torch.nonzero(labels == 2).squeeze(1).tolist()) == set(scores[:, 2].topk(20).indices.tolist())


def test_balanced_assign_keeps_a_feasible_argmax():
    # Every item's favourite is already balanced (4 per cluster): nothing may be moved.
    favourite = torch.arange(16) % 4
    scores = torch.rand(16, 4, generator=GEN().manual_seed(1))
    scores[torch.arange(16), favourite] += 1
    assert torch.equal(split.balanced_assign(scores, capacity=4), favourite)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_assign_random_scores(seed):
    g = GEN().manual_seed(seed)
    n_clusters = int(torch.randint(2, 9, (1,), generator=g))
    capacity = int(torch.randint(1, 40, (1,), generator=g))
    labels = split.balanced_assign(torch.randn(n_clusters * capacity, n_clusters, generator=g), capacity)
    assert torch.bincount(labels, minlength=n_clusters).tolist() == [capacity] * n_clusters


@pytest.mark.parametrize("seed", range(3))
def test_merge_experts_inverts_expert_slices(seed):
    gate, up, down = synthetic_ffn(96, 24, seed)
    perm = split.random_partition(96, seed)
    merged = split.merge_experts(split.expert_slices(gate, up, down, perm, 6), perm)
    assert all(torch.equal(m, w) for m, w in zip(merged, (gate, up, down)))
    # Merging with the wrong permutation does not give the weights back (the check can fail).
    wrong = split.merge_experts(split.expert_slices(gate, up, down, perm, 6), split.random_partition(96, seed + 10))
    assert not torch.equal(wrong[0], gate)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("kind", ["contiguous", "random"])
def test_expert_slice_is_plain_indexing(kind, dtype):
    gate, up, down = (w.to(torch.bfloat16) for w in synthetic_ffn(48, 8))
    perm = (split.contiguous_partition(48) if kind == "contiguous" else split.random_partition(48, 1)).to(dtype)
    for e in range(3):
        idx = perm[e * 16:(e + 1) * 16].long()
        g, u, d = split.expert_slice(gate, up, down, perm, 3, e)
        assert torch.equal(g, gate[idx]) and torch.equal(u, up[idx]) and torch.equal(d, down[:, idx])
        assert g.is_contiguous() and u.is_contiguous() and d.is_contiguous()
        # A contiguous group's gate/up are views of the dense weights (documented), others copies.
        assert (g.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()) == (kind == "contiguous")


def test_expert_slices_are_the_dense_ffn_exactly():
    """Σ_i E_i(x) = y for any partition (docs/method.md §1), checked on the arithmetic itself."""
    gate, up, down = synthetic_ffn(64, 16)
    x = torch.randn(10, 16, generator=GEN().manual_seed(9), dtype=torch.float64)
    gate, up, down = gate.double(), up.double(), down.double()

    def ffn(g, u, d):
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    perm = split.random_partition(64, 0)
    total = sum(ffn(*piece) for piece in split.expert_slices(gate, up, down, perm, 4))
    torch.testing.assert_close(total, ffn(gate, up, down), rtol=1e-12, atol=1e-12)


def _clustered(n_clusters: int, per_cluster: int, dim: int, seed: int, noise: float = 0.1):
    """Points around ``n_clusters`` random directions, shuffled; returns (points, true labels)."""
    g = GEN().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g)
    truth = torch.arange(n_clusters).repeat_interleave(per_cluster)
    points = centers[truth] + noise * torch.randn(len(truth), dim, generator=g)
    order = torch.randperm(len(truth), generator=g)
    return points[order], truth[order]


def _groups(perm: torch.Tensor, experts: int) -> set[frozenset]:
    return {frozenset(group.tolist()) for group in perm.view(experts, -1)}


def _truth_groups(truth: torch.Tensor) -> set[frozenset]:
    return {frozenset(torch.nonzero(truth == c).squeeze(1).tolist()) for c in truth.unique()}


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_clearly_clustered_neurons(seed):
    hidden = 32
    points, truth = _clustered(4, 32, 3 * hidden, seed)
    gate, up, down = points[:, :hidden], points[:, hidden:2 * hidden], points[:, 2 * hidden:].T.contiguous()
    perm = split.kmeans_partition(gate, up, down, 4, seed=seed)
    assert _groups(perm, 4) == _truth_groups(truth)
    # The contiguous split of the same (shuffled) neurons does not find the clusters.
    assert _groups(split.contiguous_partition(128), 4) != _truth_groups(truth)


@pytest.mark.parametrize("seed", range(3))
def test_coactivation_groups_neurons_that_fire_together(seed):
    # 4 groups of 16 neurons; tokens of "topic" c excite group c only.
    g = GEN().manual_seed(seed)
    order = torch.randperm(64, generator=g)
    truth = (torch.arange(64) // 16)[order]
    topic = torch.randint(0, 4, (400,), generator=g)
    acts = 0.05 * torch.randn(400, 64, generator=g)
    acts += (topic[:, None] == truth[None, :]).float() * (1 + torch.rand(400, 64, generator=g))
    acts *= torch.where(torch.rand(400, 64, generator=g) < 0.5, -1.0, 1.0)  # sign must not matter
    perm = split.coactivation_partition(acts, 4, seed=seed)
    assert _groups(perm, 4) == _truth_groups(truth)


# --------------------------------------------------------------------------- the 70B plan (meta device)

LLAMA3_70B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}
# Parameters of LLaMA-3-70B, counted by hand: embeddings + lm_head, 80 x (q, k, v, o, 3 MLP, 2 norms), final norm.
LLAMA3_70B_PARAMS = (2 * 128256 * 8192
                     + 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192) + 8192)


def test_llama3_70b_dense_plan_has_the_known_size():
    infos = keys.dense_infos_from_config(LLAMA3_70B, torch.bfloat16)
    assert len(infos) == 2 + 80 * 9 + 1
    assert sum(i.nbytes for i in infos.values()) == 2 * LLAMA3_70B_PARAMS
    assert 70.5e9 < LLAMA3_70B_PARAMS < 70.6e9  # 70.55B, the published size


@pytest.mark.parametrize("experts,routing", [(4, "hard"), (8, "hard"), (8, "softmax")])
def test_llama3_70b_moe_plan_conserves_bytes(experts, routing):
    dense = keys.dense_infos_from_config(LLAMA3_70B, torch.bfloat16)
    cfg = ConvertConfig(model=Path("llama-3-70b"), out=Path("moe"), num_experts=experts, top_k=2, routing=routing)
    plan = convert_mod.moe_tensor_plan(dense, 80, cfg.validate(LLAMA3_70B))
    names = [i.name for i in plan]
    assert len(set(names)) == len(names)
    bias = routing == "hard"
    router_params = 80 * (experts * 8192 + (experts if bias else 0))
    assert sum(i.nbytes for i in plan) == sum(i.nbytes for i in dense.values()) + 2 * router_params
    assert len(plan) == len(dense) - 80 * 3 + 80 * (3 * experts + 1 + bias)
    assert {i.dtype for i in plan} == {torch.bfloat16}
    by_name = {i.name: i for i in plan}
    size = 28672 // experts
    for layer in (0, 41, 79):
        assert by_name[keys.ROUTER_WEIGHT.format(layer=layer)].shape == (experts, 8192)
        assert (keys.ROUTER_BIAS.format(layer=layer) in by_name) == bias
        for e in (0, experts - 1):
            assert by_name[keys.expert_key("gate", layer, e)].shape == (size, 8192)
            assert by_name[keys.expert_key("up", layer, e)].shape == (size, 8192)
            assert by_name[keys.expert_key("down", layer, e)].shape == (8192, size)
        assert keys.dense_mlp_key("gate", layer) not in by_name
    # The write order: embeddings first, then layer by layer, then the final norm and lm_head.
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    layers = [keys.layer_of(n) for n in names[1:-2]]
    assert layers == sorted(layers)

    shards = StreamingSafetensorsWriter._assign_shards(plan, parse_size("5GB"))
    assert [i for _, group in shards for i in group] == plan  # order kept, nothing lost or repeated
    n = len(shards)
    assert [name for name, _ in shards] == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    sizes = [sum(i.nbytes for i in group) for _, group in shards]
    assert max(sizes) <= 5e9
    # Greedy packing: no shard could have taken the next shard's first tensor.
    assert all(sizes[j] + shards[j + 1][1][0].nbytes > 5e9 for j in range(n - 1))
    assert math.ceil(sum(sizes) / 5e9) <= n <= math.ceil(sum(sizes) / 5e9) + 2


def test_assign_shards_single_file_and_oversized_tensor():
    plan = [TensorInfo("a", (10,), torch.float32), TensorInfo("big", (1000,), torch.float32),
            TensorInfo("c", (10,), torch.float32)]
    assert StreamingSafetensorsWriter._assign_shards(plan, 10**9) == [("model.safetensors", plan)]
    shards = StreamingSafetensorsWriter._assign_shards(plan, 100)
    assert [[i.name for i in g] for _, g in shards] == [["a"], ["big"], ["c"]]  # a tensor never splits


@pytest.mark.parametrize("perm_kind", ["contiguous", "random"])
def test_llama3_70b_expert_slices_on_meta(perm_kind):
    gate = torch.empty(28672, 8192, dtype=torch.bfloat16, device="meta")
    down = torch.empty(8192, 28672, dtype=torch.bfloat16, device="meta")
    perm = split.contiguous_partition(28672) if perm_kind == "contiguous" else split.random_partition(28672, 0)
    pieces = split.expert_slices(gate, gate, down, perm, 8)
    assert len(pieces) == 8
    for g, u, d in pieces:
        assert g.device.type == u.device.type == d.device.type == "meta"
        assert g.shape == u.shape == (3584, 8192) and d.shape == (8192, 3584) and g.dtype == torch.bfloat16
    merged = split.merge_experts(pieces, perm)
    assert [m.shape for m in merged] == [gate.shape, gate.shape, down.shape]


class _MetaReader:
    """A CheckpointReader stand-in whose tensors live on the meta device (no bytes anywhere)."""

    def __init__(self, model_dir, flag="--model", allow_nonfinite=False):  # meta tensors hold no values to check
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.infos = keys.dense_infos_from_config(config, torch.bfloat16)
        self.reads: list[str] = []

    @property
    def total_bytes(self):
        return sum(i.nbytes for i in self.infos.values())

    def get(self, name, out=None):
        self.reads.append(name)
        info = self.infos[name]
        return torch.empty(info.shape, dtype=info.dtype, device="meta")


class _CountingWriter(StreamingSafetensorsWriter):
    """The real writer's plan and ordering checks, but it counts bytes instead of writing them."""

    def _start_shard(self, shard_name, infos):
        self._current_shard = shard_name
        self.started = getattr(self, "started", []) + [shard_name]

    def write(self, name, tensor):
        assert tensor.device.type == "meta" or tensor.numel() <= 8 * 8192, name  # only routers are real
        self.bytes_written += self._advance(name, tensor.shape, tensor.dtype).nbytes

    def copy_from(self, reader, name):
        reader.reads.append(name)
        info = reader.infos[name]
        self.bytes_written += self._advance(name, info.shape, info.dtype).nbytes


def test_llama3_70b_convert_dry_run_on_meta(tmp_path, monkeypatch):
    """The whole convert() orchestration at 70B shape: meta tensors in, byte counts out."""
    model = tmp_path / "llama-3-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_70B))
    readers, writers = [], []
    monkeypatch.setattr(convert_mod, "CheckpointReader", lambda *a, **k: readers.append(_MetaReader(*a, **k))
                        or readers[-1])
    monkeypatch.setattr(convert_mod, "StreamingSafetensorsWriter", lambda *a, **k: writers.append(
        _CountingWriter(*a, **k)) or writers[-1])
    # The counting writer writes no tensor bytes, so the 141 GB free-space check before writing does not apply here.
    monkeypatch.setattr(hf_io_mod, "check_free_space", lambda *a, **k: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = convert_mod.convert(ConvertConfig(model=model, out=tmp_path / "moe", num_experts=8, top_k=2,
                                            split="random", max_shard_size="5GB"), progress=False)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    (reader,), (writer,) = readers, writers
    assert rss_growth < 1e9  # one real 70B MLP matrix alone would be 470 MB, a layer 1.7 GB
    assert sorted(reader.reads) == sorted(reader.infos)  # every dense tensor read exactly once
    router_bytes = 2 * 80 * (8 * 8192 + 8)
    assert writer.bytes_written == reader.total_bytes + router_bytes
    assert writer.started == [name for name, _ in writer.shards] and len(writer.started) > 25
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["expert_intermediate_size"], config["num_hidden_layers"]) == (8, 3584, 80)
    assert config["text_config"]["intermediate_size"] == 28672
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["bytes_written"] == writer.bytes_written
    partition = load_partition(out)
    assert sorted(partition) == list(range(80))
    assert all(is_permutation(p, 28672) for p in partition.values())
    assert not torch.equal(partition[0], partition[1])  # the random split differs per layer
