"""convert: a dense HF checkpoint folder -> a FactorLLM MoE folder, streamed layer by layer.

At any time the process holds one layer's MLP (plus, with calibration text, the
calibration hidden states and, for ``--refit-down``, one I x I matrix): tensors outside the
MLP are copied file to file unchanged, and each layer's gate/up/down are read into three
reused buffers and written expert by expert straight into pre-planned shards. The output
appears at ``--out`` only when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from factorllm_ds import keys, split, structure
from factorllm_ds.calibration import CalibrationRunner
from factorllm_ds.config import ConvertConfig, calib_inputs, jsonable, parse_size
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import (
    CheckpointReader,
    FolderWriter,
    StreamingSafetensorsWriter,
    TensorInfo,
    check_config_shapes,
    copy_side_files,
    read_config,
    tokenizer_dir,
)
from factorllm_ds.hf_model import AUTO_MAP, MODEL_CODE_DIR, MODEL_CODE_FILES
from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
from factorllm_ds.hf_model.modeling_factorllm import prior_topk, prior_weight, route
from factorllm_ds.layout import MANIFEST_FILE, PARTITION_FILE
from factorllm_ds.outputs import check_output

# Ridge strength of the router fitted to the oracle's picks at conversion (structure.fit_linear_router).
ROUTER_FIT_RIDGE = 0.1
ORACLE_BLOCK_BYTES = 256 * 2**20  # the routed experts' outputs held at once while the oracle picks


def moe_tensor_plan(dense: dict[str, TensorInfo], num_layers: int, cfg: ConvertConfig) -> list[TensorInfo]:
    """Every output tensor (name, shape, dtype), in the order the converter writes them."""
    by_layer: dict[int, list[str]] = {i: [] for i in range(num_layers)}
    unknown = []
    for name in dense:
        try:
            role, layer = keys.classify_dense_key(name)
        except KeyError:
            unknown.append(name)
            continue
        if role == "layer":
            by_layer[layer].append(name)
    if unknown:
        raise UserError(f"--model {cfg.model}: {len(unknown)} tensor names this converter does not know "
                        f"(first: {unknown[0]}). Supported: {', '.join(keys.SUPPORTED_FAMILIES.values())} "
                        "checkpoints in Hugging Face naming.")
    plan, shape = [dense[n] for n in keys.GLOBAL_PASSTHROUGH[:1] if n in dense], cfg.shape
    for layer in range(num_layers):
        plan += [dense[n] for n in sorted(by_layer[layer])]
        dtypes = {part: dense[keys.dense_mlp_key(part, layer)].dtype for part in keys.MLP_PARTS}
        plan.append(TensorInfo(keys.ROUTER_WEIGHT.format(layer=layer), (shape.num_experts, shape.hidden_size),
                               dtypes["gate"]))
        if shape.router_bias:
            plan.append(TensorInfo(keys.ROUTER_BIAS.format(layer=layer), (shape.num_experts,), dtypes["gate"]))
        # (name of each part, its tensors' shapes): the shared expert, if any, then the routed experts
        blocks = [(partial(keys.shared_expert_key, layer=layer), shape.shared_shapes())] if shape.shared_size else []
        blocks += [(partial(keys.expert_key, layer=layer, expert=e), shape.expert_shapes())
                   for e in range(shape.num_experts)]
        plan += [TensorInfo(name_of(part), shapes[part], dtypes[part]) for name_of, shapes in blocks
                 for part in keys.MLP_PARTS]
    plan += [dense[n] for n in keys.GLOBAL_PASSTHROUGH[1:] if n in dense]
    return plan


def check_mlp_tensors(reader: CheckpointReader, num_layers: int, model: Path) -> None:
    """Before any plan: layers present (check_config_shapes) but without a SwiGLU MLP are named, not a KeyError."""
    missing = [name for name in (keys.dense_mlp_key(p, i) for i in range(num_layers) for p in keys.MLP_PARTS)
               if name not in reader.infos]
    if missing:
        raise UserError(f"--model {model}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more MLP "
                        f"tensors) that config.json (num_hidden_layers {num_layers}) calls for; it is incomplete or "
                        "not a SwiGLU LLaMA-family model.")


def make_partition(cfg: ConvertConfig, layer: int, gate, up, down, calib) -> torch.Tensor:
    """The layer's neuron permutation: perm[:S] the shared expert, then E equal routed groups (shape.py)."""
    seed = cfg.seed * 100_003 + layer  # distinct, reproducible per layer
    shape, acts_TI = cfg.shape, None if calib is None else calib.mlp_activations()
    if shape.shared_size:
        importance_I = structure.neuron_importance(acts_TI, down, cfg.importance)
        return structure.shared_partition(importance_I, shape.shared_size, shape.num_experts, cfg.split, seed,
                                          act_TI=acts_TI, weights=(gate, up, down))
    return split.partition(cfg.split, gate.shape[0], shape.num_experts, seed, acts_TI, (gate, up, down))


