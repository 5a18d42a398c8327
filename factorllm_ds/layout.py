"""The artifact layout: every file and folder name a stage writes or another stage reads.

Stages (convert, train, export, eval, plan, demo) never import each other; what one writes
and the next reads is named here, once, with the one loader for each shared file.

    converted folder   config.json, model*.safetensors, PARTITION_FILE, MANIFEST_FILE, model code
    training run       RUN_MANIFEST, METRICS_FILE, EXPERT_LOAD_FILE, TENSORBOARD_DIR,
                       CHECKPOINT_DIR/LATEST_FILE, CHECKPOINT_DIR/TAG/{MODEL_STATES, EXPERT_FILE...}
    exported folder    config.json, model*.safetensors, MANIFEST_FILE (+ PARTITION_FILE for factorllm)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factorllm_ds.errors import UserError

# A converted (or exported) folder.
PARTITION_FILE = "factorllm_partition.safetensors"
MANIFEST_FILE = "factorllm_manifest.json"

# A training run folder (train --out).
RUN_MANIFEST = "run.json"
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # DeepSpeed's pointer to the newest tag, inside CHECKPOINT_DIR
METRICS_FILE = "metrics.csv"
EXPERT_LOAD_FILE = "expert_load.jsonl"
TENSORBOARD_DIR = "tensorboard"

# One DeepSpeed checkpoint tag folder (CHECKPOINT_DIR/TAG): non-expert states + one file per (layer, global expert).
MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def checkpoint_tag(step: int) -> str:
    return f"step{step}"


def list_tags(run_dir: Path) -> list[str]:
    """The run's checkpoint tags that hold non-expert states, oldest first (step2 before step10)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return sorted((p.name for p in root.iterdir() if (p / MODEL_STATES).is_file()),
                  key=lambda t: (len(t), t)) if root.is_dir() else []


def latest_tag(run_dir: Path) -> str | None:
    """The tag DeepSpeed recorded as the newest, or None when no checkpoint was saved."""
    latest = Path(run_dir) / CHECKPOINT_DIR / LATEST_FILE
    return latest.read_text().strip() if latest.is_file() else None


def read_manifest(folder: Path) -> dict | None:
    """The MANIFEST_FILE that convert / export wrote into ``folder``, or None when there is none."""
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_partition(folder: Path, flag: str = "--model") -> dict[int, torch.Tensor]:
    """Layer -> neuron permutation recorded by convert.

    Neurons perm[:S] form the shared expert (S = the config's shared_intermediate_size, 0 when there is
    none) and routed expert e owns perm[S + e*R : S + (e+1)*R], R the expert size.
    """
    from safetensors.torch import load_file

    path = Path(folder) / PARTITION_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise UserError(f"{flag} {folder}: no {PARTITION_FILE}; was this folder made by `factorllm-ds convert`?")
    return {int(k.split(".")[1]): v.long() for k, v in load_file(str(path)).items()}
