"""train: fine-tune routers + experts of a converted model with DeepSpeed expert parallelism.

setup (validate, process group, data, model, engine) -> loop (step, log, eval, save) ->
final checkpoint. Launch with `deepspeed`, `torchrun`, `mpirun` or SLURM `srun`; the same
flags everywhere.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from factorllm_ds.checkpoints import (
    CHECKPOINT_GLOBALS,
    CHECKSUM_FILE,
    check_loads_safely,
    checkpoint_to_load,
    intact_tag,
    read_run_manifest,
    write_checksums,
)
from factorllm_ds.config import TRAIN_SEQ_LEN, Objective, arg, bound_problems, fail_if
from factorllm_ds.data import DATA_MIXES
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import check_model_folder, check_token_ids, load_tokenizer, read_config, text_config
from factorllm_ds.layout import (
    CHECKPOINT_DIR,
    EXPERT_LOAD_FILE,
    LATEST_FILE,
    METRICS_FILE,
    RUN_MANIFEST,
    TENSORBOARD_DIR,
    checkpoint_tag,
    latest_tag,
    list_tags,
)
from factorllm_ds.locks import LOCK_FILE, RunLock
from factorllm_ds.outputs import listed_files, output_problems
from factorllm_ds.preemption import Preemption, agree, agree_max
from factorllm_ds.safe_load import safe_torch_load
from factorllm_ds.shape import MODEL_WORDING, MoEShape, shape_problems

log = logging.getLogger("factorllm_ds")

DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10**9, "wall_clock_breakdown": False}
MICRO_BATCH_SIZE, GRAD_CLIP = 1, 1.0  # defaults when neither the flag nor --ds-config sets them
# DeepSpeed JSON keys that duplicate a factorllm-ds flag: the flag is the one source of truth.
DS_KEY_FOR_FLAG = {"micro_batch_size": ("train_micro_batch_size_per_gpu", "--micro-batch-size"),
                   "grad_clip": ("gradient_clipping", "--grad-clip")}


@dataclass
class TrainConfig(Objective):
    """factorllm-ds train: fine-tune routers + experts with the Prior-Approximate loss (DeepSpeed MoE)."""

    model: Path = arg("converted FactorLLM folder (factorllm-ds convert)", default=None, required=True)
    data: list[str] = arg("training text: .txt/.jsonl/.json/.parquet/.csv files or hub dataset names",
                          default=None, required=True)
    out: Path = arg("run directory: checkpoints, metrics.csv, TensorBoard logs", default=None, required=True)
    ds_config: Path | None = arg("DeepSpeed JSON (ZeRO stage, bf16, offload); see ds_configs/. Default: ZeRO-2 fp32",
                                 default=None)
    ep_size: int = arg("expert-parallel size: ranks that share one copy of the experts", default=1)
    seq_len: int = arg("tokens per training sequence", default=TRAIN_SEQ_LEN)
    steps: int | None = arg("optimizer steps (default: one pass over --data, or from --tokens)", default=None)
    tokens: int | None = arg("training tokens; sets --steps from the global batch", default=None)
    micro_batch_size: int | None = arg(f"sequences per rank per forward (default {MICRO_BATCH_SIZE})", default=None)
    global_batch_size: int | None = arg("sequences per optimizer step over all ranks (default micro x world); "
                                        "gradient accumulation makes up the difference", default=None)
    lr: float = arg("peak learning rate (Adam)", default=4e-5)
    router_lr: float | None = arg("peak learning rate of the routers (default: --lr, as in the paper). The router "
                                  "is tiny and in hard mode learns only from the PA loss: a larger value lets it "
                                  "follow the prior within a short run", default=None)
    routed_lr: float | None = arg("peak learning rate of the routed experts (default: --lr). Each routed expert "
                                  "learns from the k/E of the tokens that pick it, where the shared expert and a "
                                  "dense model learn from all of them", default=None)
    min_lr_ratio: float = arg("cosine decay ends at lr x this", default=0.001)
    warmup_steps: int = arg("linear warm-up steps", default=500)
    weight_decay: float = arg("Adam weight decay", default=1e-5)
    beta1: float = arg("Adam beta1", default=0.9)
    beta2: float = arg("Adam beta2", default=0.95)
    grad_clip: float | None = arg(f"gradient clipping norm, 0 = off (default {GRAD_CLIP})", default=None)
    optimizer: str = arg("adamw or sgd (sgd: for exact cross-topology comparisons)", choices=("adamw", "sgd"),
                         default="adamw")
    train_router_only: bool = arg("freeze the experts too (router-only training)", default=False)
    activation_checkpointing: bool = arg("recompute each decoder layer in the backward (torch.utils.checkpoint): "
                                         "activations shrink to one hidden state per layer plus one layer's, for "
                                         "about one more forward of compute (the PA prior is not recomputed)",
                                         default=False)
    teacher: Path | None = arg("dense Hugging Face model folder to distill from, usually the one you converted (same "
                               "tokenizer): the loss pulls the MoE's next-token distribution towards the teacher's "
                               "(--distill-weight). Each rank holds a frozen copy in the training dtype",
                               default=None)
    seed: int = arg("seed for data order", default=0)
    eval_data: list[str] | None = arg("held-out text; default: the last --eval-fraction of --data", default=None)
    eval_fraction: float = arg("share of --data windows held out when --eval-data is not given", default=0.01)
    data_mix: str = arg("how several --data sources are mixed: concat (one stream, each sampled in proportion to "
                        "its size) or equal (the same number of training windows from each source, each held out "
                        "on its own: a small text of the served domain beside a large general one)",
                        choices=DATA_MIXES, default="concat")
    eval_every: int = arg("evaluate every N steps (0 = only at the end)", default=0)
    eval_batches: int = arg("max eval micro-batches per rank", default=8)
    save_every: int = arg("checkpoint every N steps (0 = only at the end)", default=0)
    log_every: int = arg("log metrics every N steps", default=1)
    resume: bool = arg("continue the run in --out from its newest checkpoint, after checking it against the "
                       "checksums recorded when it was saved. DeepSpeed's files are unpickled with weights_only and "
                       "an allow-list of DeepSpeed's types (a file that would run code is refused); their numbers "
                       "are trusted as they are", default=False)
    resume_tag: str | None = arg("with --resume: the checkpoint to continue from instead of the newest, e.g. step400 "
                                 "(an error about a damaged checkpoint names the newest intact one)", default=None)
    restart: bool = arg("start the run in --out again from step 0 when it stopped before its first checkpoint (so "
                        "there is nothing to --resume): train replaces the run.json, metrics.csv, expert_load.jsonl "
                        "and TensorBoard steps it wrote there and touches nothing else. Refused when --out holds a "
                        "finished checkpoint", default=False)
    tokenizer: Path | None = arg("folder with the tokenizer files, when --model has none (default: --model)",
                                 default=None)
    stop_after: int | None = arg("stop (with a checkpoint) after this many steps of this invocation", default=None)
    nonfinite_steps: int = arg("stop, exit 2, when the training loss (mean over all ranks) is NaN/Inf at this many "
                               "steps in a row, or at the last step. DeepSpeed skips the update of such a step, so a "
                               "single bad batch can pass; no checkpoint is saved at one", default=3)
    dist_timeout: int = arg("seconds a rank waits for the others before failing", default=1800)
    progress: bool = arg("rank-0 progress bar", default=True)
    check: bool = arg("only validate the flags, the DeepSpeed JSON and the model folder, then exit (0: fine, 2: the "
                      "problems); starts no process group. The world size is read from WORLD_SIZE (default 1)",
                      default=False)
    shape: MoEShape | None = field(default=None)  # --model's, resolved by validate(); not a flag

    def validate(self, model_config: dict, ds: dict, world: int, rank: int = 0) -> TrainConfig:
        """All checks that need no process group, against --model's config.json (``model_config``) and the DeepSpeed
        JSON ``ds``. Returns the resolved config (``self`` is not changed), which carries the model's MoE shape.
        ``rank`` 0 also reads every byte of the checkpoint to resume (the others only compare sizes) and asks whether
        another job holds --out."""
        problems = []
        load_tokenizer(self.model, self.tokenizer, model_config=model_config)  # its token ids must fit the vocabulary
        if model_config.get("model_type") != "factorllm":
            raise UserError(f"--model {self.model} is a dense model (model_type {model_config.get('model_type')!r}), "
                            f"not a FactorLLM checkpoint. Convert it first: factorllm-ds convert --model {self.model} "
                            "--out MOE_DIR")
        check_model_folder(self.model, "--model", model_config)  # shards and shapes, before any process group
        shape = MoEShape.of_config(model_config)
        if self.balance_kind == "bias" and (model_config.get("routing") != "hard"
                                            or not model_config.get("router_bias")):
            problems.append(f"--balance-kind bias needs hard routing with a router bias (it is folded into that bias "
                            f"on export); --model {self.model} has routing {model_config.get('routing')!r}, "
                            f"router_bias {model_config.get('router_bias')}. Use --balance-kind paper or switch, or "
                            "convert with --router-bias")
        problems += shape_problems(shape, MODEL_WORDING, ep_size=self.ep_size, world=world, seq_len=self.seq_len,
                                   max_positions=text_config(model_config).get("max_position_embeddings"))
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        problems += activation_checkpointing_problems(self, ds)
        if stage == 3:
            problems.append("--ds-config uses ZeRO stage 3, which DeepSpeed's MoE does not support; use stage 1 or "
                            "2 (with \"offload_optimizer\" for very large models), e.g. "
                            "ds_configs/zero2_offload_bf16.json")
        for source in self.data + (self.eval_data or []):
            p = Path(source)
            if p.is_file() and p.stat().st_size == 0:
                problems.append(f"--data {source}: the file is empty")
            elif not p.exists() and ("/" not in source or source.startswith((".", "/"))):
                problems.append(f"--data {source}: no such file")
        if self.steps is not None and self.tokens is not None:
            problems.append("pass --steps or --tokens, not both")
        problems += teacher_problems(self, model_config)
        knob_problems, resolved = resolve_knobs(self, ds, world)
        if rank == 0:
            probe_lock(self.out)
        run_problems, tag = run_dir_problems(self, model_config, full_check=rank == 0)
        problems += knob_problems + number_problems(self) + run_problems
        fail_if(problems, "train: bad arguments")
        cfg = replace(self.for_model(model_config), resume=self.resume or self.resume_tag is not None, resume_tag=tag,
                      distill_weight=self.resolved_distill_weight(self.teacher is not None), shape=shape, **resolved)
        if stage == 0 and cfg.ep_size > 1 and cfg.grad_clip:
            log.warning("ZeRO stage 0 with --ep-size > 1 and clipping: DeepSpeed averages per-rank MoE norms; "
                        "prefer stage 1/2 for exact clipping")
        return cfg


# ----------------------------------------------------------------------------- validation


def load_ds_config(cfg: TrainConfig) -> dict:
    if cfg.ds_config is None:
        return json.loads(json.dumps(DEFAULT_DS_CONFIG))
    path = Path(cfg.ds_config)
    if not path.is_file():
        raise UserError(f"--ds-config {path}: no such file (see ds_configs/ for ZeRO-1/2 examples)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--ds-config {path}: not valid JSON ({err})") from err


def resolve_knobs(cfg: TrainConfig, ds: dict, world: int) -> tuple[list[str], dict]:
    """Reconcile flags with the DeepSpeed JSON: one source of truth, conflicts are errors.

    Returns the problems and the resolved values (micro/global batch, clipping) for the config.
    """
    problems, resolved = [], {}
    for attr, (key, flag) in DS_KEY_FOR_FLAG.items():
        ours, theirs = getattr(cfg, attr), ds.get(key)
        if theirs in (None, "auto"):
            continue
        if ours is not None and float(ours) != float(theirs):
            problems.append(f"{flag} {ours} disagrees with \"{key}\": {theirs} in --ds-config; set it in one place")
        elif ours is None:
            log.info("taking %s=%s from --ds-config", key, theirs)
            resolved[attr] = type(theirs)(theirs)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"--ds-config has an \"{key}\" section; factorllm-ds builds it from --lr/--warmup-steps/"
                            f"--weight-decay. Remove the section")
    # `is None`, not `or`: a 0 given is refused below, never silently taken as "the default".
    micro = resolved.get("micro_batch_size", cfg.micro_batch_size)
    micro = MICRO_BATCH_SIZE if micro is None else micro
    clip = resolved.get("grad_clip", cfg.grad_clip)
    global_bs = micro * world if cfg.global_batch_size is None else cfg.global_batch_size
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        if ds.get(key) not in (None, "auto"):
            problems.append(f"--ds-config sets \"{key}\"; use --global-batch-size instead (one source of truth)")
    micro_flag = ("\"train_micro_batch_size_per_gpu\" in --ds-config" if "micro_batch_size" in resolved
                  else "--micro-batch-size")
    for flag, value in ((micro_flag, micro), ("--global-batch-size", global_bs)):
        if value < 1:
            problems.append(f"{flag} {value}: must be >= 1")
    if micro >= 1 and global_bs >= 1 and global_bs % (micro * world):
        problems.append(f"--global-batch-size {global_bs} is not a multiple of --micro-batch-size "
                        f"{micro} x world size {world}")
    resolved.update(micro_batch_size=micro, grad_clip=GRAD_CLIP if clip is None else clip, global_batch_size=global_bs)
    return problems, resolved


def number_problems(cfg: TrainConfig) -> list[str]:
    """Counts and rates a run cannot start with (NaN, negative, zero steps)."""
    return cfg.objective_problems() + bound_problems(cfg, {
        "lr": "finite > 0", "router_lr": "finite > 0", "routed_lr": "finite > 0", "weight_decay": "finite >= 0",
        "min_lr_ratio": "finite >= 0",
        "grad_clip": "finite >= 0", "beta1": "in [0, 1)", "beta2": "in [0, 1)", "eval_fraction": "in [0, 1)",
        **dict.fromkeys(("steps", "tokens", "log_every", "dist_timeout", "stop_after", "eval_batches",
                         "nonfinite_steps"), ">= 1"),
        **dict.fromkeys(("warmup_steps", "save_every", "eval_every"), ">= 0")})


def teacher_problems(cfg: TrainConfig, model_config: dict) -> list[str]:
    """--teacher must be a dense causal LM over the same vocabulary; --distill-weight > 0 needs one."""
    if cfg.teacher is None:
        if cfg.distill_weight:
            return [f"--distill-weight {cfg.distill_weight} needs --teacher DENSE_DIR (the dense model you converted)"]
        return []
    if cfg.distill_weight == 0:
        return [f"--teacher {cfg.teacher} with --distill-weight 0: the teacher would be loaded and never used; drop "
                "--teacher, or give a weight in (0, 1]"]
    teacher = read_config(cfg.teacher, "--teacher")
    if teacher.get("model_type") == "factorllm":
        return [f"--teacher {cfg.teacher} is a FactorLLM MoE; pass the dense model it was converted from"]
    vocab, student_vocab = teacher.get("vocab_size"), model_config.get("text_config", {}).get("vocab_size")
    if vocab != student_vocab:  # the model's own choice first: a folder of the wrong model needs no shape check
        return [f"--teacher {cfg.teacher} has vocab_size {vocab}, --model {cfg.model} has {student_vocab}: the "
                "teacher must share the model's tokenizer (pass the dense model you converted)"]
    try:  # its shards and shapes now: loading it comes only after the process group started
        check_model_folder(cfg.teacher, "--teacher", teacher)
    except UserError as err:
        return [str(err)]
    return []


def activation_checkpointing_problems(cfg: TrainConfig, ds: dict) -> list[str]:
    """DeepSpeed's "activation_checkpointing" section only configures deepspeed.checkpointing.checkpoint, which
    this model never calls: its settings (partition_activations, cpu_checkpointing, ...) would be silently ignored."""
    if "activation_checkpointing" not in ds:
        return []
    if cfg.activation_checkpointing:
        return ["--activation-checkpointing with an \"activation_checkpointing\" section in --ds-config: the flag "
                "recomputes layers with torch.utils.checkpoint and that section's options (partition_activations, "
                "cpu_checkpointing: activations offloaded to host memory, ...) cannot take effect. Remove the section"]
    return ["--ds-config has an \"activation_checkpointing\" section, which this model does not read (it would be "
            "silently ignored); remove it and pass --activation-checkpointing to recompute activations"]


def probe_lock(out: Path) -> None:
    """Raise the lock's error (naming the holder) if another job is writing ``out`` now; changes nothing."""
    if (Path(out) / LOCK_FILE).is_file():
        with RunLock(out):
            pass


