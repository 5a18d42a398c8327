"""The converted folder as a Hugging Face model, and the MoE block's routing arithmetic.

Loading: with ``trust_remote_code`` in a process where factorllm_ds cannot be imported,
and through the Auto classes once factorllm_ds is imported. Routing: the sparse block
(only the selected experts run) against a naive dense evaluation of docs/method.md §3.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tiny
from factorllm_ds.errors import UserError
from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
from factorllm_ds.hf_model.modeling_factorllm import FactorLLMForCausalLM, FactorLLMSparseMoeBlock, prior_topk
from factorllm_ds.layout import load_partition
from factorllm_ds.modeling import all_experts_mode, load_dense, load_moe

TEXT = "In the beginning God created the heaven and the earth."
E, H, I_EXPERT = 4, tiny.HIDDEN, 32


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def text_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt")["input_ids"]


# --------------------------------------------------------------------------- loading

# Runs in a fresh `python -I` (no PYTHONPATH, no cwd on sys.path) with factorllm_ds blocked
# on the import path, so only the code shipped inside the folder can serve the model.
NO_PACKAGE_SCRIPT = textwrap.dedent('''
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "factorllm_ds" or name.startswith("factorllm_ds."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

    sys.meta_path.insert(0, Block())
    try:
        import factorllm_ds  # noqa: F401
        raise SystemExit("factorllm_ds was importable")
    except ModuleNotFoundError:
        pass

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, result = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer(sys.argv[3], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.save({"ids": ids, "logits": logits, "generated": generated}, result)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                      "loaded": sorted(m for m in sys.modules
                                       if m == "factorllm_ds" or m.startswith("factorllm_ds."))}))
''')


def test_loads_and_generates_without_factorllm_ds(tiny_moe_dir, tmp_path):
    result = tmp_path / "result.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run([sys.executable, "-I", "-c", NO_PACKAGE_SCRIPT, str(tiny_moe_dir), str(result), TEXT],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["loaded"] == []
    assert info["class"].startswith("transformers_modules.") and info["class"].endswith(".FactorLLMForCausalLM")

    # The same numbers as the package's own model class.
    remote = torch.load(result)
    model = load_moe(tiny_moe_dir)
    assert torch.equal(remote["ids"], text_ids(tiny_moe_dir))
    with torch.no_grad():
        assert rel(remote["logits"], model(remote["ids"]).logits) <= 1e-6
    assert remote["generated"].shape == (1, remote["ids"].shape[1] + 6)
    assert torch.equal(remote["generated"], model.generate(remote["ids"], max_new_tokens=6, do_sample=False))


def test_auto_classes_without_trust_remote_code(tiny_moe_dir, tiny_dense_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    import factorllm_ds  # noqa: F401  (registers the Auto classes)

    assert type(AutoConfig.from_pretrained(tiny_moe_dir)) is FactorLLMConfig
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()
    assert type(model) is FactorLLMForCausalLM
    assert [len(b.experts) for b in model.moe_blocks()] == [E, E]
    ids = text_ids(tiny_moe_dir)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 8)
    assert torch.equal(cached, uncached)  # the KV cache is threaded through correctly

    # All experts active: the MoE generates exactly what the dense model does.
    all_experts_mode(model)
    dense = load_dense(tiny_dense_dir)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       dense.generate(ids, max_new_tokens=8, do_sample=False))


def test_bf16_load_and_forward(tiny_moe_dir):
    model = load_moe(tiny_moe_dir, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(text_ids(tiny_moe_dir)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_load_partition_of_a_folder_without_one(tiny_dense_dir):
    with pytest.raises(UserError, match="factorllm_partition.safetensors"):
        load_partition(tiny_dense_dir)


# --------------------------------------------------------------------------- the MoE block


def make_block(routing: str, k: int, seed: int = 0, router_bias: bool = True) -> FactorLLMSparseMoeBlock:
    config = FactorLLMConfig(text_config=tiny.dense_config("llama").to_dict(), num_experts=E, num_experts_per_tok=k,
                             expert_intermediate_size=I_EXPERT, routing=routing, router_bias=router_bias)
    torch.manual_seed(seed)
    block = FactorLLMSparseMoeBlock(config)
    with torch.no_grad():  # a decisive router, so the top-k choice is not a near tie
        block.router.weight.normal_(0, 0.5)
        if block.router.bias is not None:
            block.router.bias.normal_(0, 0.5)
    return block.eval()


def naive_moe(block, x_TH: torch.Tensor, chosen_TK: torch.Tensor | None = None) -> torch.Tensor:
    """docs/method.md §3 evaluated densely: every expert on every token, a [T, E] weight matrix."""
    out_TEH = tiny.expert_outputs(block, x_TH).transpose(0, 1)
    p_TE = F.softmax(block.router(x_TH), dim=-1)
    if chosen_TK is None:
        chosen_TK = p_TE.topk(block.top_k, dim=-1).indices
    mask_TE = torch.zeros_like(p_TE).scatter(1, chosen_TK, 1.0)
    if block.routing == "hard":
        w_TE = block.scale * mask_TE
    else:
        w_TE = block.scale * mask_TE * p_TE / (mask_TE * p_TE).sum(dim=-1, keepdim=True)
    return (w_TE.unsqueeze(-1) * out_TEH).sum(dim=1)


def tokens(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n // 8, 8, H, generator=torch.Generator().manual_seed(seed))  # [B, S, H]


@pytest.mark.parametrize("routing", ["hard", "softmax"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_dispatch_equals_naive_formula(routing, k):
    block = make_block(routing, k)
    assert block.scale == (E / k if routing == "hard" else E)
    x = tokens()
    block.experts.kernel = "loop"
    with torch.no_grad(), count_expert_rows(block) as calls:
        got = block(x)
        chosen_TK = F.softmax(block.router(x.view(-1, H)), -1).topk(k, dim=-1).indices
    assert got.shape == x.shape
    # Only the selected experts ran, each on exactly the tokens routed to it.
    assert calls == torch.bincount(chosen_TK.flatten(), minlength=E).tolist()
    assert sum(calls) == x.shape[0] * x.shape[1] * k
    with torch.no_grad():
        want = naive_moe(block, x.view(-1, H)).view_as(x)
    assert rel(got, want) <= 1e-5
    # Sanity: the formula is sensitive to the choice (the unselected experts contribute a lot).
    with torch.no_grad():
        assert rel(tiny.expert_outputs(block, x.view(-1, H)).sum(0) * block.scale, want.view(-1, H)) > 0.1


@contextlib.contextmanager
def count_expert_rows(block):
    """Rows each routed expert's gate/up matmul sees while the block runs (its slice of the stacked weight is
    recognised by its address), so a test can tell which experts ran on how many tokens."""
    stacked = block.experts.gate_up_proj
    calls, linear = [0] * block.num_experts, F.linear

    def counting(x, weight, *args, **kwargs):
        if weight.shape == stacked.shape[1:] and weight.untyped_storage().data_ptr() == \
                stacked.untyped_storage().data_ptr():
            calls[(weight.data_ptr() - stacked.data_ptr()) // (stacked.stride(0) * stacked.element_size())] += \
                x.shape[0]
        return linear(x, weight, *args, **kwargs)

    F.linear = counting
    try:
        yield calls
    finally:
        F.linear = linear


@pytest.mark.parametrize("routing", ["hard", "softmax"])
@pytest.mark.parametrize("kernel", ["all", "grouped", "union"])
def test_kernels_equal_the_per_expert_loop(routing, kernel):
    """The every-expert kernel (unselected experts weighted 0), the union kernel (the experts some token selected)
    and grouped_mm (the GPU path; it also runs on CPU when strides are 16-byte aligned) give the loop's output and
    gradients, including for experts that get no token; the auto choice on CPU takes the union kernel for a
    handful of tokens and the every-expert kernel for many tokens of thin experts."""
    if kernel == "grouped" and getattr(F, "grouped_mm", None) is None:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    block = make_block(routing, 2)
    x = tokens(n=40)
    x[:2] = x[:1, :1]  # 16 tokens the same: some experts get many tokens, some few or none
    # 40 tokens: "all" takes its dense-width down projection; 16 (= few_tokens): its per-expert bmm
    for batch in (x, x[:2], x[:1, :1]):  # and one token (decode of one sequence)
        results = []
        for name in ("loop", kernel):
            block.zero_grad()
            block.experts.kernel = name
            out = block(batch)
            out.square().sum().backward()
            grads = [block.experts.gate_up_proj.grad.clone(), block.experts.down_proj.grad.clone()]
            if routing == "softmax":
                grads.append(block.router.weight.grad.clone())
            results.append((out.detach(), *grads))
        for got, want in zip(results[1], results[0]):
            assert rel(got, want) <= 1e-5
    experts, x_TH = block.experts, tokens(n=40).view(-1, H)
    experts.kernel = "auto"
    assert experts._kernel(x_TH[: experts.few_tokens]) == "union"  # CPU decode: the selected experts only
    experts.loop_min_intermediate = experts.intermediate_size  # CPU, many tokens: thin experts run as one pass
    assert experts._kernel(x_TH) == "loop"
    experts.loop_min_intermediate = experts.intermediate_size + 1
    assert experts._kernel(x_TH) == "all"


def test_save_and_load_keep_the_per_expert_checkpoint_keys(tiny_moe_dir, tmp_path):
    """Stacked in memory, per expert on disk: from_pretrained stacks the files' keys, save_pretrained splits them
    back bit for bit, and torch's load_state_dict takes the per-expert keys too."""
    from safetensors.torch import load_file

    model = load_moe(tiny_moe_dir, torch.float32)
    files = {}
    for f in sorted(tiny_moe_dir.glob("*.safetensors")):
        files.update(load_file(f))
    block = model.moe_blocks()[1]
    for e in range(E):
        want = [files[f"model.layers.1.mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")]
        assert torch.equal(block.experts.gate_up_proj[e], torch.cat(want[:2]))
        assert torch.equal(block.experts.down_proj[e], want[2])
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    per_expert = {k: v for k, v in files.items() if ".mlp.experts." in k}
    assert per_expert and all(torch.equal(saved[k], v) for k, v in per_expert.items())
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in saved)
    fresh = FactorLLMSparseMoeBlock(model.config)
    layer1 = {k[len("model.layers.1.mlp."):]: v for k, v in files.items() if k.startswith("model.layers.1.mlp.")}
    fresh.load_state_dict(layer1, strict=True)
    assert torch.equal(fresh.experts.gate_up_proj, block.experts.gate_up_proj)


