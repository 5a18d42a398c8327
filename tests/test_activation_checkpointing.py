"""train --activation-checkpointing: real expert-parallel runs on CPU (2 processes, EP=2, gloo).

Each decoder layer is recomputed in the backward (torch.utils.checkpoint, non-reentrant). The
recompute replays the MoE layer's collectives on every rank in the same order, reuses the first
forward's PA prior choice and leaves the first forward's auxiliary losses in place. So a run with
it must train exactly as a run without it: same loss, CE, PA, balance and expert counts per step
(SGD, clipping off; CPU fp32 makes the two bit-identical, the tolerance below allows only float
reassociation), for the plain tiny model and for one with a shared expert (frozen prior: its
frozen copy too); and --resume of a checkpointed run continues it bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distributed_utils as du
import tiny

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "ds_configs" / "zero2.json"
STEPS, SEQ_LEN, GLOBAL_BATCH = 4, 64, 2
TOL = 1e-6  # absolute, on values of ~10 (loss, CE), ~1 (PA, balance); observed: 0 (bit-identical)
KEYS = ("loss", "ce", "pa", "balance", "agreement")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return tiny.write_calibration_text(tmp_path_factory.mktemp("ckpt-text") / "botchan.txt")


@pytest.fixture(scope="module")
def shared_moe(tmp_path_factory, llama_dir, calib_text) -> Path:
    """llama tiny: 25% shared expert + 6 routed experts, k=2 (as tests/test_train_shared.py)."""
    return tiny.convert_tiny(llama_dir, tmp_path_factory.mktemp("ckpt-shared") / "moe", num_experts=6, top_k=2,
                             shared_neurons="0.25", split="coactivation", calib_data=calib_text, calib_tokens=512,
                             calib_seq_len=128)


class Runs:
    """Each (model, checkpointing) run launched once, on first use: torchrun, 2 ranks, EP=2, SGD, no clipping."""

    def __init__(self, root: Path, models: dict[str, Path], text: Path):
        self.root, self.models, self.text, self.done = root, models, text, {}

    def args(self, model: str, out: Path, ckpt: bool, extra: tuple[str, ...] = ()) -> list[str]:
        flags = ("--optimizer", "sgd", "--grad-clip", "0", *(("--activation-checkpointing",) if ckpt else ()), *extra)
        return du.train_args(self.models[model], self.text, out, steps=STEPS, ep_size=2, seq_len=SEQ_LEN,
                             global_batch_size=GLOBAL_BATCH, lr=0.5, ds_config=ZERO2, extra=flags)

    def __call__(self, model: str, ckpt: bool) -> Path:
        out = self.root / f"{model}-{'ckpt' if ckpt else 'plain'}"
        if out not in self.done:
            self.done[out] = du.run("torchrun", 2, self.args(model, out, ckpt))
        assert self.done[out].returncode == 0, self.done[out].tail()
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_moe_dir, shared_moe, text) -> Runs:
    return Runs(tmp_path_factory.mktemp("ckpt-runs"), {"plain": tiny_moe_dir, "shared": shared_moe}, text)


@pytest.mark.parametrize("prior", ["frozen", "self", "none"])
def test_in_process_gradients_equal_and_each_layer_replayed_once(tiny_moe_dir, prior, monkeypatch) -> None:
    """One process, ep_size 1: loss and every gradient equal with and without checkpointing; with it each
    MoE block runs twice (forward, replay), the PA target once, and the loss keeps the first forward's aux."""
    from factorllm_ds.config import Objective
    from factorllm_ds.ds_moe import DeepSpeedMoEBlock, build_train_model

    calls = {"forward": 0, "pa_target": 0}
    forward, targets = DeepSpeedMoEBlock.forward, DeepSpeedMoEBlock.all_expert_outputs

    def counted_forward(self, *args):
        calls["forward"] += 1
        return forward(self, *args)

    def counted_targets(self, *args):
        calls["pa_target"] += 1
        return targets(self, *args)

    monkeypatch.setattr(DeepSpeedMoEBlock, "forward", counted_forward)
    monkeypatch.setattr(DeepSpeedMoEBlock, "all_expert_outputs", counted_targets)
    ids = torch.randint(0, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    results = {}
    for ckpt in (False, True):
        calls.update(forward=0, pa_target=0)
        model = build_train_model(tiny_moe_dir, 1, Objective(prior=prior, prior_target="share"), 0,
                                  activation_checkpointing=ckpt).train()
        loss, metrics = model(ids, labels=ids)
        aux = [block.last_aux for block in model.blocks()]
        loss.backward()
        assert [block.last_aux for block in model.blocks()] == aux  # the replay left the forward's aux alone
        assert all(block.replay_prior_idx is None for block in model.blocks())  # consumed by the replay
        layers = len(model.blocks())
        assert calls == {"forward": layers * (2 if ckpt else 1), "pa_target": layers if prior != "none" else 0}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[ckpt] = (loss.detach(), {k: v for k, v in metrics.items()}, grads)
    (loss0, m0, g0), (loss1, m1, g1) = results[False], results[True]
    assert torch.equal(loss0, loss1)
    for key in m0:
        assert torch.equal(m0[key], m1[key]), key
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name  # same ops on the same inputs: bit-identical


def expert_loads(out: Path) -> list[list[list[int]]]:
    return [json.loads(line)["counts"] for line in (out / "expert_load.jsonl").read_text().splitlines()]


@pytest.mark.dist
@pytest.mark.parametrize("model", ["plain", "shared"])
def test_checkpointed_run_trains_as_the_plain_run(runs: Runs, model: str) -> None:
    plain, ckpt = du.read_metrics(runs(model, False)), du.read_metrics(runs(model, True))
    assert [r["step"] for r in ckpt] == [r["step"] for r in plain] == list(range(1, STEPS + 1))
    for key in KEYS:
        a, b = [r[key] for r in ckpt], [r[key] for r in plain]
        print(f"{model} {key}: max |checkpointed - plain| = {max(abs(x - y) for x, y in zip(a, b)):.3g}")
        assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, f"{key}: checkpointed {a} vs plain {b}"
    assert abs(ckpt[-1]["eval_loss"] - plain[-1]["eval_loss"]) <= TOL
    # Routing unchanged: every expert got the same tokens at every step and layer.
    assert expert_loads(runs(model, True)) == expert_loads(runs(model, False))
    # The comparison has teeth: PA and balance are counted (each once) and training moved the loss.
    assert all(r["pa"] > 0 and r["balance"] > 0 for r in ckpt)
    losses = [r["loss"] for r in plain]
    assert max(losses) - min(losses) > 1000 * TOL, losses
    settings = json.loads((runs(model, True) / "run.json").read_text())["settings"]
    assert settings["activation_checkpointing"] is True


@pytest.mark.dist
def test_resume_of_a_checkpointed_run_is_bit_exact(runs: Runs) -> None:
    whole = runs("plain", True)
    out = runs.root / "resumed"
    du.run("torchrun", 2, runs.args("plain", out, True, ("--stop-after", "2"))).check()
    assert [r["step"] for r in du.read_metrics(out)] == [1, 2]
    du.run("torchrun", 2, runs.args("plain", out, True, ("--resume",))).check()
    resumed, uninterrupted = du.read_metrics(out), du.read_metrics(whole)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in (*KEYS, "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key
    for path in sorted((whole / "checkpoints" / f"step{STEPS}").glob("*model_states.pt")):
        a = torch.load(path, map_location="cpu", weights_only=False)
        b = torch.load(out / "checkpoints" / f"step{STEPS}" / path.name, map_location="cpu", weights_only=False)
        for key, tensor in a.get("module", a).items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, b.get("module", b)[key]), f"{path.name}: {key}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flag, message", [
    (True, '--activation-checkpointing with an "activation_checkpointing" section in --ds-config'),
    (False, '--ds-config has an "activation_checkpointing" section, which this model does not read'),
])
def test_deepspeed_activation_checkpointing_section_is_refused(capsys, monkeypatch, tiny_moe_dir, tmp_path, flag,
                                                               message) -> None:
    """DeepSpeed's section (partition_activations, cpu_checkpointing = activations in host memory) would be
    silently ignored: the model checkpoints with torch.utils.checkpoint. One error, before any process group."""
    from factorllm_ds import distributed
    from factorllm_ds.cli import main

    def no_process_group(*args, **kwargs):
        raise AssertionError("validation let the arguments through")

    monkeypatch.setattr(distributed, "init", no_process_group)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2},
                              "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True}}))
    data = tiny.write_calibration_text(tmp_path / "text.txt")
    argv = ["train", "--model", str(tiny_moe_dir), "--data", str(data), "--out", str(tmp_path / "out"),
            "--ds-config", str(ds), "--seq-len", str(SEQ_LEN), "--steps", "1", "--no-progress",
            *(["--activation-checkpointing"] if flag else [])]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "train: bad arguments" in err, err
    assert not (tmp_path / "out").exists()
