"""Run under torchrun: load a training checkpoint into a DeepSpeed engine and save its logits.

Used by test_export_run.py to check that an exported folder reproduces the engine exactly.
Usage: torchrun --nproc_per_node N scripts/engine_logits.py RUN_DIR EP_SIZE OUT.pt
"""

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    run_dir, ep_size, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    import deepspeed

    from factorllm_ds import distributed
    from factorllm_ds.config import Objective
    from factorllm_ds.ds_moe import build_train_model, ep_rank_of

    distributed.init(600)
    manifest = json.loads((run_dir / "run.json").read_text())
    model = build_train_model(Path(manifest["model"]), ep_size, Objective(prior="none"), ep_rank_of(ep_size))
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "p"})
    opt = torch.optim.SGD(groups, lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    engine.load_checkpoint(str(run_dir / "checkpoints"), load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.module.eval()
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = engine(ids.to(engine.device)).cpu()  # DS_ACCELERATOR=cuda: the engine runs on the GPU
    if torch.distributed.get_rank() == 0:
        torch.save({"ids": ids, "logits": logits}, out)
    distributed.hard_exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