def _inputs(cfg: TrainConfig) -> dict:
    inputs = {"--model": cfg.model, "--ds-config": cfg.ds_config, "--tokenizer": cfg.tokenizer,
              "--teacher": cfg.teacher}
    for flag, sources in (("--data", cfg.data), ("--eval-data", cfg.eval_data or [])):
        inputs.update({(flag if i == 0 else f"{flag} (file {i + 1})"): Path(p) for i, p in enumerate(sources)
                       if Path(p).exists()})
    return inputs


def run_dir_problems(cfg: TrainConfig, model_config: dict, full_check: bool = True) -> tuple[list[str], str | None]:
    """What stops --out from being written (a new run) or resumed; and the checkpoint tag to resume from.

    ``full_check``: verify every checkpoint byte against its checksums and unpickle (weights only) every file of
    the tag before DeepSpeed does (else compare sizes only).
    """
    out = Path(cfg.out)
    resume = cfg.resume or cfg.resume_tag is not None
    # The rule of every output: a folder this tool wrote (run.json), holding and inside no input.
    problems = output_problems(out, "--out", True, _inputs(cfg), (RUN_MANIFEST,))
    if resume and cfg.restart:
        return ["--resume continues the run in --out, --restart starts it again from step 0: pass one of them"], None
    if not resume:
        return new_run_problems(cfg) or problems, None
    if problems:
        return problems, None
    if not saved_tags(out):
        fix = ("the run stopped before its first save finished: start it again with --restart instead of --resume, "
               "or pick a new --out" if (out / RUN_MANIFEST).is_file() else "start without --resume")
        return [f"--resume: no checkpoint in --out {out}; {fix}"], None
    try:
        previous = read_run_manifest(out, "--resume: --out", need=("ep_size", "world_size"))
        if previous.get("model_fingerprint") != model_fingerprint(model_config):
            return [f"--resume: --out {out} was trained from a different model ({previous.get('model')}); "
                    "pass the same --model or a new --out"], None
        tag = checkpoint_to_load(out, cfg.resume_tag, "--resume-tag", "--resume --resume-tag {tag}")
        intact_tag(out, tag, "--resume", "--resume --resume-tag {tag}", sizes_only=not full_check)
        if full_check:  # a file that would run code is refused here, before DeepSpeed unpickles anything
            check_loads_safely(out, tag, "--resume: checkpoint")
    except UserError as err:
        return [str(err)], None
    return [], tag


