"""The CUDA paths (issue 26): run with ``pytest -m gpu`` on a machine with a GPU; skipped (with the reason) here.

bench/gpu_check.sh runs them on one GPU with nothing downloadable: bf16 training of the tiny model through torchrun
with DeepSpeed on NCCL (world 1, EP 1, ZeRO-2), its save and a bit-exact resume, the exported folder against the
engine's logits, the shipped model's grouped-GEMM kernel against its per-expert loop, and ``convert --device cuda``
against the CPU conversion, with its GPU memory against the bound docs/cluster.md states.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distributed_utils as du
import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
NUM_LAYERS, NUM_EXPERTS = 2, 4  # tiny_moe_dir
STEPS, SEQ_LEN, BATCH = 4, 64, 2
CUDA_ENV = {"DS_ACCELERATOR": "cuda"}  # du.worker_env sets the CPU accelerator unless told otherwise
# convert --device cuda against --device cpu, fp32 checkpoint: partitions equal, every other tensor within this
# share of its largest |value| (fp32 sums in another order; stated in docs/cluster.md)
CONVERT_TOL = 1e-4
EXPORT_TOL = 1e-4  # the exported model on CUDA (fp32) against the DeepSpeed engine's logits
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # grouped_mm against the loop (bf16: one rounding step)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- training on CUDA


def _train(moe: Path, data: Path, out: Path, *extra: str, env: dict | None = None) -> du.Result:
    args = du.train_args(moe, data, out, steps=STEPS, ep_size=1, micro_batch_size=BATCH, global_batch_size=BATCH,
                         seq_len=SEQ_LEN, lr=1e-3, ds_config=ROOT / "ds_configs" / "zero2_bf16.json", extra=extra)
    return du.run("torchrun", 1, args, env={**CUDA_ENV, **(env or {})}, cwd=ROOT).check()


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny_moe_dir, calib_text) -> tuple[Path, str]:
    """4 bf16 steps of the tiny MoE on one GPU: DeepSpeed on NCCL, world 1, EP 1, ZeRO-2 (its folder and output)."""
    out = tmp_path_factory.mktemp("cuda") / "whole"
    return out, _train(tiny_moe_dir, calib_text, out, env={"NCCL_DEBUG": "INFO"}).output


@pytest.mark.dist
def test_bf16_training_on_cuda(cuda_run):
    run, output = cuda_run
    rows = du.read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert du.checkpoint_problems(run, STEPS, NUM_LAYERS, NUM_EXPERTS, world=1, optim_prefix="bf16_") == []
    # On the GPU through NCCL (train all-reduces its metrics every step), in bf16.
    assert "NCCL INFO" in output, output[-3000:]
    state = torch.load(run / "checkpoints" / f"step{STEPS}" / "layer_0_expert_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert {t.dtype for t in state.values() if isinstance(t, torch.Tensor)} == {torch.bfloat16}


@pytest.mark.dist
def test_resume_on_cuda_is_bit_exact(cuda_run, tiny_moe_dir, calib_text, tmp_path):
    """--stop-after 2, then --resume to step 4 == the uninterrupted run, metrics and weights bit for bit."""
    whole_run, out = cuda_run[0], tmp_path / "resumed"
    _train(tiny_moe_dir, calib_text, out, "--stop-after", "2")
    _train(tiny_moe_dir, calib_text, out, "--resume")
    resumed, whole = du.read_metrics(out), du.read_metrics(whole_run)
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "pa", "balance", "agreement", "lr"):
        assert [row[key] for row in resumed] == [row[key] for row in whole], key
    for path in sorted((whole_run / "checkpoints" / f"step{STEPS}").glob("*model_states.pt")):
        a = torch.load(path, map_location="cpu", weights_only=False)
        b = torch.load(out / "checkpoints" / f"step{STEPS}" / path.name, map_location="cpu", weights_only=False)
        module_a, module_b = a.get("module", a), b.get("module", b)
        for key, tensor in module_a.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, module_b[key]), f"{path.name}: {key}"


@pytest.mark.dist
def test_export_equals_engine_logits_on_cuda(cuda_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from factorllm_ds.cli import main

    probe_file = tmp_path / "engine.pt"
    du.run_command([du.BIN / "torchrun", "--nnodes=1", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                    f"--master_port={du.free_port()}", SCRIPTS / "engine_logits.py", cuda_run[0], 1, probe_file],
                   env=CUDA_ENV, cwd=ROOT).check()
    probe = torch.load(probe_file)
    folder = tmp_path / "hf"
    assert main(["export", "--run", str(cuda_run[0]), "--out", str(folder), "--format", "factorllm"]) == 0
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        got = model(probe["ids"].cuda()).logits.cpu()
    assert rel(got, probe["logits"]) < EXPORT_TOL


# ----------------------------------------------------------------------------- the shipped model's kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ["hard", "softmax"])
def test_grouped_kernel_equals_the_loop_on_cuda(dtype, routing):
    """FactorLLMExperts(kernel="grouped"), torch's grouped_mm, which the auto choice takes on CUDA for many tokens,
    gives the per-expert loop's output and gradients."""
    from test_model import make_block, tokens

    block = make_block(routing, 2).to("cuda", dtype)
    x = tokens(n=512).to("cuda", dtype)
    x[:4] = x[:1, :1]  # many equal tokens: some experts get many, some few or none
    assert block.experts._kernel(x.view(-1, x.shape[-1])) == "grouped"
    results = []
    for kernel in ("loop", "grouped"):
        block.zero_grad()
        block.experts.kernel = kernel
        out = block(x)
        out.float().square().sum().backward()
        results.append((out.detach(), block.experts.gate_up_proj.grad.clone(), block.experts.down_proj.grad.clone()))
    for got, want in zip(results[1], results[0]):
        assert rel(got, want) <= KERNEL_TOL[dtype]


