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
from factorllm_ds.config import ConvertConfig, parse_size
from factorllm_ds.errors import UserError
from factorllm_ds.hf_io import (CheckpointReader, FolderWriter, StreamingSafetensorsWriter, TensorInfo,
                                check_config_shapes, copy_side_files, read_config, tokenizer_dir)
from factorllm_ds.hf_model import AUTO_MAP, MODEL_CODE_DIR, MODEL_CODE_FILES
from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
from factorllm_ds.hf_model.modeling_factorllm import prior_topk, prior_weight, route
from factorllm_ds.layout import MANIFEST_FILE, PARTITION_FILE
from factorllm_ds.safety import check_output


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
    plan = [dense[n] for n in keys.GLOBAL_PASSTHROUGH[:1] if n in dense]
    for layer in range(num_layers):
        plan += [dense[n] for n in sorted(by_layer[layer])]
        gate = dense[keys.dense_mlp_key("gate", layer)]
        down = dense[keys.dense_mlp_key("down", layer)]
        inter, hidden = gate.shape
        size = (inter - cfg.num_shared) // cfg.num_experts
        plan.append(TensorInfo(keys.ROUTER_WEIGHT.format(layer=layer), (cfg.num_experts, hidden), gate.dtype))
        if cfg.resolved_router_bias():
            plan.append(TensorInfo(keys.ROUTER_BIAS.format(layer=layer), (cfg.num_experts,), gate.dtype))
        # (name of each part, neurons): the shared expert, if any, then the routed experts
        blocks = [(partial(keys.shared_expert_key, layer=layer), cfg.num_shared)] if cfg.num_shared else []
        blocks += [(partial(keys.expert_key, layer=layer, expert=e), size) for e in range(cfg.num_experts)]
        for name_of, rows in blocks:
            plan += [TensorInfo(name_of("gate"), (rows, hidden), gate.dtype),
                     TensorInfo(name_of("up"), (rows, hidden), gate.dtype),
                     TensorInfo(name_of("down"), (hidden, rows), down.dtype)]
    plan += [dense[n] for n in keys.GLOBAL_PASSTHROUGH[1:] if n in dense]
    return plan


def make_partition(cfg: ConvertConfig, layer: int, gate, up, down, calib) -> torch.Tensor:
    """The layer's neuron permutation: perm[:S] the shared expert, then E equal routed groups (layout.py)."""
    seed = cfg.seed * 100_003 + layer  # distinct, reproducible per layer
    if cfg.num_shared:
        acts_TI = calib.mlp_activations()
        importance_I = structure.neuron_importance(acts_TI, down, cfg.importance)
        return structure.shared_partition(importance_I, cfg.num_shared, cfg.num_experts, cfg.split, seed,
                                          act_TI=acts_TI, weights=(gate, up, down))
    if cfg.split == "contiguous":
        return split.contiguous_partition(gate.shape[0])
    if cfg.split == "random":
        return split.random_partition(gate.shape[0], seed)
    if cfg.split == "kmeans":
        return split.kmeans_partition(gate, up, down, cfg.num_experts, seed)
    return split.coactivation_partition(calib.mlp_activations(), cfg.num_experts, seed)