def finished_tags(out: Path) -> list[str]:
    """The checkpoints of ``out`` whose save finished (rank 0 writes checksums.json last), oldest first."""
    return [t for t in list_tags(out) if (Path(out) / CHECKPOINT_DIR / t / CHECKSUM_FILE).is_file()]


def saved_tags(out: Path) -> list[str]:
    """:func:`finished_tags`, or else the tag ``checkpoints/latest`` names (written only after a whole save, also by
    versions that kept no checksums): what --restart must never start over from."""
    pointer = latest_or_none(out)
    return finished_tags(out) or ([pointer] if pointer else [])


# What DeepSpeed's ZeRO save copies into checkpoints/, beside the tags: its recovery scripts.
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def own_files(out: Path) -> set[str]:
    """The files of run folder ``out`` (paths relative to it) that train can prove it wrote, for whoever must delete
    the run (the demo starting over): none without its run.json; else its logs, TensorBoard's event files,
    ``checkpoints/latest``, DeepSpeed's recovery scripts, and each finished checkpoint's files as its checksums.json
    lists them. The files of a save cut short prove nothing."""
    out = Path(out)
    if not (out / RUN_MANIFEST).is_file():
        return set()
    root = Path(CHECKPOINT_DIR)
    files = {RUN_MANIFEST, METRICS_FILE, EXPERT_LOAD_FILE, (root / LATEST_FILE).as_posix(),
             *((root / script).as_posix() for script in DEEPSPEED_SCRIPTS)}
    files |= {p.relative_to(out).as_posix() for p in (out / TENSORBOARD_DIR).glob("events.out.tfevents.*")}
    for tag in finished_tags(out):
        listed = listed_files(out / root / tag, CHECKSUM_FILE) or set()
        files |= {(root / tag / name).as_posix() for name in (*listed, CHECKSUM_FILE)}
    return files


