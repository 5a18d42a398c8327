"""Where export (and eval) read a FactorLLM model from: a converted folder or a DeepSpeed training run.

A run's ``checkpoints/TAG/`` holds ``mp_rank_00_model_states.pt`` (non-expert weights and
routers, rank 0's copy) and one ``layer_{L}_expert_{G}_mp_rank_00_model_states.pt`` per
MoE layer L and *global* expert id G, whatever ep_size wrote them. DeepSpeed's
``zero_to_fp32`` does not understand the expert files; :class:`DeepSpeedRunSource` does, one
layer at a time (the big non-expert file is memory-mapped, not loaded).

Checkpoint files are read with ``safe_load.safe_torch_load`` (tensors and plain containers only:
nothing in a run folder is executed), after the tag folder has been checked against the
``checksums.json`` that train wrote when it saved it (``checkpoints.intact_tag``).

Part of the export stage; it reads files only through the shared layers (``layout.py``, ``checkpoints.py``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from factorllm_ds import keys
from factorllm_ds.checkpoints import checkpoint_to_load, intact_tag, read_run_manifest
from factorllm_ds.errors import UserError
from factorllm_ds.finite import check_finite
from factorllm_ds.hf_io import CheckpointReader, TensorInfo, check_config_shapes, read_config
from factorllm_ds.layout import CHECKPOINT_DIR, EXPERT_FILE, MODEL_STATES, PARTITION_FILE, list_tags
from factorllm_ds.safe_load import MODEL_STATE_GLOBALS, safe_torch_load
from factorllm_ds.shape import MoEShape


class ExportSource:
    """Where an export reads a FactorLLM model from. Subclasses fill in the attributes and the tensor methods.

    Attributes:
        description: names the source in messages and the manifest, e.g. ``--model /x``.
        config: the FactorLLM ``config.json`` as a dict (``model_type: factorllm``,
            ``text_config`` with the base family's ``model_type``, ``num_experts``, ...).
        infos: every tensor of the model, experts included, by name: shape and dtype (no data read).
        shape: the model's MoE shape (E, k, R, S, H, L, the routing), built once when the source opens.
        side_dir: a folder whose tokenizer / generation files are copied, or None.
        partition_file: the ``factorllm_partition.safetensors`` written by convert, or None.

    Tensor names are the FactorLLM HF names (``keys.py``): ``model.layers.{L}.mlp.router.weight``,
    ``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``, and the base model's own.
    """

    description: str = "?"
    config: dict
    infos: dict[str, TensorInfo]
    shape: MoEShape
    side_dir: Path | None = None
    partition_file: Path | None = None

    def names(self) -> list[str]:
        """Every tensor name of the model, experts included."""
        return list(self.infos)

    @property
    def text(self) -> dict:
        """The base model's config (the FactorLLM ``text_config``)."""
        return dict(self.config.get("text_config") or {})

    @property
    def base_type(self) -> str:
        """The base family's ``model_type`` (llama, qwen2, ...)."""
        return self.text.get("model_type", "?")

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor (no data read)."""
        return self.infos[name]

    def shared_tensor(self, name: str) -> torch.Tensor:
        """One non-expert tensor (embeddings, attention, norms, routers, lm_head)."""
        raise NotImplementedError

    def expert_tensors(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Layer ``layer``'s experts in global expert order: (gate [R, H], up [R, H], down [H, R])."""
        raise NotImplementedError


def source_shape(config: dict, names) -> MoEShape:
    """The MoE shape of a FactorLLM model; a router bias among its tensors ``names`` wins over the config."""
    bias = bool(config.get("router_bias", False)) or any(n.endswith("mlp.router.bias") for n in names)
    return replace(MoEShape.of_config(config), router_bias=bias)


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
        self.shape = source_shape(self.config, self.infos)
        self.side_dir = self.moe_dir
        partition = self.moe_dir / PARTITION_FILE
        self.partition_file = partition if partition.is_file() else None

    def shared_tensor(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def expert_tensors(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [tuple(self.reader.get(keys.expert_key(p, layer, e)) for p in keys.MLP_PARTS)
                for e in range(self.shape.num_experts)]


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
        own = MoEShape.of_config(self.config)
        layers, experts = own.num_layers, own.num_experts  # the run's checkpoint must hold a file per (layer, expert)
        expert_files = [EXPERT_FILE.format(layer=L, expert=e) for L in range(layers) for e in range(experts)]
        missing = [name for name in expert_files if not (self.ckpt_dir / name).is_file()]
        if missing:
            raise UserError(f"--run {run_dir}: checkpoint {tag} lacks {len(missing)} expert files (first: "
                            f"{missing[0]}); the save was interrupted or files were removed. Use another --tag.")
        states = safe_torch_load(self.ckpt_dir / MODEL_STATES, "--run", MODEL_STATE_GLOBALS)
        self.shared = fold_selection_bias({ds_to_hf_name(k): v for k, v in states["module"].items()}, self.description)
        self.shape = source_shape(self.config, self.shared)  # the router bias: the checkpoint's own
        # NaN/Inf refused as convert refuses them: a diverged run's checkpoint must not become a model silently.
        others = [t for t in tags if t != tag]
        self._nonfinite_fix = None if allow_nonfinite else (
            "The run diverged before this checkpoint was saved, or the file is damaged: export an earlier one with "
            f"--tag TAG ({'other checkpoints: ' + ', '.join(others) if others else 'the run has no other checkpoint'})"
            ", or pass --allow-nonfinite to export it anyway.")
        for name, tensor in self.shared.items():
            self._check_finite(self.ckpt_dir / MODEL_STATES, name, tensor)
        self.expert_dtype = next(iter(self._expert_file(0, 0).values())).dtype
        self.infos = {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self.shared.items()}
        self.infos |= {info.name: info for info in (
            TensorInfo(keys.expert_key(part, layer, e), shape, self.expert_dtype)
            for layer in range(layers) for e in range(experts) for part, shape in self.shape.expert_shapes().items())}
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
        for e in range(self.shape.num_experts):
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
