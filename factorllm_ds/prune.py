"""prune: a dense HF checkpoint -> the same model with each FFN cut to its most important neurons (static pruning).

The equal-compute baseline every quality table of this project carries (docs/method.md §6): at an active fraction
F, the MoE runs F of each FFN's neurons per token, chosen per token by its router; static pruning keeps the same
number of neurons, the same ones on every token. It is also what to ship where the MoE's routing does not pay
(docs/method.md §5, "The frontier after training"): the output is a plain dense checkpoint of the source's own
architecture, with ``intermediate_size`` = the neurons kept, which transformers, vLLM and llama.cpp load as they
load the source.

It streams like ``convert``: tensors outside the MLPs are copied file to file, one layer's MLP is held at a time,
and the calibration text runs through the layers already pruned (``calibration.CalibrationRunner``), so each layer's
choice and refit see the inputs that layer will see. Per layer: the importance of every neuron on the calibration
tokens (``convert --importance``), the top ones kept, and with ``--refit-down`` the kept neurons' down projection
refitted by ridge regression to the dense FFN's output (``structure.refit_down``, the refit ``convert`` gives the
MoE; docs/method.md §4).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from factorllm_ds import keys, structure
from factorllm_ds.calibration import CalibrationRunner
from factorllm_ds.config import (
    CALIB_SEQ_LEN,
    CALIB_TOKENS,
    MAX_SHARD_SIZE,
    REFIT_DOWN_RIDGE,
    arg,
    calib_files,
    calibration_problems,
    dense_model_problems,
    fail_if,
    jsonable,
    output_problems,
    parse_size,
    resolved_device,
)
from factorllm_ds.convert import check_mlp_tensors, open_dense_source
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import (
    FolderWriter,
    TensorInfo,
    copy_side_files,
    read_config,
    tokenizer_dir,
)
from factorllm_ds.keys import SUPPORTED_FAMILIES
from factorllm_ds.structure import IMPORTANCE_KINDS


def parse_keep(spec: str, intermediate_size: int) -> int:
    """Neurons kept per FFN from ``"0.5"`` (a fraction of I, in (0, 1]) or ``"768"`` (a count, 1..I)."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a fraction of the FFN like 0.5 or a neuron count like 768") from None
    if any(c in text for c in ".eE"):  # a fraction
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError("a fraction must be in (0, 1]")
        count = round(value * intermediate_size)
    elif value != int(value):
        raise ValueError("a count must be a whole number")
    else:
        count = int(value)
    if not 1 <= count <= intermediate_size:
        raise ValueError(f"{count} neurons; must be between 1 and {intermediate_size}")
    return count


@dataclass
class PruneConfig:
    """factorllm-ds prune: a dense HF checkpoint folder -> the same architecture with smaller FFNs (static pruning)."""

    model: Path = arg("dense Hugging Face model folder (safetensors)", default=None, required=True)
    out: Path = arg("output folder for the pruned dense checkpoint (must not exist, unless --overwrite)",
                    default=None, required=True)
    keep: str = arg("neurons each FFN keeps: a fraction of its intermediate size (0.5) or a count (768); the same "
                    "fraction as a MoE's active share makes the MoE's equal-compute baseline", default=None,
                    required=True)
    calib_data: list[Path] = arg("calibration text (.txt/.jsonl/.json/.parquet/.csv) on which each neuron's "
                                 "importance and the refit are measured; several files: an equal share of "
                                 "--calib-tokens from each (as convert)", default=None, required=True)
    calib_tokens: int = arg("calibration tokens", default=CALIB_TOKENS)
    calib_seq_len: int = arg("calibration sequence length", default=CALIB_SEQ_LEN)
    importance: str = arg("which neurons are kept: contribution (mean |a_i| * ||W_down[:, i]||) or activation_rate "
                          "(share of tokens where the neuron is among the top 10%% of activations)",
                          choices=IMPORTANCE_KINDS, default=IMPORTANCE_KINDS[0])
    refit_down: float = arg("ridge strength d of the down-projection refit of the kept neurons to the dense FFN's "
                            "output on the calibration tokens (convert's --refit-down); 0 keeps exact slices",
                            default=REFIT_DOWN_RIDGE)
    max_shard_size: str = arg("largest output shard, e.g. 2GB or 500MB", default=MAX_SHARD_SIZE)
    overwrite: bool = arg("replace --out if it exists (only a folder this tool wrote)", default=False)
    tokenizer: Path | None = arg("folder with the tokenizer files, when --model has none; they are copied into --out",
                                 default=None)
    allow_nonfinite: bool = arg("prune even if a weight holds NaN or Inf (by default the first one is an error)",
                                default=False)
    device: str = arg("where the calibration forward, importance and refit run, one layer at a time: cpu, cuda, "
                      "cuda:N or auto (as convert --device)", default="cpu")
    num_keep: int = dataclasses.field(default=0)  # resolved by validate(); not a flag

    def validate(self, dense_config: dict) -> PruneConfig:
        """Every problem at once (one UserError naming its flags); returns the resolved copy prune runs with."""
        problems = dense_model_problems(dense_config, self.model)
        inter, num_keep = dense_config.get("intermediate_size"), 0
        if isinstance(inter, int):
            try:
                num_keep = parse_keep(self.keep, inter)
            except ValueError as err:
                problems.append(f"--keep {self.keep}: {err} (intermediate_size {inter} in {self.model}/config.json)")
        files = calib_files(self.calib_data) or []
        problems += calibration_problems(files, self.calib_tokens, self.calib_seq_len)
        if not (math.isfinite(self.refit_down) and self.refit_down >= 0):
            problems.append(f"--refit-down {self.refit_down}: must be a finite number >= 0 (0 keeps exact slices)")
        problems += output_problems(self.out, self.model, self.overwrite, self.max_shard_size)
        device = resolved_device(self.device, problems)
        fail_if(problems, "prune: bad arguments")
        return dataclasses.replace(self, num_keep=num_keep, calib_data=files, device=device)