def new_run_problems(cfg: TrainConfig) -> list[str]:
    """Why a run cannot start (or, with --restart, start again) in --out. Nothing train did not write is touched,
    and a finished checkpoint is never discarded."""
    out = Path(cfg.out)
    if not out.is_dir() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return []
    if not (out / RUN_MANIFEST).is_file():
        return [f"--out {out} already holds files, but no {RUN_MANIFEST}: factorllm-ds train did not write it (so "
                "neither --resume nor --restart applies); pick a new --out"]
    saved = saved_tags(out)
    if saved:
        refused = "--restart refused: " if cfg.restart else ""
        return [f"{refused}--out {out} already holds files: a run with checkpoints ({', '.join(saved[-3:])}); pass "
                "--resume to continue it, or a new --out to start over (a checkpoint is never discarded)"]
    if cfg.restart:
        return []
    return [f"--out {out} already holds files: a run that stopped before its first checkpoint, so there is nothing to "
            "--resume. Pass --restart to start it again from step 0 (train replaces only its own run.json, "
            "metrics.csv, expert_load.jsonl and TensorBoard steps there), or pick a new --out"]


def model_fingerprint(model_config: dict) -> str:
    import hashlib

    keys = ("num_experts", "num_experts_per_tok", "expert_intermediate_size", "routing", "text_config")
    return hashlib.sha256(json.dumps({k: model_config.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- setup


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return fn


def build_optimizer(cfg: TrainConfig, model, total_steps: int):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if ".gate.router." not in n], "name": "experts",
               "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": [p for n, p in trainable if ".gate.router." in n], "name": "routers",
               "weight_decay": cfg.weight_decay, "lr": cfg.lr if cfg.router_lr is None else cfg.router_lr}]
    # Empty groups are dropped: the split leaves the expert group's dense part empty, --train-router-only all of it.
    groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    for g in groups:  # DeepSpeed's split marks the routed experts' groups "moe"
        if g.get("moe") and cfg.routed_lr is not None:
            g["lr"] = cfg.routed_lr
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


@dataclass
class Run:
    cfg: TrainConfig
    engine: object
    data: object
    sampler: object
    rank: int
    world: int
    accum: int
    total_steps: int
    step: int = 0