def test_hard_routing_gives_the_router_no_gradient_softmax_does():
    x = tokens()
    hard, soft = make_block("hard", 2), make_block("softmax", 2)
    hard(x).square().sum().backward()
    soft(x).square().sum().backward()
    assert hard.router.weight.grad is None or not hard.router.weight.grad.any()
    assert soft.router.weight.grad.abs().sum() > 0
    assert bool((hard.experts.gate_up_proj.grad.flatten(1).abs().sum(1) > 0).all())  # every expert got tokens


@pytest.mark.parametrize("routing", ["hard", "softmax"])
def test_oracle_override_picks_the_experts_closest_to_their_share(routing):
    block = make_block(routing, 2)
    block.router_override = "oracle"
    x_TH = tokens().view(-1, H)
    with torch.no_grad():
        got = block(x_TH)
        out_ETH = tiny.expert_outputs(block, x_TH)
        share_TH = out_ETH.sum(0) * (2 / E)  # t * k / E, with t the dense FFN output
        dist_TE = torch.stack([(out_ETH[e] - share_TH).pow(2).mean(-1) for e in range(E)], dim=1)
        chosen_TK = dist_TE.topk(2, dim=-1, largest=False).indices
        want = naive_moe(block, x_TH, chosen_TK)
    assert rel(got, want) <= 1e-5
    learned = F.softmax(block.router(x_TH), -1).topk(2, dim=-1).indices
    assert (chosen_TK.sort(-1).values != learned.sort(-1).values).any(-1).float().mean() > 0.2