def initial_router(cfg: ConvertConfig, hidden_size: int, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The router of one layer before fitting: N(0, 0.02), bias 0 (the paper)."""
    bias = torch.zeros(cfg.num_experts) if cfg.resolved_router_bias() else None
    return torch.empty(cfg.num_experts, hidden_size).normal_(0.0, 0.02, generator=gen), bias


def fitted_router(cfg: ConvertConfig, gate, up, down, perm, calib) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit the router on the calibration tokens of this layer (``cfg.router_fit``, docs/method.md §4).

    The inputs are the hidden states of the already-converted layers below, so the router sees the
    inputs it will see. The fits that learn from the experts regress what the oracle (the PA prior) makes
    of them: its picks, or each expert's gain or output norm. With ``--refit-down`` the layer's down
    projection (``down``, in place) is then refitted to the fitted router's picks. Afterwards the
    calibration stream continues through the converted layer.
    """
    acts_TI = calib.mlp_activations()
    groups_ER = structure.routed_groups(perm, cfg.num_shared, cfg.num_experts)
    x_TH = calib.mlp_input.reshape(-1, calib.mlp_input.shape[-1]).float()
    targets_TE = None
    if cfg.router_fit not in structure.DATA_FREE_FITS:
        weight = prior_weight(cfg.routing, cfg.resolved_scale(), cfg.top_k)
        # Every routed expert's output [E, T, H] in fp32 would be the largest tensor of the conversion (8 GB at
        # 13B, E=24, 16k tokens); the oracle's choice is per token, so it is made a block of tokens at a time.
        rows = max(1, ORACLE_BLOCK_BYTES // (4 * cfg.num_experts * down.shape[0]))
        blocks = []
        for block_TI in acts_TI.split(rows):
            routed_ETH = structure.group_outputs(block_TI, down, groups_ER)
            oracle_TK = prior_topk(routed_ETH, routed_ETH.sum(dim=0), cfg.top_k, cfg.prior_target, weight)
            blocks.append(structure.router_targets(cfg.router_fit, routed_ETH, oracle_TK))
        targets_TE = None if blocks[0] is None else torch.cat(blocks)
    router, bias = structure.fit_router(cfg.router_fit, x_TH, targets_TE, acts_TI, groups_ER, gate, up, down,
                                        ridge=ROUTER_FIT_RIDGE, bias=cfg.resolved_router_bias())
    idx_TK, weights_TK = route(F.linear(x_TH, router, bias), cfg.top_k, cfg.routing, cfg.resolved_scale())
    gates_TI = structure.neuron_gates(idx_TK, weights_TK, perm, cfg.num_shared, cfg.num_experts)
    if cfg.refit_down:  # the experts absorb what the router's picks leave out (docs/method.md §4)
        down.copy_(structure.refit_down(acts_TI, gates_TI, down, calib.mlp_output(), cfg.refit_down))
    calib.replace_mlp_output((acts_TI.float() * gates_TI) @ down.float().T)
    return router, bias


def moe_config(dense_config: dict, cfg: ConvertConfig) -> FactorLLMConfig:
    text = {k: v for k, v in dense_config.items()
            if k not in ("architectures", "auto_map", "transformers_version", "_name_or_path")}
    dtype = dense_config.get("dtype") or dense_config.get("torch_dtype")
    moe = FactorLLMConfig(
        text_config=text,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        expert_intermediate_size=(dense_config["intermediate_size"] - cfg.num_shared) // cfg.num_experts,
        shared_intermediate_size=cfg.num_shared,
        routing=cfg.routing,
        combine_scale=cfg.resolved_scale() if cfg.num_shared else cfg.combine_scale,
        router_bias=cfg.resolved_router_bias(),
        partition_method=cfg.split,
        prior_target=cfg.prior_target,
    )
    moe.architectures = ["FactorLLMForCausalLM"]
    moe.auto_map = dict(AUTO_MAP)
    if dtype is not None:
        moe.dtype = dtype
    return moe


def convert(cfg: ConvertConfig, progress: bool = True) -> Path:
    dense_config = read_config(cfg.model)
    reader = CheckpointReader(cfg.model, allow_nonfinite=cfg.allow_nonfinite)
    # Before the flags are judged against config.json (--num-experts must divide its intermediate_size): a
    # config that does not fit the weights is named as such, not as a flag error, a KeyError or a bad folder.
    check_config_shapes(dense_config, reader.infos, Path(cfg.model) / "config.json", f"--model {cfg.model}")
    cfg = cfg.validate(dense_config)
    inputs = {"--model": cfg.model, "--calib-data": cfg.calib_data, "--tokenizer": cfg.tokenizer}
    check_output(cfg.out, "--out", cfg.overwrite, inputs, (MANIFEST_FILE,),  # before any work; FolderWriter re-checks
                 inventory=MANIFEST_FILE)
    if cfg.tokenizer is not None or cfg.needs_calibration():
        tokenizer_dir(cfg.model, cfg.tokenizer)  # the error names the folder and suggests --tokenizer
    num_layers = dense_config["num_hidden_layers"]
    # Before the plan: layers present (checked above) but without a SwiGLU MLP are named here, not a KeyError.
    missing = [name for name in (keys.dense_mlp_key(p, i) for i in range(num_layers) for p in keys.MLP_PARTS)
               if name not in reader.infos]
    if missing:
        raise UserError(f"--model {cfg.model}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more MLP "
                        f"tensors) that config.json (num_hidden_layers {num_layers}) calls for; it is incomplete or "
                        "not a SwiGLU LLaMA-family model.")
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
                buf = mlp_buffers[part] = torch.empty(info.shape, dtype=info.dtype)
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
            perm = make_partition(cfg, layer, gate, up, down, calib)
            partitions[f"layers.{layer}"] = perm.to(torch.int32)
            router, bias = (fitted_router(cfg, gate, up, down, perm, calib) if cfg.router_init == "prior" else
                            initial_router(cfg, gate.shape[1], gen))
            folder.write(keys.ROUTER_WEIGHT.format(layer=layer), router.to(gate.dtype))
            if bias is not None:
                folder.write(keys.ROUTER_BIAS.format(layer=layer), bias.to(gate.dtype))
            if cfg.num_shared:
                shared = perm[:cfg.num_shared]
                for part, piece in zip(keys.MLP_PARTS, (gate[shared], up[shared], down[:, shared])):
                    folder.write(keys.shared_expert_key(part, layer), piece.contiguous())
            routed = perm[cfg.num_shared:]
            for e in range(cfg.num_experts):  # one expert's slices at a time: the layer is held once, not twice
                pieces = split.expert_slice(gate, up, down, routed, cfg.num_experts, e)
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
                  metadata={"method": cfg.split, "num_experts": str(cfg.num_experts), "seed": str(cfg.seed),
                            "num_shared": str(cfg.num_shared)})
        folder.manifest.update(source_model=str(cfg.model), partition_file=PARTITION_FILE, copied_files=side,
                               settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                               bytes_read=reader.total_bytes)
    return Path(cfg.out)
