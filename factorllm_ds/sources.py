"""Where export (and eval) read a FactorLLM model from: a converted folder or a DeepSpeed training run.

A run's ``checkpoints/TAG/`` holds ``mp_rank_00_model_states.pt`` (non-expert weights and
routers, rank 0's copy) and one ``layer_{L}_expert_{G}_mp_rank_00_model_states.pt`` per
MoE layer L and *global* expert id G, whatever ep_size wrote them. DeepSpeed's
``zero_to_fp32`` does not understand the expert files; :class:`DeepSpeedRunSource` does, one
layer at a time (the big non-expert file is memory-mapped, not loaded).

Checkpoint files are read with ``safety.safe_torch_load`` (tensors and plain containers only:
nothing in a run folder is executed), after the tag folder has been checked against the
``checksums.json`` that train wrote when it saved it (:func:`intact_tag`).

This module reads files only through the artifact layout (``layout.py``); it imports no stage.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch

from factorllm_ds import keys
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import CheckpointReader, TensorInfo, check_config_shapes, read_config
from factorllm_ds.layout import (CHECKPOINT_DIR, EXPERT_FILE, LATEST_FILE, MODEL_STATES, PARTITION_FILE, RUN_MANIFEST,
                                 list_tags)
from factorllm_ds.safety import (MODEL_STATE_GLOBALS, OPTIM_STATE_GLOBALS, check_finite, newest_intact, safe_torch_load,
                                 verify_checksums)


class ExportSource:
    """Where an export reads a FactorLLM model from. Subclasses fill in the attributes and the tensor methods.

    Attributes:
        description: names the source in messages and the manifest, e.g. ``--model /x``.
        config: the FactorLLM ``config.json`` as a dict (``model_type: factorllm``,
            ``text_config`` with the base family's ``model_type``, ``num_experts``, ...).
        infos: every tensor of the model, experts included, by name: shape and dtype (no data read).
        side_dir: a folder whose tokenizer / generation files are copied, or None.
        partition_file: the ``factorllm_partition.safetensors`` written by convert, or None.

    Tensor names are the FactorLLM HF names (``keys.py``): ``model.layers.{L}.mlp.router.weight``,
    ``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``, and the base model's own.
    """

    description: str = "?"
    config: dict
    infos: dict[str, TensorInfo]
    side_dir: Path | None = None
    partition_file: Path | None = None

    def names(self) -> list[str]:
        """Every tensor name of the model, experts included."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor (no data read)."""
        return self.infos[name]

    def shared_tensor(self, name: str) -> torch.Tensor:
        """One non-expert tensor (embeddings, attention, norms, routers, lm_head)."""
        raise NotImplementedError

    def expert_tensors(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Layer ``layer``'s experts in global expert order: (gate [I/E, H], up [I/E, H], down [H, I/E])."""
        raise NotImplementedError


class FolderSource(ExportSource):
    """A FactorLLM Hugging Face folder (made by convert, or by a previous export)."""

    def __init__(self, moe_dir: Path, flag: str = "--model", allow_nonfinite: bool = False):
        self.moe_dir = Path(moe_dir)
        self.description = f"{flag} {self.moe_dir}"
        self.config = read_config(self.moe_dir, flag)
        if self.config.get("model_type") != "factorllm":
            raise UserError(f"{flag} {self.moe_dir}: not a FactorLLM checkpoint (model_type "
                            f"{self.config.get('model_type')!r}). Convert a dense model first: "
                            "factorllm-ds convert --model DENSE --out MOE_DIR")
        # Every tensor read is checked for NaN/Inf (CheckpointReader.get), as convert checks its input.
        self.reader = CheckpointReader(self.moe_dir, flag, allow_nonfinite=allow_nonfinite)
        self.reader.check_config(self.config)
        self.infos = self.reader.infos
        self.side_dir = self.moe_dir
        partition = self.moe_dir / PARTITION_FILE
        self.partition_file = partition if partition.is_file() else None

    def shared_tensor(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def expert_tensors(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [tuple(self.reader.get(keys.expert_key(p, layer, e)) for p in keys.MLP_PARTS)
                for e in range(int(self.config["num_experts"]))]


DS_EXPERT_KEY = "model.layers.{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{expert}.{part}_proj.weight"
_DS_ROUTER = re.compile(r"(model\.layers\.\d+\.mlp\.)moe\.deepspeed_moe\.gate\.router\.(weight|bias)")


def ds_to_hf_name(name: str) -> str:
    """DeepSpeed module key -> FactorLLM HF key (only the router is renamed)."""
    return _DS_ROUTER.sub(r"\1router.\2", name)


_SELECTION_BIAS = re.compile(r"(model\.layers\.\d+\.mlp\.)moe\.deepspeed_moe\.gate\.selection_bias")


def fold_selection_bias(states: dict[str, torch.Tensor], description: str) -> dict[str, torch.Tensor]:
    """``--balance-kind bias`` keeps a per-expert selection bias beside the router; under hard routing (the only
    routing it trains with) adding it to the router bias gives the same top-k, so the export holds a plain router."""
    out = {}
    for name, tensor in states.items():
        m = _SELECTION_BIAS.fullmatch(name)
        if m is None:
            out.setdefault(name, tensor)
            continue
        if not bool(tensor.any()):
            continue
        bias_name = m.group(1) + "router.bias"
        if bias_name not in states:
            raise UserError(f"{description}: {name} is set but the router has no bias to fold it into")
        out[bias_name] = (states[bias_name].float() + tensor.float()).to(states[bias_name].dtype)
    return out


def intact_tag(run_dir: Path, tag: str, flag: str, retry: str, sizes_only: bool = False) -> None:
    """Raise :class:`UserError` unless checkpoint ``tag`` of ``run_dir`` matches its checksum manifest.

    The message names the first bad file and the newest intact tag (``retry`` formats how to use it,
    e.g. ``"--tag {tag}"``). Reads every byte of the tag folder once (``sizes_only``: only their sizes).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    problems = verify_checksums(root / tag, sizes_only=sizes_only)
    if not problems:
        return
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserError(f"{flag} {run_dir}: checkpoint {tag} is not intact: {problems[0]}{more}; "
                    f"{_intact_advice(run_dir, [tag], retry, sizes_only)}.")


def _intact_advice(run_dir: Path, bad: list[str], retry: str, sizes_only: bool = False) -> str:
    """Which checkpoint to use instead of the ``bad`` tags. The one named is verified byte by byte, as the retry will
    verify it: a size-only check would name a tag whose bytes changed, whose own error then names another (a loop)."""
    if sizes_only:  # a process that compares sizes only must not vouch for a tag
        return "rank 0, which reads every byte, names the newest intact checkpoint"
    others = [t for t in reversed(list_tags(run_dir)) if t not in bad]
    good = newest_intact(Path(run_dir) / CHECKPOINT_DIR, others) if others else None
    return (f"the newest intact checkpoint is {good}: use {retry.format(tag=good)}" if good else
            "no other checkpoint of this run is intact")


# The keys of run.json that commands read, with their JSON types.
RUN_MANIFEST_TYPES = {"model": str, "model_fingerprint": str, "ep_size": int, "world_size": int, "total_steps": int,
                      "settings": dict}


def read_run_manifest(run_dir: Path, flag: str, need: tuple[str, ...] = ("model",)) -> dict:
    """``run_dir/run.json`` (written by train when the run starts) as a dict holding the keys ``need``; one
    :class:`UserError` naming the file when it is missing, not JSON or incomplete."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise UserError(f"{flag} {run_dir}: no {RUN_MANIFEST}; is this a `factorllm-ds train` --out folder?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"is not readable JSON ({type(err).__name__}: {err})"
    else:
        if not isinstance(manifest, dict):
            problem = f"holds a JSON {type(manifest).__name__}, not the object train writes"
        elif missing := [k for k in need if k not in manifest]:
            problem = f"lacks {', '.join(missing)}"
        elif wrong := [f"{k} {manifest[k]!r} is not a {kind.__name__}" for k, kind in RUN_MANIFEST_TYPES.items()
                       if k in manifest and not isinstance(manifest[k], kind)]:
            problem = f"is damaged: {'; '.join(wrong)}"
        else:
            return manifest
    raise UserError(f"{flag} {run_dir}: {path} {problem}. train writes it when a run starts (the model, the layout, "
                    "the settings); put back an intact copy of it, or train into a new --out")


def checkpoint_to_load(run_dir: Path, tag: str | None, tag_flag: str, retry: str) -> str:
    """The tag to load from ``run_dir`` (which holds at least one): ``tag`` when given (with ``tag_flag``), else the
    one ``checkpoints/latest`` names, else the newest. A missing tag is blamed on what chose it: the flag or the file
    (``retry`` formats the flag that picks another, as for :func:`intact_tag`)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    tags = list_tags(run_dir)
    if tag is not None:
        if tag not in tags:
            raise UserError(f"{tag_flag} {tag}: no such checkpoint in {root}; available: {', '.join(tags) or 'none'}")
        return tag
    latest = root / LATEST_FILE
    if not latest.exists():
        return tags[-1]
    try:
        named = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        named, problem = None, f"cannot be read ({type(err).__name__}: {err})"
    else:
        problem = f"names {named!r}, which is not a checkpoint in {root} (available: {', '.join(tags)})"
    if named in tags:
        return named
    raise UserError(f"{latest} {problem}: the save it points to did not finish, its folder was removed or the file "
                    f"was damaged. Fix: "
                    f"{_intact_advice(run_dir, [], retry)}, or write that tag into {latest}.")


# What DeepSpeed's checkpoint files may hold besides tensors and containers (safety.py lists why).
CHECKPOINT_GLOBALS = MODEL_STATE_GLOBALS + OPTIM_STATE_GLOBALS


def check_loads_safely(run_dir: Path, tag: str, flag: str) -> None:
    """Unpickle every ``.pt`` file of checkpoint ``tag`` as :func:`safe_torch_load` does (``weights_only`` and the
    DeepSpeed allow-list), tensors memory-mapped and not read: a file that would run code, or needs a type outside the
    list, raises :class:`UserError` naming it before DeepSpeed opens any file. Checksums do not make a file trusted:
    whoever can write the folder can rewrite them."""
    for path in sorted((Path(run_dir) / CHECKPOINT_DIR / tag).rglob("*.pt")):
        # mmap needs torch's zip format (DeepSpeed's default); a legacy-format file is read whole.
        safe_torch_load(path, flag, CHECKPOINT_GLOBALS, mmap=zipfile.is_zipfile(path))


class DeepSpeedRunSource(ExportSource):
    def __init__(self, run_dir: Path, tag: str | None = None, allow_nonfinite: bool = False):
        run_dir = Path(run_dir)
        manifest = read_run_manifest(run_dir, "--run")
        root = run_dir / CHECKPOINT_DIR
        tags = list_tags(run_dir)
        if not tags:
            raise UserError(f"--run {run_dir}: no checkpoint saved yet (nothing in {root}); train with --save-every "
                            "or wait for the end of the run")
        tag = checkpoint_to_load(run_dir, tag, "--tag", "--tag {tag}")
        # Every byte is checked against the manifest train wrote after the save, before any is unpickled.
        intact_tag(run_dir, tag, "--run", "--tag {tag}")
        self.ckpt_dir = root / tag
        self.tag = tag
        self.model_dir = Path(manifest["model"])
        self.description = f"--run {run_dir} (tag {tag})"
        self.config = read_config(self.model_dir, "the run's --model")
        # The oracle router of the export picks experts as the run's PA prior did.
        prior_target = manifest.get("settings", {}).get("prior_target")
        if prior_target:
            self.config["prior_target"] = prior_target
        self.side_dir = self.model_dir
        partition = self.model_dir / PARTITION_FILE
        self.partition_file = partition if partition.is_file() else None
        self.num_experts = int(self.config["num_experts"])
        self.num_layers = int(self.config["text_config"]["num_hidden_layers"])
        expert_files = [EXPERT_FILE.format(layer=L, expert=e) for L in range(self.num_layers)
                        for e in range(self.num_experts)]
        missing = [name for name in expert_files if not (self.ckpt_dir / name).is_file()]
        if missing:
            raise UserError(f"--run {run_dir}: checkpoint {tag} lacks {len(missing)} expert files (first: "
                            f"{missing[0]}); the save was interrupted or files were removed. Use another --tag.")
        states = safe_torch_load(self.ckpt_dir / MODEL_STATES, "--run", MODEL_STATE_GLOBALS)
        self.step = states.get("step")
        self.shared = fold_selection_bias({ds_to_hf_name(k): v for k, v in states["module"].items()}, self.description)
        # NaN/Inf refused as convert refuses them: a diverged run's checkpoint must not become a model silently.
        others = [t for t in tags if t != tag]
        self._nonfinite_fix = None if allow_nonfinite else (
            "The run diverged before this checkpoint was saved, or the file is damaged: export an earlier one with "
            f"--tag TAG ({'other checkpoints: ' + ', '.join(others) if others else 'the run has no other checkpoint'})"
            ", or pass --allow-nonfinite to export it anyway.")
        for name, tensor in self.shared.items():
            self._check_finite(self.ckpt_dir / MODEL_STATES, name, tensor)
        self.expert_dtype = next(iter(self._expert_file(0, 0).values())).dtype
        size = int(self.config["expert_intermediate_size"])
        hidden = int(self.config["text_config"]["hidden_size"])
        self.infos = {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self.shared.items()}
        for layer in range(self.num_layers):
            for e in range(self.num_experts):
                for part, shape in (("gate", (size, hidden)), ("up", (size, hidden)), ("down", (hidden, size))):
                    name = keys.expert_key(part, layer, e)
                    self.infos[name] = TensorInfo(name, shape, self.expert_dtype)
        check_config_shapes(self.config, self.infos, self.model_dir / "config.json", self.description)

    def _check_finite(self, path: Path, name: str, tensor: torch.Tensor) -> None:
        if self._nonfinite_fix is not None:
            check_finite(f"--run {path}: tensor {name}", tensor, self._nonfinite_fix)

    def _expert_file(self, layer: int, expert: int) -> dict:
        # Never a plain torch.load: a run folder may come from anyone, and unpickling runs the file's code.
        return safe_torch_load(self.ckpt_dir / EXPERT_FILE.format(layer=layer, expert=expert), "--run",
                               MODEL_STATE_GLOBALS)

    def shared_tensor(self, name: str) -> torch.Tensor:
        return self.shared[name].clone()

    def expert_tensors(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = []
        for e in range(self.num_experts):
            state = self._expert_file(layer, e)
            try:
                out.append(tuple(state[DS_EXPERT_KEY.format(layer=layer, expert=e, part=p)].clone()
                                 for p in keys.MLP_PARTS))
            except KeyError as err:
                raise UserError(f"--run: {EXPERT_FILE.format(layer=layer, expert=e)} in {self.ckpt_dir} lacks "
                                f"{err}; it was not written by factorllm-ds train") from err
            for part, tensor in zip(keys.MLP_PARTS, out[-1]):
                self._check_finite(self.ckpt_dir / EXPERT_FILE.format(layer=layer, expert=e),
                                   keys.expert_key(part, layer, e), tensor)
        return out


def open_source(model: Path | None, run: Path | None, tag: str | None = None,
                allow_nonfinite: bool = False) -> ExportSource:
    """The source a command names: ``--model`` (a converted folder) or ``--run`` (a training run); every tensor
    it hands out is checked for NaN/Inf unless ``allow_nonfinite``."""
    if model is not None:
        return FolderSource(model, allow_nonfinite=allow_nonfinite)
    return DeepSpeedRunSource(run, tag, allow_nonfinite=allow_nonfinite)