# ----------------------------------------------------------------------------- convert --device cuda


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return found


@pytest.mark.parametrize("router_fit", ["gate", "picks"])
def test_convert_cuda_equals_cpu(tmp_path_factory, tmp_path, router_fit):
    """The calibrated conversion (shared expert, co-activation split, fitted router, down refit) on the GPU gives
    the CPU's partitions and, within CONVERT_TOL, its tensors; the GPU memory it takes stays under the bound of
    convert_cost.gpu_bytes (docs/cluster.md)."""
    from factorllm_ds.convert_cost import convert_cost
    from factorllm_ds.hf_io import read_config

    dense = tiny.build_dense(tmp_path_factory.mktemp("dense-gpu") / "model", "llama", hidden_size=256,
                             intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)
    text = tiny.write_calibration_text(tmp_path / "calib.txt", chars=60_000)
    settings = dict(num_experts=8, top_k=2, shared_neurons="0.25", split="coactivation", calib_data=text,
                    calib_tokens=4096, calib_seq_len=512, router_fit=router_fit)
    cpu = tiny.convert_tiny(dense, tmp_path / "cpu", device="cpu", **settings)
    before = torch.cuda.memory_allocated()  # what earlier tests left allocated
    torch.cuda.reset_peak_memory_stats()
    cuda = tiny.convert_tiny(dense, tmp_path / "cuda", device="cuda", **settings)
    peak = torch.cuda.max_memory_allocated() - before
    want, got = _tensors(cpu), _tensors(cuda)
    assert sorted(got) == sorted(want)
    for name in want:
        if "partition" in name:
            assert torch.equal(got[name], want[name]), name
        else:
            assert rel(got[name], want[name]) <= CONVERT_TOL, name
    bound = convert_cost(read_config(dense), 4096, 256, num_experts=8, router_fit=router_fit).gpu_bytes
    assert bound / 4 < peak <= bound, (peak, bound)


def test_prune_cuda_equals_cpu(tmp_path_factory, tmp_path):
    """prune --device cuda (the calibration forward, importance and refit on the GPU) keeps the CPU's neurons and
    writes its tensors within CONVERT_TOL."""
    from factorllm_ds.prune import PruneConfig, prune

    dense = tiny.build_dense(tmp_path_factory.mktemp("dense-gpu-prune") / "model", "llama", hidden_size=256,
                             intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)
    text = tiny.write_calibration_text(tmp_path / "calib.txt", chars=60_000)
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = prune(PruneConfig(model=dense, out=tmp_path / device, keep="0.5", calib_data=[text],
                                         calib_tokens=4096, device=device), progress=False)
    want, got = _tensors(outs["cpu"]), _tensors(outs["cuda"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert rel(got[name], want[name]) <= CONVERT_TOL, name