def test_oracle_override_with_subset_target_picks_the_best_pair():
    block = make_block("hard", 2)
    # Scale 1: at the default E/k = 2 (E = 4, k = 2) a pair and its complement tie exactly,
    # ||2(E_a + E_b) - t|| = ||(E_a + E_b) - (E_c + E_d)||.
    block.router_override, block.prior_target, block.scale = "oracle", "subset", 1.0
    x_TH = tokens().view(-1, H)
    with torch.no_grad():
        got = block(x_TH)
        out_ETH = tiny.expert_outputs(block, x_TH)
        pairs = [(a, b) for a in range(E) for b in range(a + 1, E)]
        err_TP = torch.stack([(out_ETH[a] + out_ETH[b] - out_ETH.sum(0)).pow(2).sum(-1) for a, b in pairs], 1)
        chosen_TK = torch.tensor(pairs)[err_TP.argmin(-1)]
        want = naive_moe(block, x_TH, chosen_TK)
        share = prior_topk(out_ETH, out_ETH.sum(0), 2)
    assert rel(got, want) <= 1e-5
    assert (chosen_TK.sort(-1).values != share.sort(-1).values).any(-1).float().mean() > 0.1  # the targets differ


def test_random_override_is_seeded_and_uniform():
    block = make_block("hard", 2)
    block.router_override = "random"
    x_TH = tokens(n=4000).view(-1, H)
    outputs = []
    for _ in range(2):
        block.random_generator = torch.Generator().manual_seed(5)
        block.usage_counts = torch.zeros(E)
        with torch.no_grad():
            outputs.append(block(x_TH))
        counts = block.usage_counts.clone()
        assert counts.sum().item() == 2 * x_TH.shape[0]
        assert ((counts / counts.sum() - 1 / E).abs() < 0.03).all(), counts
    assert torch.equal(outputs[0], outputs[1])
    block.random_generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        assert not torch.equal(block(x_TH), outputs[0])


