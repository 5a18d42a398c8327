"""export: a FactorLLM run or folder (``sources.py``) -> one HF folder in a format of ``export_formats``.

Every check runs first; then tensors outside the MLP are copied and each layer's MLP is written
by the format, one layer's experts in memory at a time, into shards planned up front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from factorllm_ds import keys
from factorllm_ds.checkpoints import read_run_manifest
from factorllm_ds.config import MAX_SHARD_SIZE, arg, fail_if, parse_size
from factorllm_ds.errors import UserError
from factorllm_ds.export_formats import (
    FORMATS,
    GGUF_CONVERTER,
    GGUF_TYPES,
    WEIGHT_TOLERANCE,
    ExportFormat,
    ExportOptions,
    classify_moe_key,
    open_format,
)
from factorllm_ds.hf_io import FolderWriter, copy_side_files
from factorllm_ds.layout import MANIFEST_FILE, RUN_MANIFEST, read_manifest
from factorllm_ds.outputs import output_problems
from factorllm_ds.sources import ExportSource, open_source


def _write_order(source: ExportSource, target: ExportFormat) -> list[str | int]:
    """The output in write order: source tensor names (copied unchanged) and layer numbers (that
    layer's MLP, written by the format), each after the layer's copied tensors."""
    names = set(source.names())
    copied: list[list[str]] = [[] for _ in range(source.shape.num_layers)]
    for name in sorted(names):
        if classify_moe_key(name)[0] == "layer":
            copied[keys.layer_of(name)].append(name)
    return ([n for n in keys.GLOBAL_PASSTHROUGH[:1] if n in names]
            + [item for layer, layer_names in enumerate(copied) for item in (*layer_names, layer)]
            + [n for n in keys.GLOBAL_PASSTHROUGH[1:] if n in names])


def export(source: ExportSource, out: Path, fmt: str, overwrite: bool = False, max_shard_size: str = "2GB",
           progress: bool = True, inputs: dict[str, Path] | None = None,
           options: ExportOptions = ExportOptions()) -> Path:
    """Write ``source`` to ``out`` as ``fmt`` (factorllm | mixtral | dense); returns ``out``.

    Every check runs before anything is written; on any failure nothing is left at ``out``.
    """
    out = Path(out)
    target = open_format(source, fmt, options)
    order = _write_order(source, target)
    plan = [info for item in order
            for info in (target.mlp_plan(item) if isinstance(item, int) else [source.info(item)])]
    plan += target.extra_plan()
    with FolderWriter(out, plan, parse_size(max_shard_size), command="export", desc=f"export {fmt}",
                      overwrite=overwrite, progress=progress, inputs=inputs) as folder:
        for item in order:
            pairs = target.mlp_tensors(item) if isinstance(item, int) else [(item, source.shared_tensor(item))]
            for name, tensor in pairs:
                folder.write(name, tensor)
        for name, tensor in target.extra_tensors():
            folder.write(name, tensor)
        target.save_config(folder.path)
        side_dir, f = source.side_dir, source.shape
        side = copy_side_files(side_dir, folder.path) if side_dir is not None else []
        architectures = json.loads((folder.path / "config.json").read_text()).get("architectures") or ["?"]
        target.finish(folder.path)
        folder.manifest.update(
            format=fmt, architecture=",".join(architectures), source=source.description,
            moe={"base_model_type": source.base_type, "num_experts": f.num_experts, "top_k": f.top_k,
                 "routing": f.routing, "combine_scale": f.scale, "shared_expert_size": f.shared_size},
            notes=target.notes, copied_files=side,
            source_manifest=read_manifest(side_dir) if side_dir is not None else None)
    return out


@dataclass
class ExportConfig:
    """factorllm-ds export: a DeepSpeed training run or a FactorLLM folder -> one HF folder.

    --format factorllm: a FactorLLM folder (our model code inside). --format mixtral: the standard
    HF MoE class of the base family (Mixtral for LLaMA/Mistral, Qwen2-MoE, Qwen3-MoE); no shared
    expert. --format qwen2-moe: Qwen2MoeForCausalLM for any supported base, shared expert included
    (transformers, vLLM, SGLang load it without remote code). --format gguf: that folder plus
    model.gguf for llama.cpp / Ollama / LM Studio. --format dense: the base architecture with every
    expert active at weight 1. Hard routing goes to the standard classes within --weight-tolerance.
    """

    out: Path = arg("output folder (must not exist, unless --overwrite)", default=None, required=True)
    run: Path | None = arg("DeepSpeed run folder written by `factorllm-ds train` (its checkpoints)", default=None)
    tag: str | None = arg("checkpoint tag inside --run (default: the run's 'latest')", default=None)
    model: Path | None = arg("instead of --run: a FactorLLM HF folder (from convert or a previous export)",
                             default=None)
    format: str = arg("output format", choices=tuple(FORMATS), default="factorllm")
    max_shard_size: str = arg("largest output shard, e.g. 2GB or 500MB", default=MAX_SHARD_SIZE)
    overwrite: bool = arg("replace --out if it exists", default=False)
    weight_tolerance: float = arg("standard MoE formats (mixtral, qwen2-moe) of a hard-routed model: the largest "
                                  "relative error allowed on each selected expert's weight; the router is scaled "
                                  "down for it, and a smaller value leaves near-tied router scores less room "
                                  "(docs/serving.md)", default=WEIGHT_TOLERANCE)
    gguf_type: str = arg("--format gguf: the tensor type of the GGUF file", choices=GGUF_TYPES, default="f16")
    llama_cpp: Path | None = arg("--format gguf: a llama.cpp source tree whose convert_hf_to_gguf.py writes the "
                                 "file (default: the converter of the pinned llama-cpp-python sdist, fetched once "
                                 "from the package registry into the cache: python -m factorllm_ds.assets llama-cpp)",
                                 default=None)
    allow_nonfinite: bool = arg("export even if a weight holds NaN or Inf (by default the first one is an error, as "
                                "in convert)", default=False)

    def validate(self) -> ExportConfig:
        """Every flag problem at once; returns the config to run (nothing to resolve: itself)."""
        problems = []
        if (self.run is None) == (self.model is None):
            problems.append("pass exactly one source: --run RUN_DIR (a training run) or --model MOE_DIR "
                            "(a FactorLLM folder)")
        if self.tag is not None and self.run is None:
            problems.append("--tag selects a checkpoint inside --run; it needs --run")
        if self.out is not None:  # --overwrite replaces only an export/convert folder, holding and inside no input
            problems += output_problems(self.out, "--out", self.overwrite, self.inputs(), (MANIFEST_FILE,),
                                        inventory=MANIFEST_FILE)
        if not 0 < self.weight_tolerance < 1:
            problems.append(f"--weight-tolerance {self.weight_tolerance:g}: must be in (0, 1), e.g. 1e-3")
        if self.llama_cpp is not None and not (Path(self.llama_cpp) / GGUF_CONVERTER).is_file():
            problems.append(f"--llama-cpp {self.llama_cpp}: no {GGUF_CONVERTER} there; pass the root of a llama.cpp "
                            "checkout, or leave the flag out to use the pinned converter")
        if self.format != "gguf" and (self.llama_cpp is not None or self.gguf_type != "f16"):
            problems.append(f"--llama-cpp and --gguf-type apply to --format gguf only (--format is {self.format})")
        try:
            parse_size(self.max_shard_size)
        except ValueError as err:
            problems.append(f"--max-shard-size {self.max_shard_size!r}: {err}")
        fail_if(problems, "export: bad arguments")
        return self

    def options(self) -> ExportOptions:
        return ExportOptions(weight_tolerance=self.weight_tolerance, gguf_type=self.gguf_type,
                             llama_cpp=Path(self.llama_cpp) if self.llama_cpp is not None else None)

    def inputs(self) -> dict[str, Path | None]:
        """Every path export reads, by flag: --model or --run, and what --run's run.json records (the base model
        the run was trained from, whose config, partition and tokenizer files go into the export), with the run's
        --teacher and --tokenizer, which an --out over them would destroy just as well."""
        inputs: dict[str, Path | None] = {"--model": self.model, "--run": self.run, "--llama-cpp": self.llama_cpp}
        try:
            record = read_run_manifest(self.run, "--run", need=()) if self.run is not None else None
        except UserError:
            record = None  # opening the run names the problem
        if record is not None:
            settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
            for what, value in (("base model", record.get("model")), ("--teacher", settings.get("teacher")),
                                ("--tokenizer", settings.get("tokenizer"))):
                if isinstance(value, str) and value:
                    inputs[f"--run's {what} ({RUN_MANIFEST})"] = Path(value)
        return inputs


def run_export(cfg: ExportConfig, progress: bool = True) -> Path:
    cfg = cfg.validate()
    source = open_source(cfg.model, cfg.run, cfg.tag, cfg.allow_nonfinite)
    return export(source, cfg.out, cfg.format, cfg.overwrite, cfg.max_shard_size, progress=progress,
                  inputs=cfg.inputs(), options=cfg.options())
