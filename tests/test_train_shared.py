"""Training a model with a shared expert: real DeepSpeed expert parallelism, 2 CPU processes (gloo).

The shared expert is a dense module beside each ``deepspeed.moe`` layer (data parallel, under ZeRO
like every dense weight, trained with the routed experts); each rank holds only its own routed
experts. Same checks as for the plain model: EP2 = EP1, bit-exact resume, ZeRO-1, export = engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distributed_utils as du
import tiny

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
NUM_EXPERTS, NUM_LAYERS = 6, 2
SGD_TOL = 1e-5  # as test_train.py: EP2 vs EP1 with SGD, same global batch and seeds


@pytest.fixture(scope="module")
def shared_moe(tmp_path_factory, llama_dir, calib_text) -> Path:
    """llama tiny: 25% shared (32 neurons) + 6 routed experts of 16, k=2, hard, router fitted on the text, with a
    router bias (off by default with a shared expert; --balance-kind bias folds into it)."""
    return tiny.convert_tiny(llama_dir, tmp_path_factory.mktemp("shared") / "moe", num_experts=NUM_EXPERTS, top_k=2,
                             shared_neurons="0.25", split="coactivation", calib_data=calib_text, calib_tokens=512,
                             calib_seq_len=128, router_bias=True)


class Runs:
    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data, self.done = root, model, data, {}

    def args(self, out: Path, ep: int, extra: tuple[str, ...] = (), micro: int = 1, zero: str = "zero2.json"):
        return du.train_args(self.model, self.data, out, steps=4, ep_size=ep, micro_batch_size=micro, seq_len=32,
                             lr=0.5, ds_config=ROOT / "ds_configs" / zero,
                             extra=("--optimizer", "sgd", "--grad-clip", "0", *extra))

    def __call__(self, name: str) -> Path:
        out = self.root / name
        if name not in self.done:
            launcher, nproc, args = {
                "ep2": ("torchrun", 2, self.args(out, 2)),
                "ep1": ("python", 1, self.args(out, 1, micro=2)),
                "zero1": ("torchrun", 2, self.args(out, 2, zero="zero1.json")),
            }[name]
            self.done[name] = du.run(launcher, nproc, args, cwd=ROOT)
        assert self.done[name].returncode == 0, self.done[name].tail()
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_moe, calib_text) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), shared_moe, calib_text)


def test_ep2_matches_ep1_and_the_shared_expert_trains(runs, shared_moe):
    ep2, ep1 = du.read_metrics(runs("ep2")), du.read_metrics(runs("ep1"))
    for key in ("loss", "ce", "pa", "balance"):
        a, b = [r[key] for r in ep2], [r[key] for r in ep1]
        assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= SGD_TOL, (key, a, b)
    moved = [r["loss"] for r in ep1]
    assert max(moved) - min(moved) > 100 * SGD_TOL, moved
    assert all(r["pa"] > 0 for r in ep2)
    assert du.checkpoint_problems(runs("ep2"), 4, NUM_LAYERS, NUM_EXPERTS, world=2) == []
    # The shared expert sits in the non-expert states (one copy, data parallel) and was trained.
    states = torch.load(runs("ep2") / "checkpoints" / "step4" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    from factorllm_ds.hf_io import CheckpointReader

    name = "model.layers.0.mlp.shared_expert.down_proj.weight"
    assert (states[name] - CheckpointReader(shared_moe).get(name)).abs().max() > 1e-6


def test_zero1_trains_like_zero2(runs):
    a, b = du.read_metrics(runs("zero1")), du.read_metrics(runs("ep2"))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= SGD_TOL


def test_resume_is_bit_exact(runs):
    out = runs.root / "resumed"
    du.run("torchrun", 2, runs.args(out, 2, ("--stop-after", "2")), cwd=ROOT).check()
    du.run("torchrun", 2, runs.args(out, 2, ("--resume",)), cwd=ROOT).check()
    got, want = du.read_metrics(out), du.read_metrics(runs("ep2"))
    for key in ("loss", "ce", "pa", "balance"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_exports_equal_the_engine(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from factorllm_ds.cli import main
    from factorllm_ds.modeling import all_experts_mode, load_dense, load_moe

    run = runs("ep2")
    probe = tmp_path / "engine.pt"
    du.run_command([du.BIN / "torchrun", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={du.free_port()}", SCRIPTS / "engine_logits.py", run, 2, probe], cwd=ROOT).check()
    probe = torch.load(probe)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf"), "--format", "factorllm"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["shared_intermediate_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(probe["ids"]).logits
    assert (got - probe["logits"]).abs().max() / probe["logits"].abs().max() < 1e-5
    # dense export = the trained MoE with every expert (shared + all routed) at weight 1
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "dense"), "--format", "dense"]) == 0
    moe, dense = load_moe(tmp_path / "hf"), load_dense(tmp_path / "dense")
    all_experts_mode(moe)
    with torch.no_grad():
        want, got = moe(probe["ids"]).logits, dense(probe["ids"]).logits
    assert (want - got).abs().max() / want.abs().max() < 1e-5


def test_bias_balancing_moves_loads_and_the_export_routes_like_the_engine(runs, tmp_path):
    """--balance-kind bias (DeepSeek-V3's rule): no balance loss, a selection bias per expert updated each step;
    the export folds it into the router bias, so the exported model picks what the engine picks."""
    from factorllm_ds.cli import main

    out = runs.root / "bias"
    du.run("torchrun", 2, runs.args(out, 2, ("--balance-kind", "bias", "--balance-bias-rate", "0.05")),
           cwd=ROOT).check()
    rows = du.read_metrics(out)
    assert len(rows) == 4 and all(r["balance"] == 0 for r in rows)
    states = torch.load(out / "checkpoints" / "step4" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    # Every layer's bias; one layer's can return to 0 when its loads swing back and forth (+0.05, then -0.05).
    bias = torch.stack([v for k, v in states.items() if k.endswith("gate.selection_bias")])
    assert bias.shape == (2, NUM_EXPERTS)
    # 4 steps of +-0.05 (or 0 at exactly mean load) per expert: it moved, in whole steps, at most 4 of them.
    steps = bias / 0.05
    assert bias.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4
    probe = tmp_path / "engine.pt"
    du.run_command([du.BIN / "torchrun", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={du.free_port()}", SCRIPTS / "engine_logits.py", out, 2, probe], cwd=ROOT).check()
    probe = torch.load(probe)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf"), "--format", "factorllm"]) == 0
    from factorllm_ds.modeling import load_moe

    with torch.no_grad():
        got = load_moe(tmp_path / "hf")(probe["ids"]).logits
    assert (got - probe["logits"]).abs().max() / probe["logits"].abs().max() < 1e-5


def test_bias_balancing_refused_for_softmax_routing(tmp_path, llama_dir, calib_text):
    from factorllm_ds.cli import main

    moe = tiny.build_tiny_moe(tmp_path / "moe", llama_dir, routing="softmax")
    rc = main(["train", "--check", "--model", str(moe), "--data", str(calib_text), "--out", str(tmp_path / "run"),
               "--balance-kind", "bias"])
    assert rc == 2