def test_model_router_override_and_back(tiny_moe_dir):
    model = load_moe(tiny_moe_dir)
    ids = text_ids(tiny_moe_dir)
    with torch.no_grad():
        learned = model(ids).logits
        model.set_router_override("random", seed=3)
        rand_a = model(ids).logits
        model.set_router_override("random", seed=3)
        assert torch.equal(model(ids).logits, rand_a)
        model.set_router_override("oracle")
        oracle = model(ids).logits
        model.set_router_override("learned")
        assert torch.equal(model(ids).logits, learned)
    assert model.config.router_override == "learned"
    assert torch.isfinite(oracle).all() and rel(oracle, learned) > 1e-3 and rel(rand_a, learned) > 1e-3


def test_set_top_k_follows_the_hard_scale_and_k_equal_e_is_lossless(tiny_moe_dir, tiny_dense_dir):
    model, dense = load_moe(tiny_moe_dir), load_dense(tiny_dense_dir)
    ids = text_ids(tiny_moe_dir)
    assert [b.scale for b in model.moe_blocks()] == [2.0, 2.0]
    with torch.no_grad():
        want = dense(ids).logits
        k2 = model(ids).logits
        model.set_top_k(E)  # hard, default scale E/k = 1: every expert, weight 1 -> the dense model
        assert [(b.top_k, b.scale) for b in model.moe_blocks()] == [(E, 1.0), (E, 1.0)]
        assert model.config.num_experts_per_tok == E
        assert rel(model(ids).logits, want) <= 1e-5
        model.set_top_k(1)
        assert [(b.top_k, b.scale) for b in model.moe_blocks()] == [(1, 4.0), (1, 4.0)]
        k1 = model(ids).logits
    assert rel(k2, want) > 1e-3 and rel(k1, k2) > 1e-3


def test_set_top_k_keeps_an_explicit_or_softmax_scale():
    soft = FactorLLMForCausalLM(FactorLLMConfig(text_config=tiny.dense_config("llama", num_hidden_layers=1).to_dict(),
                                                num_experts=E, num_experts_per_tok=2, expert_intermediate_size=32,
                                                routing="softmax", router_bias=False))
    soft.set_top_k(3)
    assert [(b.top_k, b.scale) for b in soft.moe_blocks()] == [(3, float(E))]
    fixed = FactorLLMForCausalLM(FactorLLMConfig(text_config=tiny.dense_config("llama", num_hidden_layers=1).to_dict(),
                                                 num_experts=E, num_experts_per_tok=2, expert_intermediate_size=32,
                                                 combine_scale=1.0))
    fixed.set_top_k(1)
    assert [(b.top_k, b.scale) for b in fixed.moe_blocks()] == [(1, 1.0)]