def initial_router(cfg: ConvertConfig, hidden_size: int, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The router of one layer before fitting: N(0, 0.02), bias 0 (the paper)."""
    bias = torch.zeros(cfg.shape.num_experts, device="cpu") if cfg.shape.router_bias else None
    return torch.empty(cfg.shape.num_experts, hidden_size, device="cpu").normal_(0.0, 0.02, generator=gen), bias


def fitted_router(cfg: ConvertConfig, gate, up, down, perm, calib) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit the router on the calibration tokens of this layer (``cfg.router_fit``, docs/method.md §4).

    The inputs are the hidden states of the already-converted layers below, so the router sees the
    inputs it will see. The fits that learn from the experts regress what the oracle (the PA prior) makes
    of them: its picks, or each expert's gain or output norm. With ``--refit-down`` the layer's down
    projection (``down``, in place) is then refitted to the fitted router's picks. Afterwards the
    calibration stream continues through the converted layer.
    """
    acts_TI, shape = calib.mlp_activations(), cfg.shape
    groups_ER = structure.routed_groups(perm, shape.shared_size, shape.num_experts)
    x_TH = calib.mlp_input.reshape(-1, calib.mlp_input.shape[-1]).float()
    targets_TE = None
    if cfg.router_fit not in structure.DATA_FREE_FITS:
        weight = prior_weight(shape.routing, shape.scale, shape.top_k)
        # Every routed expert's output [E, T, H] in fp32 would be the largest tensor of the conversion (8 GB at
        # 13B, E=24, 16k tokens); the oracle's choice is per token, so it is made a block of tokens at a time.
        rows = max(1, ORACLE_BLOCK_BYTES // (4 * shape.num_experts * down.shape[0]))
        blocks = []
        for block_TI in acts_TI.split(rows):
            routed_ETH = structure.group_outputs(block_TI, down, groups_ER)
            oracle_TK = prior_topk(routed_ETH, routed_ETH.sum(dim=0), shape.top_k, cfg.prior_target, weight)
            blocks.append(structure.router_targets(cfg.router_fit, routed_ETH, oracle_TK))
        targets_TE = None if blocks[0] is None else torch.cat(blocks)
    router, bias = structure.fit_router(cfg.router_fit, x_TH, targets_TE, acts_TI, groups_ER, gate, up, down,
                                        ridge=ROUTER_FIT_RIDGE, bias=shape.router_bias)
    idx_TK, weights_TK = route(F.linear(x_TH, router, bias), shape.top_k, shape.routing, shape.scale)
    gates_TI = structure.neuron_gates(idx_TK, weights_TK, perm, shape.shared_size, shape.num_experts)
    if cfg.refit_down:  # the experts absorb what the router's picks leave out (docs/method.md §4)
        down.copy_(structure.refit_down(acts_TI, gates_TI, down, calib.mlp_output(), cfg.refit_down))
    calib.replace_mlp_output((acts_TI.float() * gates_TI) @ down.float().T)
    return router, bias


def layer_structure(cfg: ConvertConfig, layer: int, gate, up, down, calib, gen) -> tuple[torch.Tensor, ...]:
    """The layer's partition, router and router bias (or None), on the CPU; with ``--refit-down``, ``down`` (the
    host buffer the experts are written from) is refitted in place.

    The arithmetic runs on ``cfg.device``: the layer's gate/up/down are copied there once (on the CPU they are the
    buffers themselves, so the CPU path is unchanged), next to the calibration runner's activations.
    """
    if calib is None and cfg.split != "kmeans":  # nothing to compute: the split numbers the neurons on the CPU
        return (make_partition(cfg, layer, gate, up, down, calib), *initial_router(cfg, gate.shape[1], gen))
    device = torch.device(cfg.device)
    work = [t.to(device) for t in (gate, up, down)]
    perm = make_partition(cfg, layer, *work, calib).to(device)  # the contiguous and random splits number on the CPU
    router, bias = (fitted_router(cfg, *work, perm, calib) if cfg.router_init == "prior" else
                    initial_router(cfg, gate.shape[1], gen))
    if work[2] is not down:  # the refit changed the device's copy
        down.copy_(work[2])
    return perm.cpu(), router.cpu(), None if bias is None else bias.cpu()


def moe_config(dense_config: dict, cfg: ConvertConfig) -> FactorLLMConfig:
    text = {k: v for k, v in dense_config.items()
            if k not in ("architectures", "auto_map", "transformers_version", "_name_or_path")}
    dtype = dense_config.get("dtype") or dense_config.get("torch_dtype")
    shape = cfg.shape
    moe = FactorLLMConfig(
        text_config=text,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        expert_intermediate_size=shape.expert_size,
        shared_intermediate_size=shape.shared_size,
        routing=shape.routing,
        combine_scale=shape.scale if shape.shared_size else cfg.combine_scale,
        router_bias=shape.router_bias,
        partition_method=cfg.split,
        prior_target=cfg.prior_target,
    )
    moe.architectures = ["FactorLLMForCausalLM"]
    moe.auto_map = dict(AUTO_MAP)
    if dtype is not None:
        moe.dtype = dtype
    return moe


def open_dense_source(cfg):
    """(config.json, reader, the validated ``cfg``, the inputs by flag) of convert's or prune's dense ``--model``, with
    ``--out`` checked before any work (FolderWriter checks it again)."""
    dense_config = read_config(cfg.model)
    reader = CheckpointReader(cfg.model, allow_nonfinite=cfg.allow_nonfinite)
    # Before the flags are judged against config.json (--num-experts must divide its intermediate_size): a
    # config that does not fit the weights is named as such, not as a flag error, a KeyError or a bad folder.
    check_config_shapes(dense_config, reader.infos, Path(cfg.model) / "config.json", f"--model {cfg.model}")
    cfg = cfg.validate(dense_config)
    inputs = {"--model": cfg.model, "--tokenizer": cfg.tokenizer, **calib_inputs(cfg.calib_data)}
    check_output(cfg.out, "--out", cfg.overwrite, inputs, (MANIFEST_FILE,), inventory=MANIFEST_FILE)
    return dense_config, reader, cfg, inputs


def convert(cfg: ConvertConfig, progress: bool = True) -> Path:
    dense_config, reader, cfg, inputs = open_dense_source(cfg)
    if cfg.tokenizer is not None or cfg.needs_calibration():
        tokenizer_dir(cfg.model, cfg.tokenizer)  # the error names the folder and suggests --tokenizer
    num_layers = dense_config["num_hidden_layers"]
    check_mlp_tensors(reader, num_layers, cfg.model)
    plan = moe_tensor_plan(reader.infos, num_layers, cfg)
    calib = CalibrationRunner(reader, dense_config, cfg) if cfg.needs_calibration() else None
    gen = torch.Generator().manual_seed(cfg.seed)
    partitions: dict[str, torch.Tensor] = {}
    # shard_writer is looked up here, not in hf_io, so that a test can count bytes instead of writing them.
    with FolderWriter(cfg.out, plan, parse_size(cfg.max_shard_size), command="convert", overwrite=cfg.overwrite,
                      progress=progress, shard_writer=StreamingSafetensorsWriter,
                      inputs=inputs) as folder:
        # Every layer's MLP has the same shapes: read them into the same three buffers, so that
        # no 3 x [I, H] blocks are freed and reallocated per layer (glibc would keep them).
        mlp_buffers: dict[str, torch.Tensor] = {}

        def read_mlp(name: str, part: str) -> torch.Tensor:
            info = reader.infos[name]
            buf = mlp_buffers.get(part)
            if buf is None or tuple(buf.shape) != info.shape or buf.dtype != info.dtype:
                buf = mlp_buffers[part] = torch.empty(info.shape, dtype=info.dtype, device="cpu")
            return reader.get(name, out=buf)

        folder.copy(reader, "model.embed_tokens.weight")
        if calib is not None:
            calib.start()
        for layer in range(num_layers):
            for info in plan:
                if keys.layer_of(info.name) == layer and ".mlp." not in info.name:
                    folder.copy(reader, info.name)
            gate, up, down = (read_mlp(keys.dense_mlp_key(p, layer), p) for p in keys.MLP_PARTS)
            if calib is not None:
                calib.run_layer(layer)
            perm, router, bias = layer_structure(cfg, layer, gate, up, down, calib, gen)
            partitions[f"layers.{layer}"] = perm.to(torch.int32)
            folder.write(keys.ROUTER_WEIGHT.format(layer=layer), router.to(gate.dtype))
            if bias is not None:
                folder.write(keys.ROUTER_BIAS.format(layer=layer), bias.to(gate.dtype))
            if cfg.shape.shared_size:
                shared = perm[:cfg.shape.shared_size]
                for part, piece in zip(keys.MLP_PARTS, (gate[shared], up[shared], down[:, shared])):
                    folder.write(keys.shared_expert_key(part, layer), piece.contiguous())
            routed = perm[cfg.shape.shared_size:]
            for e in range(cfg.shape.num_experts):  # one expert's slices at a time: the layer is held once, not twice
                pieces = split.expert_slice(gate, up, down, routed, cfg.shape.num_experts, e)
                for part, piece in zip(keys.MLP_PARTS, pieces):
                    folder.write(keys.expert_key(part, layer, e), piece)
                del pieces, piece
        for name in keys.GLOBAL_PASSTHROUGH[1:]:
            if name in reader.infos:
                folder.copy(reader, name)

        moe_config(dense_config, cfg).save_pretrained(folder.path)
        for name in MODEL_CODE_FILES:
            shutil.copy2(MODEL_CODE_DIR / name, folder.path / name)
        side = copy_side_files(cfg.model, folder.path)
        if cfg.tokenizer is not None:
            side += copy_side_files(cfg.tokenizer, folder.path)
        save_file(partitions, str(folder.path / PARTITION_FILE),
                  metadata={"method": cfg.split, "num_experts": str(cfg.shape.num_experts), "seed": str(cfg.seed),
                            "num_shared": str(cfg.shape.shared_size)})
        folder.manifest.update(source_model=str(cfg.model), partition_file=PARTITION_FILE, copied_files=side,
                               settings={k: jsonable(v) for k, v in asdict(cfg).items()},
                               bytes_read=reader.total_bytes)
    return Path(cfg.out)