def take_lock(cfg: TrainConfig, model_config: dict, held: contextlib.ExitStack) -> None:
    """Rank 0's exclusive hold on --out until ``held`` closes (another job's error names the holder), then the
    run-folder checks again: another job may have written the folder between the first check and the lock."""
    held.enter_context(RunLock(cfg.out))
    fail_if(run_dir_problems(cfg, model_config, full_check=False)[0], "train: bad arguments")


def setup(cfg: TrainConfig, held: contextlib.ExitStack) -> Run:
    """Validation and data on every rank, rank 0's lock on --out (held by ``held``), then :func:`start`."""
    from factorllm_ds import distributed
    from factorllm_ds.data import prepare

    info = distributed.detect()
    ds, model_config = load_ds_config(cfg), read_config(cfg.model)
    cfg = cfg.validate(model_config, ds, info.world_size, info.rank)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    # Before the process group: too little text is a user error, reported without any rendezvous.
    packed = prepare(cfg.data, cfg.eval_data, tokenizer, cfg.seq_len, cfg.eval_fraction, cfg.data_mix)
    max_id = max((int(part.max()) for part in (packed.train, packed.eval) if part is not None and part.size),
                 default=-1)
    check_token_ids(max_id, tokenizer, model_config, f"--model {cfg.model}", tokenizer.factorllm_desc)
    if info.rank == 0:
        take_lock(cfg, model_config, held)
    return start(cfg, ds, packed)


def start(cfg: TrainConfig, ds: dict, packed) -> Run:
    """Process group, model, engine; the manifest of a new run or the state of a resumed one."""
    import deepspeed

    from factorllm_ds import distributed
    from factorllm_ds.data import make_sampler
    from factorllm_ds.ds_moe import build_train_model, ep_rank_of

    info = distributed.init(cfg.dist_timeout)
    dist.barrier()  # no rank goes on (to write anything) before rank 0 holds --out
    torch.manual_seed(cfg.seed)
    accum = cfg.global_batch_size // (cfg.micro_batch_size * info.world_size)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    if cfg.steps is None:
        cfg = replace(cfg, steps=max(1, math.ceil((cfg.tokens or packed.train_tokens) / tokens_per_step)))
    if cfg.warmup_steps >= cfg.steps:
        new = max(0, cfg.steps // 10)
        log.warning("--warmup-steps %d >= --steps %d: using %d warm-up steps", cfg.warmup_steps, cfg.steps, new)
        cfg = replace(cfg, warmup_steps=new)
    ep_rank = ep_rank_of(cfg.ep_size)
    model = build_train_model(cfg.model, cfg.ep_size, cfg, ep_rank,
                              activation_checkpointing=cfg.activation_checkpointing, shape=cfg.shape)
    # DeepSpeed keeps fp32 masters only in bf16/fp16 mode; otherwise the weights must be fp32
    # themselves, or Adam's small updates vanish in bf16 rounding.
    model.to(training_dtype(ds))
    if cfg.train_router_only:
        for name, p in model.named_parameters():
            p.requires_grad_(".gate.router." in name)
    optimizer, scheduler = build_optimizer(cfg, model, cfg.steps)
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=accum,
              train_batch_size=cfg.global_batch_size, gradient_clipping=cfg.grad_clip)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    check_ep_layout(engine, cfg.ep_size, ep_rank)
    if cfg.teacher is not None:
        from factorllm_ds.modeling import load_dense

        engine.module.attach_teacher(load_dense(cfg.teacher, training_dtype(ds), "--teacher").to(engine.device))
    run = Run(cfg, engine, packed, make_sampler(packed, cfg.seed), info.rank, info.world_size, accum, cfg.steps)
    if cfg.resume:
        resume(run)
    elif run.rank == 0:
        write_manifest(run)
    return run


def training_dtype(ds: dict) -> torch.dtype:
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds.get(key, {}).get("enabled"):
            return dtype
    return torch.float32


def check_ep_layout(engine, ep_size: int, ep_rank: int) -> None:
    for module in engine.module.modules():
        group = getattr(module, "ep_group", None)
        if group is not None and ep_size > 1 and dist.get_rank(group) != ep_rank:
            raise RuntimeError("internal error: DeepSpeed's expert-parallel layout differs from the one used to load "
                               "experts (rank % ep_size)")