def pruned_plan(dense: dict[str, TensorInfo], num_layers: int, num_keep: int) -> list[TensorInfo]:
    """Every output tensor in the order prune writes it: the source's, with each MLP cut to ``num_keep`` neurons."""
    layers: dict[int, list[str]] = {i: [] for i in range(num_layers)}
    for name in dense:
        role, layer = keys.classify_dense_key(name)  # an unknown name: KeyError, which prune() reports
        if role == "layer":
            layers[layer].append(name)
    plan = [dense[n] for n in keys.GLOBAL_PASSTHROUGH[:1] if n in dense]
    for layer in range(num_layers):
        plan += [dense[n] for n in sorted(layers[layer])]
        for part in keys.MLP_PARTS:
            info = dense[keys.dense_mlp_key(part, layer)]
            shape = (info.shape[0], num_keep) if part == "down" else (num_keep, info.shape[1])
            plan.append(TensorInfo(info.name, shape, info.dtype))
    return plan + [dense[n] for n in keys.GLOBAL_PASSTHROUGH[1:] if n in dense]


@torch.no_grad()
def prune_layer(cfg: PruneConfig, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                calib: CalibrationRunner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned (gate, up, down) of one layer on the CPU, in the checkpoint's dtype; the calibration stream then
    continues through the pruned layer."""
    device = torch.device(cfg.device)
    acts_TI = calib.mlp_activations()
    down_dev = down.to(device)
    importance_I = structure.neuron_importance(acts_TI, down_dev, cfg.importance)
    kept = torch.topk(importance_I.float(), cfg.num_keep, sorted=False).indices.sort().values
    acts_TK, new_down = acts_TI[:, kept], down_dev[:, kept]
    if cfg.refit_down:
        new_down = structure.refit_down(acts_TK, torch.ones_like(acts_TK, dtype=torch.float32), new_down,
                                        calib.mlp_output(), cfg.refit_down)
    new_down = new_down.to(down.dtype)
    calib.replace_mlp_output(acts_TK.float() @ new_down.float().T)
    kept = kept.cpu()
    return gate[kept].contiguous(), up[kept].contiguous(), new_down.cpu().contiguous()


def pruned_config(dense_config: dict, num_keep: int) -> dict:
    return {**dense_config, "intermediate_size": num_keep}


def prune(cfg: PruneConfig, progress: bool = True) -> Path:
    dense_config, reader, cfg, inputs = open_dense_source(cfg)
    tokenizer_dir(cfg.model, cfg.tokenizer)  # the error names the folder and suggests --tokenizer
    num_layers = dense_config["num_hidden_layers"]
    check_mlp_tensors(reader, num_layers, cfg.model)
    try:
        plan = pruned_plan(reader.infos, num_layers, cfg.num_keep)
    except KeyError as err:
        raise UserError(f"--model {cfg.model}: unexpected tensor {err.args[0]}; supported: "
                        f"{', '.join(SUPPORTED_FAMILIES.values())} checkpoints in Hugging Face naming.") from None
    calib = CalibrationRunner(reader, dense_config, cfg)
    with FolderWriter(cfg.out, plan, parse_size(cfg.max_shard_size), command="prune", overwrite=cfg.overwrite,
                      progress=progress, inputs=inputs) as folder:
        folder.copy(reader, "model.embed_tokens.weight")
        calib.start()
        for layer in range(num_layers):
            for info in plan:
                if keys.layer_of(info.name) == layer and ".mlp." not in info.name:
                    folder.copy(reader, info.name)
            calib.run_layer(layer)
            gate, up, down = (reader.get(keys.dense_mlp_key(p, layer)) for p in keys.MLP_PARTS)
            pieces = prune_layer(cfg, gate, up, down, calib)
            for part, piece in zip(keys.MLP_PARTS, pieces):
                folder.write(keys.dense_mlp_key(part, layer), piece)
            del gate, up, down, pieces
        for name in keys.GLOBAL_PASSTHROUGH[1:]:
            if name in reader.infos:
                folder.copy(reader, name)
        (folder.path / "config.json").write_text(json.dumps(pruned_config(dense_config, cfg.num_keep), indent=2)
                                                  + "\n")
        side = copy_side_files(cfg.model, folder.path)
        if cfg.tokenizer is not None:
            side += copy_side_files(cfg.tokenizer, folder.path)
        folder.manifest.update(source_model=str(cfg.model), copied_files=side,
                               settings={k: jsonable(v) for k, v in asdict(cfg).items()},
                               bytes_read=reader.total_bytes)
    return Path(cfg.out)


def run_command(cfg: PruneConfig) -> int:
    out = prune(cfg)
    config = read_config(out)
    print(f"wrote {out} ({config.get('architectures', ['?'])[0]}, intermediate_size {config['intermediate_size']})")
    return 0