def write_manifest(run: Run) -> None:
    cfg = run.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"model": str(Path(cfg.model).resolve()), "model_fingerprint": model_fingerprint(read_config(cfg.model)),
                "ep_size": cfg.ep_size, "world_size": run.world, "total_steps": run.total_steps,
                # Paths absolute: export checks --out against them from wherever it runs (the run's inputs).
                "settings": {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
    tmp = out / (RUN_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.rename(out / RUN_MANIFEST)


def resume(run: Run) -> None:
    cfg = run.cfg
    previous = read_run_manifest(cfg.out, "--resume: --out", need=("ep_size", "world_size"))
    same_layout = previous["ep_size"] == cfg.ep_size and previous["world_size"] == run.world
    if not same_layout:
        log.warning("resuming a run saved at ep_size %s / world %s at ep_size %s / world %s: model weights and "
                    "step are restored, optimizer state is reset (DeepSpeed cannot reshard it for MoE)",
                    previous["ep_size"], previous["world_size"], cfg.ep_size, run.world)
    # validate() checked this tag against its checksums (rank 0: every byte) and unpickled each file with
    # weights_only before anything was loaded; DeepSpeed's own reads are weights_only too (a file changed since).
    with weights_only_loads(run.engine, "--resume: checkpoint"):
        path, client = run.engine.load_checkpoint(str(Path(cfg.out) / CHECKPOINT_DIR), tag=cfg.resume_tag,
                                                  load_optimizer_states=same_layout,
                                                  load_lr_scheduler_states=same_layout)
    if path is None:
        raise UserError(f"--resume: could not load a checkpoint from {Path(cfg.out) / CHECKPOINT_DIR}")
    run.step = int(client["step"])
    if not same_layout:
        for _ in range(run.step):
            run.engine.lr_scheduler.step()
    log.info("resumed from %s at step %d", path, run.step)
    pointer = latest_or_none(cfg.out)
    if run.rank == 0 and pointer != cfg.resume_tag:
        # `latest` names the branch the run is on, as metrics.csv does: a requeued job (--resume) must not jump
        # back to the newer, abandoned checkpoints, which stay on disk (--resume-tag picks them).
        log.warning("%s/%s now names %s, where this run goes on from (was %s)", CHECKPOINT_DIR, LATEST_FILE,
                    cfg.resume_tag, pointer)
        write_latest(Path(cfg.out) / CHECKPOINT_DIR, cfg.resume_tag)


@contextlib.contextmanager
def weights_only_loads(engine, what: str):
    """Within the block, every file DeepSpeed's checkpoint engine reads (model, expert and ZeRO optimizer states:
    ``load_checkpoint`` reads all of them through ``engine.checkpoint_engine.load``, which would unpickle with
    ``weights_only=False``) goes through :func:`safe_torch_load` with DeepSpeed's allow-list: tensors, containers
    and the listed DeepSpeed types, never code."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path, map_location=None):  # DeepSpeed maps every checkpoint file to the CPU, as safe_torch_load does
        return safe_torch_load(path, what, CHECKPOINT_GLOBALS, mmap=False)

    checkpoint_engine.load = load  # this engine only, for this block only
    try:
        yield
    finally:
        del checkpoint_engine.load


# ----------------------------------------------------------------------------- loop


def train_step(run: Run) -> dict:
    from factorllm_ds.data import micro_batch

    engine = run.engine
    totals: dict[str, torch.Tensor] = {}
    for micro in range(run.accum):
        ids = micro_batch(run.data.train, run.sampler, run.step, micro, run.rank, run.world,
                          run.cfg.micro_batch_size, run.accum).to(engine.device)
        loss, metrics = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        metrics["loss"] = loss.detach()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v.float() / (run.accum if k != "expert_counts" else 1)
    run.step += 1
    return totals


def rebalance(run: Run, counts_LE: torch.Tensor) -> None:
    """--balance-kind bias: every rank applies the same update from the global load of this step."""
    from factorllm_ds.routing import update_selection_bias

    counts = counts_LE.clone()
    dist.all_reduce(counts)
    for block, layer_counts in zip(run.engine.module.blocks(), counts):
        update_selection_bias(block.gate.selection_bias, layer_counts, run.cfg.balance_bias_rate)


def reduce_metrics(totals: dict, world: int) -> dict:
    names = ("loss", "ce", "kd", "pa", "balance", "agreement")
    scalars = torch.stack([totals[k] for k in names])
    dist.all_reduce(scalars)
    counts = totals["expert_counts"].clone()
    dist.all_reduce(counts)
    return {**dict(zip(names, (scalars / world).tolist())), "expert_counts": counts}


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean held-out CE; every rank runs the same number of batches (MoE layers need it)."""
    data = run.data.eval
    if data is None:
        return None
    engine = run.engine
    mb = run.cfg.micro_batch_size
    n_batches = min(run.cfg.eval_batches, math.ceil(len(data) / (mb * run.world)))
    total = torch.zeros(2)
    engine.module.eval()
    for b in range(n_batches):
        idx = [(b * run.world + run.rank) * mb + i for i in range(mb)]
        valid = torch.tensor([i < len(data) for i in idx], dtype=torch.float32)
        ids = torch.from_numpy(data[[i % len(data) for i in idx]]).to(engine.device)
        logits = engine(ids)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                               reduction="none").mean(dim=1).cpu()
        total += torch.stack([(ce * valid).sum(), valid.sum()])
    engine.module.train()
    dist.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()


# A full disk surfaces as OSError (ENOSPC, EDQUOT) or as torch's writer failing ("unexpected pos", "file write failed").
WRITE_ERRORS = (OSError, RuntimeError)


def save(run: Run) -> None:
    """A DeepSpeed checkpoint, then (rank 0, once every rank's files are written) its checksum manifest, then
    ``checkpoints/latest`` naming it.

    A tag folder without ``checksums.json`` is a save that did not finish; --resume and export refuse it. Weights
    that are not finite are never saved. A save that fails on any rank (a full disk) raises the same
    :class:`UserError` on every rank and leaves the previous checkpoint and ``latest`` as they were.
    """
    cfg = run.cfg
    if agree(not weights_finite(run.engine)):
        raise UserError(divergence_message(run, f"the weights after step {run.step} are not finite (NaN or Inf), so "
                                                "they are not saved"))
    client = {"step": run.step, "samples": run.step * cfg.global_batch_size,
              "tokens": run.step * cfg.global_batch_size * cfg.seq_len}
    checkpoints, tag = Path(cfg.out) / CHECKPOINT_DIR, checkpoint_tag(run.step)
    folder = checkpoints / tag
    fresh = not folder.exists()  # a failed save removes the folder only if this save made it

    def prepare() -> None:
        if run.rank == 0:  # a tag saved again (a resume from an older tag) is unverified until its new manifest
            (folder / CHECKSUM_FILE).unlink(missing_ok=True)
            # Made here, so that DeepSpeed's own mkdir (ahead of a collective) cannot fail mid-save.
            folder.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        try:
            # `latest` is written by seal(), after every rank's files: DeepSpeed's (rank 0, once its own files are
            # written) could name a tag another rank failed to write.
            run.engine.save_checkpoint(str(checkpoints), tag=tag, client_state=client, save_latest=False)
        except WRITE_ERRORS:
            dist.barrier()  # the barrier save_checkpoint ends with, in which the other ranks wait
            raise

    def seal() -> None:
        if run.rank == 0:
            write_checksums(folder)
            write_latest(checkpoints, tag)

    for stage in (prepare, write, seal):
        on_every_rank(run, stage, folder, fresh)


def on_every_rank(run: Run, stage, folder: Path, fresh: bool) -> None:
    """``stage()`` on every rank, then one agreement: when it failed to write on any rank, every rank raises the same
    error (none is left waiting in a collective), after rank 0 removed ``folder`` if this save created it."""
    failure = None
    try:
        stage()
    except WRITE_ERRORS as err:
        failure = err
    if agree(failure is not None):
        if run.rank == 0 and fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise UserError(save_failure_message(run, folder, failure, removed=fresh)) from failure


def save_failure_message(run: Run, folder: Path, err: BaseException | None, removed: bool) -> str:
    out = Path(run.cfg.out)
    if err is None:
        cause = "another rank could not write its part (its error says why)"
    elif getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        cause = f"the disk is full or the quota is used up ({err.strerror})"
    else:
        cause = f"writing failed ({type(err).__name__}: {str(err)[:300]}), which is what a full disk looks like"
    try:
        free = f"{shutil.disk_usage(out).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    kept = latest_kept(out)
    return (f"--out {out}: could not save checkpoint {folder.name}: {cause}. Disk space on --out's file system: {free} "
            f"now (a quota may allow less). {kept}"
            + (f" The incomplete {folder.name} was removed." if removed else "")
            + " Free space (or move the run folder to a larger disk), then " +
            ("train --resume." if finished_tags(out) else "train --restart."))


def latest_kept(out: Path) -> str:
    tag = kept_tag(out)
    if tag is None:
        return "No checkpoint of this run was saved before."
    return f"The previous checkpoint {tag} and {CHECKPOINT_DIR}/{LATEST_FILE} are unchanged."


def kept_tag(out: Path) -> str | None:
    """The finished checkpoint ``checkpoints/latest`` names: the one --resume continues from (None: none)."""
    tag = latest_or_none(out)
    return tag if tag in finished_tags(out) else None


def latest_or_none(out: Path) -> str | None:
    """What ``checkpoints/latest`` says; None when it is missing or unreadable (checkpoint_to_load words that)."""
    try:
        return latest_tag(out)
    except (OSError, UnicodeDecodeError):
        return None


def write_latest(checkpoints: Path, tag: str) -> None:
    """``checkpoints/latest`` = ``tag``, replaced in one rename (a reader sees the old name or the new one)."""
    tmp = checkpoints / f"{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, checkpoints / LATEST_FILE)


def weights_finite(engine) -> bool:
    """Whether every parameter this rank holds is finite (max |x| per tensor: no tensor-sized temporaries)."""
    peaks = [torch.linalg.vector_norm(p.detach(), float("inf")) for p in engine.module.parameters()]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


def divergence_message(run: Run, what: str) -> str:
    """Why the run stopped at ``run.step`` with non-finite numbers, what was kept and what to do."""
    out, cfg = Path(run.cfg.out), run.cfg
    saved = kept_tag(out)
    kept = (f"the last checkpoint, {saved}, is kept and {CHECKPOINT_DIR}/{LATEST_FILE} names it (export it with "
            f"export --run {out} --tag {saved})" if saved else "no checkpoint was saved before it")
    return (f"{what}: training stopped at step {run.step} without saving; {kept}. Usual causes: a learning rate too "
            f"high (--lr {cfg.lr:g}), NaN/Inf in --model's weights, fp16 overflow. The settings are saved with the "
            "checkpoints, so --resume would follow the same course: start a new run with other settings "
            + ("in a new --out." if finished_tags(out) else f"(--restart reuses --out {out})."))


class MetricsLog:
    """metrics.csv + expert_load.jsonl + TensorBoard, written by rank 0 only."""

    FIELDS = ("step", "tokens", "lr", "loss", "ce", "pa", "balance", "agreement", "tokens_per_s", "eval_loss", "kd")

    def __init__(self, out: Path, enabled: bool, step: int = 0):
        """Logs of a run now at ``step``: rows of later steps (a branch abandoned by --resume-tag or a crash, a run
        started again with --restart) are dropped, so every step has one row, from the branch the model is on."""
        self.enabled = enabled
        self.files = contextlib.ExitStack()
        if not enabled:
            return
        drop_rows_after(out / METRICS_FILE, step, csv_steps)
        drop_rows_after(out / EXPERT_LOAD_FILE, step, jsonl_steps)
        # No rows (a new run, or one started again): a fresh file with today's header.
        new = not (out / METRICS_FILE).is_file() or len((out / METRICS_FILE).read_text().splitlines()) <= 1
        self.csv_file = self.files.enter_context(open(out / METRICS_FILE, "w" if new else "a", newline=""))
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.FIELDS)
        if new:
            self.csv.writeheader()
        self.load_file = self.files.enter_context(open(out / EXPERT_LOAD_FILE, "a"))
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of steps > ``step`` that earlier writers logged.
            self.tb = self.files.enter_context(SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=step + 1))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            self.tb = None

    def write(self, row: dict, counts: torch.Tensor | None) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.csv_file.flush()
        if counts is not None:
            self.load_file.write(json.dumps({"step": row["step"], "counts": counts.long().tolist()}) + "\n")
            self.load_file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        self.files.close()


def csv_steps(lines: list[str]) -> list[float | None]:
    """The step of each line of metrics.csv (None: the header, or a line that names none)."""
    rows = list(csv.reader(lines))
    col = rows[0].index("step") if rows and "step" in rows[0] else None
    return [None if i == 0 or col is None or len(row) <= col else _number(row[col]) for i, row in enumerate(rows)]


def jsonl_steps(lines: list[str]) -> list[float | None]:
    def step(line: str) -> float | None:
        try:
            return _number(json.loads(line).get("step"))
        except (ValueError, AttributeError):
            return None
    return [step(line) for line in lines]


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def drop_rows_after(path: Path, step: int, steps_of) -> None:
    """Rewrite ``path`` (one row per line) without the rows whose step is > ``step``; lines without a step stay.
    The file is replaced in one rename, and only when a row goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line, at in zip(lines, steps_of(lines)) if at is None or at <= step]
    if len(keep) == len(lines):
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    log.warning("%s: dropped %d rows of steps after %d (the run goes on from step %d)", path.name,
                len(lines) - len(keep), step, step)


def expert_lr(engine) -> float:
    """Current learning rate of the experts (the routers' may differ: --router-lr)."""
    groups = engine.optimizer.param_groups
    return next((g["lr"] for g in groups if g.get("moe")), groups[0]["lr"])


class Preempted(Exception):
    """A preemption signal arrived: every rank saved a checkpoint; the job exits with ``exit_code``."""

    def __init__(self, exit_code: int, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; exit {exit_code} (requeue, then --resume)")
        self.exit_code = exit_code


def loop(run: Run, preemption: Preemption | None = None) -> dict:
    """Steps until --steps (or --stop-after); on a preemption signal (any rank), every rank finishes
    its step, the checkpoint is saved and :class:`Preempted` is raised."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    metrics = MetricsLog(Path(cfg.out), run.rank == 0, run.step)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", disable=run.rank != 0 or not cfg.progress,
               dynamic_ncols=True)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    last = {}
    steps_here, stop, first_nonfinite = 0, False, None
    with contextlib.closing(bar), contextlib.closing(metrics):
        while run.step < run.total_steps:
            started = time.perf_counter()
            totals = train_step(run)
            if cfg.balance_kind == "bias":
                rebalance(run, totals["expert_counts"])
            steps_here += 1
            final = run.step == run.total_steps or steps_here == cfg.stop_after
            # Once per step, on every rank: one rank's signal stops all of them at this same step.
            exit_code = agree_max(preemption.exit_code if preemption is not None else 0)
            stop = exit_code != 0 and not final
            # Every step: the all-reduced loss is the same number on every rank, so all stop at the same step.
            reduced = reduce_metrics(totals, run.world)
            diverged = not math.isfinite(reduced["loss"])
            if run.step % cfg.log_every == 0 or final or diverged:
                row = {"step": run.step, "tokens": run.step * tokens_per_step, "lr": expert_lr(run.engine),
                       **{k: v for k, v in reduced.items() if k != "expert_counts"},
                       "tokens_per_s": tokens_per_step / (time.perf_counter() - started)}
                if ((cfg.eval_every and run.step % cfg.eval_every == 0) or final) and not diverged:
                    row["eval_loss"] = evaluate(run)
                metrics.write(row, reduced["expert_counts"])
                last = row
                bar.set_postfix(loss=f"{row['loss']:.4f}", pa=f"{row['pa']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            first_nonfinite = nonfinite_streak(run, reduced["loss"], first_nonfinite, final or stop)
            if diverged:  # a non-finite step is never saved: the last checkpoint stays the latest
                continue
            if (cfg.save_every and run.step % cfg.save_every == 0) or final or stop:
                save(run)
            if steps_here == cfg.stop_after or stop:
                break
    if stop:
        raise Preempted(exit_code, run.step)
    return last


def nonfinite_streak(run: Run, loss: float, first: int | None, ending: bool) -> int | None:
    """The first step of the streak of non-finite losses that ``loss`` (this step's, over all ranks) ends or extends
    (None: it is finite). Raises the divergence error when the streak reaches --nonfinite-steps, or the run ends in
    one."""
    if math.isfinite(loss):
        return None
    first = first or run.step
    if run.step - first + 1 >= run.cfg.nonfinite_steps or ending:
        since = ", and at every step since" if run.step > first else ""
        raise UserError(divergence_message(run, f"the training loss (mean over the {run.world} ranks) is {loss} at "
                                                f"step {first}{since}"))
    log.warning("step %d: the training loss is %s (DeepSpeed skips this update); the run stops if it stays so for "
                "%d steps", run.step, loss, run.cfg.nonfinite_steps)
    return first


def train(cfg: TrainConfig) -> dict:
    # SIGTERM/SIGUSR1/SIGINT only set a flag from here on: the loop saves and exits at the end of a step.
    # The lock on --out (rank 0) is released on the way out, however the run ends.
    with Preemption() as preemption, contextlib.ExitStack() as held:
        run = setup(cfg, held)
        last = loop(run, preemption)
    if run.rank == 0:
        log.info("done: step %d, %s", run.step, json.dumps({k: v for k, v in last.items() if v is not None}))
    return last


def check(cfg: TrainConfig) -> int:
    """``train --check``: every validation ``train`` does before its process group, and nothing else."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = cfg.validate(read_config(cfg.model), load_ds_config(cfg), world, rank=0)
    print(f"train --check: OK ({world} process(es), ep_size {resolved.ep_size}, micro-batch "
          f"{resolved.micro_batch_size}, global batch {resolved.global_batch_size})")
    return 0


def run_command(cfg: TrainConfig) -> int:
    import sys
    import traceback

    from factorllm_ds.distributed import hard_exit, started

    if cfg.check:
        return check(cfg)
    try:
        train(cfg)
    except Preempted as err:
        log.warning("%s", err)
        hard_exit(err.exit_code)
    except BaseException as err:
        if not started():
            raise  # no process group yet: the CLI reports it and exits normally
        # A normal interpreter exit could abort in gloo's teardown or, under mpirun, hang the job.
        if isinstance(err, UserError):
            print(f"factorllm-ds train: error: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
        hard_exit(2 if isinstance(err, UserError) else 130 if isinstance(err, KeyboardInterrupt) else 1)
    hard_exit(0)
