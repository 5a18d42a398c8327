"""export: a FactorLLM checkpoint -> a Hugging Face folder for one device, streamed layer by layer.

Formats (``--format``):

- ``factorllm``: the FactorLLM folder itself (config, model code, partition file), e.g. to
  turn a DeepSpeed training run back into a folder ``from_pretrained`` loads.
- ``mixtral``: the standard Hugging Face MoE class of the base family, loadable by plain
  transformers (and vLLM, llama.cpp, ...) without our code: ``MixtralForCausalLM`` for LLaMA
  and Mistral bases, ``Qwen2MoeForCausalLM`` (``norm_topk_prob``, zero-size shared expert)
  for Qwen2, ``Qwen3MoeForCausalLM`` (``norm_topk_prob``) for Qwen3. Those classes weight the
  top-k experts by their renormalized softmax probabilities, which is exactly our
  ``softmax`` routing once the combine scale s is folded into every ``down_proj`` (w2);
  ``hard`` routing (k > 1) and routers with a bias have no such equivalent and are refused.
- ``dense``: the experts concatenated back, in the partition's original neuron order,
  into a plain checkpoint of the base architecture. It is the MoE with *all experts
  active, each with weight 1* (hard routing, k = E, scale 1). For a freshly converted model
  that is the original dense model, bit for bit. For a trained model it is a different
  function from the routed MoE that was trained (which runs k experts with weights s or
  s * p_i): the dense export drops the router and the combine scale.

Tensors come from an :class:`ExportSource` (a FactorLLM HF folder here; a DeepSpeed run in
``factorllm_ds.sources``). A source yields the non-expert tensors by name and one
layer's experts at a time, so at most one layer's experts are in memory; every output
tensor is written the moment it exists, into shards planned up front, and the folder
appears at ``--out`` only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from factorllm_ds import __version__, keys, split
from factorllm_ds.config import arg, fail_if, parse_size
from factorllm_ds.errors import UserError
from factorllm_ds.layout import MANIFEST_FILE, PARTITION_FILE, load_partition
from factorllm_ds.sources import ExportSource, FolderSource, open_source
from factorllm_ds.hf_io import (CheckpointReader, StreamingSafetensorsWriter, TensorInfo, atomic_output_dir,
                                copy_side_files, read_config)

FORMATS = ("factorllm", "mixtral", "dense")

# ---------------------------------------------------------------------------------------------
# FactorLLM tensor names: every key a FactorLLM checkpoint may hold, by role. Unknown keys raise.

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def classify_moe_key(name: str) -> tuple[str, int | None]:
    """('global' | 'layer' | 'router' | 'expert' | 'ignored', layer) for a FactorLLM checkpoint key."""
    if name in keys.GLOBAL_PASSTHROUGH:
        return "global", None
    if keys.IGNORED.fullmatch(name):
        return "ignored", None
    m = _LAYER_KEY.fullmatch(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest in keys.LAYER_PASSTHROUGH:
            return "layer", layer
        if rest in ("mlp.router.weight", "mlp.router.bias"):
            return "router", layer
        if _EXPERT_KEY.fullmatch(rest):
            return "expert", layer
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Sources


# ---------------------------------------------------------------------------------------------
# Checks: everything a format needs, reported together before anything is written.


@dataclass(frozen=True)
class MoEFacts:
    """What an export needs to know about the source model, read from its config."""

    base_type: str
    text: dict
    num_layers: int
    num_experts: int
    top_k: int
    routing: str
    scale: float
    router_bias: bool
    router_override: str

    @classmethod
    def of(cls, config: dict) -> "MoEFacts":
        from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig

        text = dict(config.get("text_config") or {})
        moe = FactorLLMConfig(**{k: v for k, v in config.items() if k in (
            "num_experts", "num_experts_per_tok", "routing", "combine_scale")})
        return cls(base_type=text.get("model_type", "?"), text=text,
                   num_layers=int(text.get("num_hidden_layers", config.get("num_hidden_layers", 0))),
                   num_experts=moe.num_experts, top_k=moe.num_experts_per_tok, routing=moe.routing,
                   scale=moe.scale, router_bias=bool(config.get("router_bias", False)),
                   router_override=config.get("router_override", "learned"))


def structure_problems(source: ExportSource, facts: MoEFacts) -> list[str]:
    """Unknown keys, missing experts or routers, unequal expert sizes."""
    problems, present = [], set()
    for name in source.names():
        try:
            role, layer = classify_moe_key(name)
        except KeyError:
            problems.append(f"{source.description}: unknown tensor {name} (not a FactorLLM / "
                            f"{', '.join(keys.SUPPORTED_FAMILIES.values())} key); refusing to drop it")
            continue
        if layer is not None and not 0 <= layer < facts.num_layers:
            problems.append(f"{source.description}: tensor {name} for layer {layer}, but the config has "
                            f"{facts.num_layers} layers")
        present.add(name)
    for layer in range(facts.num_layers):
        need = [keys.ROUTER_WEIGHT.format(layer=layer)]
        need += [keys.expert_key(p, layer, e) for e in range(facts.num_experts) for p in ("gate", "up", "down")]
        missing = [n for n in need if n not in present]
        if missing:
            problems.append(f"{source.description}: layer {layer} lacks {missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            continue
        shapes = {tuple(source.info(keys.expert_key("gate", layer, e)).shape) for e in range(facts.num_experts)}
        if len(shapes) != 1:
            problems.append(f"{source.description}: layer {layer} has experts of different sizes {sorted(shapes)}")
    return problems


# The standard HF MoE class for each base family, and the reason a base cannot map.
MOE_TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
MOE_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM"}


def _sliding_layers(text: dict) -> list[str]:
    return [t for t in (text.get("layer_types") or []) if t == "sliding_attention"]


def moe_format_problems(facts: MoEFacts) -> list[str]:
    """Why this model cannot be written as a standard HF MoE checkpoint (empty list: it can)."""
    problems = []
    target = MOE_TARGETS.get(facts.base_type)
    if target is None:
        problems.append(f"base model_type {facts.base_type!r} has no standard Hugging Face MoE counterpart here "
                        f"(supported: {', '.join(f'{b} -> {MOE_ARCHITECTURES[t]}' for b, t in MOE_TARGETS.items())})")
    if facts.routing == "hard" and facts.top_k > 1:
        problems.append(
            f"routing is 'hard' with k={facts.top_k}: every selected expert gets the constant weight "
            f"s={facts.scale:g} whatever the router probabilities are, while Mixtral / Qwen-MoE always weight "
            "the top-k experts by their renormalized softmax probabilities; no standard format can represent "
            "that (with k=1 it could: the single weight is then 1 in both)")
    if facts.routing not in ("hard", "softmax"):
        problems.append(f"unknown routing {facts.routing!r}")
    if facts.router_bias:
        problems.append("the router has a bias (r = W x + b): Mixtral / Qwen-MoE routers are W x only, and a bias "
                        "cannot be folded into W (the router input has no constant component)")
    if facts.router_override != "learned":
        problems.append(f"config.json has router_override={facts.router_override!r} (an evaluation-time choice); "
                        "a standard MoE always uses its learned router: set it to 'learned' first")
    text = facts.text
    if facts.base_type in ("llama", "mistral"):
        for flag in ("attention_bias", "mlp_bias"):
            if text.get(flag):
                problems.append(f"the {facts.base_type} base has {flag}=true; MixtralForCausalLM has no such biases")
    if facts.base_type == "qwen3":
        sliding = _sliding_layers(text)
        if sliding and len(sliding) != len(text.get("layer_types") or []):
            problems.append("the Qwen3 base uses sliding-window attention on some layers only; Qwen3MoE applies "
                            "its window to every layer or none")
    return problems


def format_problems(source: ExportSource, fmt: str) -> list[str]:
    if fmt not in FORMATS:
        return [f"--format {fmt!r}: expected one of {', '.join(FORMATS)}"]
    facts = MoEFacts.of(source.config)
    problems = structure_problems(source, facts)
    if fmt == "mixtral":
        if not facts.router_bias and any(n.endswith("mlp.router.bias") for n in source.names()):
            facts = dataclasses.replace(facts, router_bias=True)  # the tensors win over the config
        refusals = moe_format_problems(facts)
        if refusals:
            problems.append(
                f"--format mixtral: {source.description} cannot be written as a standard Hugging Face MoE "
                "checkpoint:\n      * " + "\n      * ".join(refusals)
                + "\n    Formats that represent it exactly: --format factorllm (our HF folder, "
                "trust_remote_code or `import factorllm_ds`), and --format dense (all experts active, weight 1).")
    if fmt == "dense" and facts.base_type not in keys.SUPPORTED_FAMILIES:
        problems.append(f"--format dense: unsupported base model_type {facts.base_type!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# Targets: output names, configs and tensor transforms per format.


def _layer_prefix(layer: int) -> str:
    return keys.LAYER.format(layer=layer)


class _Target:
    """Output naming and config of one format. ``layer_mlp`` yields (name, tensor) for one layer."""

    def __init__(self, fmt: str, facts: MoEFacts, source: ExportSource):
        self.fmt, self.facts, self.source = fmt, facts, source
        self._names = set(source.names())
        self.moe_type = MOE_TARGETS.get(facts.base_type) if fmt == "mixtral" else None
        self.partitions: dict[int, torch.Tensor] | None = None
        if fmt == "dense" and source.partition_file is not None:
            self.partitions = load_partition(source.partition_file)

    # -- names --------------------------------------------------------------------------------
    def mlp_plan(self, layer: int) -> list[TensorInfo]:
        f, src = self.facts, self.source
        gate0 = src.info(keys.expert_key("gate", layer, 0))
        down0 = src.info(keys.expert_key("down", layer, 0))
        size, hidden = gate0.shape
        p = _layer_prefix(layer)
        if self.fmt == "factorllm":
            names = [keys.ROUTER_WEIGHT.format(layer=layer)]
            if keys.ROUTER_BIAS.format(layer=layer) in self._names:
                names.append(keys.ROUTER_BIAS.format(layer=layer))
            names += [keys.expert_key(part, layer, e) for e in range(f.num_experts) for part in ("gate", "up", "down")]
            return [src.info(n) for n in names]
        if self.fmt == "dense":
            inter = size * f.num_experts
            return [TensorInfo(keys.dense_mlp_key("gate", layer), (inter, hidden), gate0.dtype),
                    TensorInfo(keys.dense_mlp_key("up", layer), (inter, hidden), gate0.dtype),
                    TensorInfo(keys.dense_mlp_key("down", layer), (hidden, inter), down0.dtype)]
        router = src.info(keys.ROUTER_WEIGHT.format(layer=layer))
        plan = [TensorInfo(self.router_name(layer), router.shape, router.dtype)]
        for e in range(f.num_experts):
            plan += [TensorInfo(self.expert_name("gate", layer, e), (size, hidden), gate0.dtype),
                     TensorInfo(self.expert_name("up", layer, e), (size, hidden), gate0.dtype),
                     TensorInfo(self.expert_name("down", layer, e), (hidden, size), down0.dtype)]
        if self.moe_type == "qwen2_moe":
            # Qwen2-MoE always builds a shared expert; with intermediate size 0 it adds exactly 0.
            plan += [TensorInfo(p + "mlp.shared_expert.gate_proj.weight", (0, hidden), gate0.dtype),
                     TensorInfo(p + "mlp.shared_expert.up_proj.weight", (0, hidden), gate0.dtype),
                     TensorInfo(p + "mlp.shared_expert.down_proj.weight", (hidden, 0), down0.dtype),
                     TensorInfo(p + "mlp.shared_expert_gate.weight", (1, hidden), router.dtype)]
        return plan

    def router_name(self, layer: int) -> str:
        block = "block_sparse_moe" if self.moe_type == "mixtral" else "mlp"
        return _layer_prefix(layer) + f"{block}.gate.weight"

    def expert_name(self, part: str, layer: int, expert: int) -> str:
        p = _layer_prefix(layer)
        if self.moe_type == "mixtral":  # legacy per-expert names: what every Mixtral consumer reads
            w = {"gate": "w1", "up": "w3", "down": "w2"}[part]
            return p + f"block_sparse_moe.experts.{expert}.{w}.weight"
        return p + f"mlp.experts.{expert}.{part}_proj.weight"

    # -- tensors ------------------------------------------------------------------------------
    def layer_mlp(self, layer: int):
        f, src = self.facts, self.source
        experts = src.expert_tensors(layer)
        if len(experts) != f.num_experts:
            raise RuntimeError(f"{src.description}: layer {layer} gave {len(experts)} experts, "
                               f"expected {f.num_experts}")
        if self.fmt == "factorllm":
            yield keys.ROUTER_WEIGHT.format(layer=layer), src.shared_tensor(keys.ROUTER_WEIGHT.format(layer=layer))
            if keys.ROUTER_BIAS.format(layer=layer) in self._names:
                yield keys.ROUTER_BIAS.format(layer=layer), src.shared_tensor(keys.ROUTER_BIAS.format(layer=layer))
            for e, (g, u, d) in enumerate(experts):
                yield keys.expert_key("gate", layer, e), g
                yield keys.expert_key("up", layer, e), u
                yield keys.expert_key("down", layer, e), d
            return
        if self.fmt == "dense":
            inter = sum(g.shape[0] for g, _, _ in experts)
            perm = self.partitions.get(layer) if self.partitions is not None else None
            if perm is None:
                perm = torch.arange(inter)
            gate, up, down = split.merge_experts(experts, perm)
            yield keys.dense_mlp_key("gate", layer), gate
            yield keys.dense_mlp_key("up", layer), up
            yield keys.dense_mlp_key("down", layer), down
            return
        router = src.shared_tensor(keys.ROUTER_WEIGHT.format(layer=layer))
        yield self.router_name(layer), router
        for e, (g, u, d) in enumerate(experts):
            yield self.expert_name("gate", layer, e), g
            yield self.expert_name("up", layer, e), u
            yield self.expert_name("down", layer, e), fold_scale(d, f.scale)
        if self.moe_type == "qwen2_moe":
            p = _layer_prefix(layer)
            hidden = router.shape[1]
            g0, _, d0 = experts[0]
            yield p + "mlp.shared_expert.gate_proj.weight", torch.zeros(0, hidden, dtype=g0.dtype)
            yield p + "mlp.shared_expert.up_proj.weight", torch.zeros(0, hidden, dtype=g0.dtype)
            yield p + "mlp.shared_expert.down_proj.weight", torch.zeros(hidden, 0, dtype=d0.dtype)
            yield p + "mlp.shared_expert_gate.weight", torch.zeros(1, hidden, dtype=router.dtype)

    # -- config -------------------------------------------------------------------------------
    def save_config(self, out: Path) -> None:
        if self.fmt == "factorllm":
            from factorllm_ds.hf_model import AUTO_MAP, MODEL_CODE_DIR, MODEL_CODE_FILES

            config = dict(self.source.config)
            config["architectures"] = ["FactorLLMForCausalLM"]
            config["auto_map"] = dict(AUTO_MAP)
            (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name in MODEL_CODE_FILES:
                shutil.copy2(MODEL_CODE_DIR / name, out / name)
            if self.source.partition_file is not None:
                shutil.copy2(self.source.partition_file, out / PARTITION_FILE)
            return
        if self.fmt == "dense":
            config = dense_config(self.facts)
        else:
            expert_size = self.source.info(keys.expert_key("gate", 0, 0)).shape[0]
            config = moe_config(self.facts, self.moe_type, expert_size)
        config.save_pretrained(out)


def fold_scale(down: torch.Tensor, scale: float) -> torch.Tensor:
    """s * W_down, computed in fp32 and cast back (exact when s is a power of two, e.g. E = 4 or 8)."""
    if scale == 1.0:
        return down
    return (down.float() * scale).to(down.dtype)


_GENERIC_CONFIG_KEYS = ("architectures", "auto_map", "transformers_version", "_name_or_path", "model_type")


def dense_config(facts: MoEFacts):
    """The base model's own config (the FactorLLM ``text_config``) with its CausalLM architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = {k: v for k, v in facts.text.items() if k not in _GENERIC_CONFIG_KEYS}
    config = AutoConfig.for_model(facts.base_type, **text)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[facts.base_type]]
    return config


# Base-config fields that carry over to the MoE config unchanged (attention, norms, rope, tokens).
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                  "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                  "attention_dropout", "rope_parameters", "dtype")


def moe_config(facts: MoEFacts, moe_type: str, expert_size: int):
    """MixtralConfig / Qwen2MoeConfig / Qwen3MoeConfig equal in function to the FactorLLM model."""
    from transformers import AutoConfig

    text = facts.text
    fields = {k: text[k] for k in _SHARED_FIELDS if k in text}
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    fields.update(num_experts_per_tok=facts.top_k, output_router_logits=False)
    if moe_type == "mixtral":
        # LLaMA has no sliding window; Mistral applies its window to every layer, as Mixtral does.
        fields.update(intermediate_size=expert_size, num_local_experts=facts.num_experts,
                      sliding_window=text.get("sliding_window") if facts.base_type == "mistral" else None,
                      router_jitter_noise=0.0)
    else:
        sliding = _sliding_layers(text)
        fields.update(moe_intermediate_size=expert_size, num_experts=facts.num_experts, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[],
                      intermediate_size=expert_size * facts.num_experts,  # used by mlp_only_layers only
                      use_sliding_window=bool(sliding), sliding_window=text.get("sliding_window"),
                      max_window_layers=text.get("max_window_layers", facts.num_layers))
        if moe_type == "qwen2_moe":
            fields.update(shared_expert_intermediate_size=0, qkv_bias=True)
            if text.get("layer_types"):
                fields["layer_types"] = list(text["layer_types"])
        else:
            fields["attention_bias"] = bool(text.get("attention_bias", False))
    config = AutoConfig.for_model(moe_type, **fields)
    config.architectures = [MOE_ARCHITECTURES[moe_type]]
    return config


def _partition_problems(source: ExportSource, facts: MoEFacts) -> list[str]:
    if source.partition_file is None:
        return []
    parts = load_partition(source.partition_file)
    problems = []
    for layer in range(facts.num_layers):
        perm = parts.get(layer)
        inter = source.info(keys.expert_key("gate", layer, 0)).shape[0] * facts.num_experts
        if perm is None or perm.numel() != inter or not torch.equal(torch.sort(perm).values, torch.arange(inter)):
            problems.append(f"{source.partition_file}: no valid permutation of {inter} neurons for layer {layer}")
    return problems


# ---------------------------------------------------------------------------------------------
# The export itself


@dataclass
class _Layout:
    """The output's tensor plan, and which source tensors each step consumes (for progress)."""

    plan: list[TensorInfo]
    globals_first: list[str]
    layer_names: dict[int, list[str]]
    globals_last: list[str]
    mlp_bytes: dict[int, int]
    total_bytes: int


def _layout(source: ExportSource, facts: MoEFacts, target: "_Target") -> _Layout:
    names = set(source.names())
    layer_names: dict[int, list[str]] = {i: [] for i in range(facts.num_layers)}
    mlp_bytes = dict.fromkeys(range(facts.num_layers), 0)  # source bytes of each layer's router + experts
    total = 0
    for name in names:
        role, layer = classify_moe_key(name)
        total += source.info(name).nbytes if role != "ignored" else 0
        if role == "layer":
            layer_names[layer].append(name)
        elif role in ("router", "expert"):
            mlp_bytes[layer] += source.info(name).nbytes
    first = [n for n in keys.GLOBAL_PASSTHROUGH[:1] if n in names]
    last = [n for n in keys.GLOBAL_PASSTHROUGH[1:] if n in names]
    plan = [source.info(n) for n in first]
    for layer in range(facts.num_layers):
        layer_names[layer].sort()
        plan += [source.info(n) for n in layer_names[layer]] + target.mlp_plan(layer)
    plan += [source.info(n) for n in last]
    return _Layout(plan, first, layer_names, last, mlp_bytes, total)


def _notes(source: ExportSource, facts: MoEFacts, fmt: str) -> list[str]:
    notes = []
    if fmt == "mixtral" and facts.scale != 1.0:
        notes.append(f"combine scale s={facts.scale:g} folded into every expert's down_proj (w2)")
    if fmt == "dense":
        notes.append("dense = the MoE with all experts active, each with weight 1 (router and combine scale dropped)")
        if source.partition_file is None:
            notes.append(f"no {PARTITION_FILE} in the source: experts concatenated in expert order (the same "
                         "function as the original neuron order, but tensors differ from the original checkpoint)")
            print(f"export: warning: {notes[-1]}", file=sys.stderr)
    return notes


def export(source: ExportSource, out: Path, fmt: str, overwrite: bool = False, max_shard_size: str = "2GB",
           progress: bool = True) -> Path:
    """Write ``source`` to ``out`` as ``fmt`` (factorllm | mixtral | dense); returns ``out``.

    Every check runs before anything is written; on any failure nothing is left at ``out``.
    """
    out = Path(out)
    problems = format_problems(source, fmt)
    facts = MoEFacts.of(source.config)
    if fmt == "dense" and not problems:
        problems += _partition_problems(source, facts)
    fail_if(problems, f"export to {fmt}: cannot export {source.description}")
    target = _Target(fmt, facts, source)
    layout = _layout(source, facts, target)
    notes = _notes(source, facts, fmt)

    started = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, layout.plan, parse_size(max_shard_size))
        bar = tqdm(total=layout.total_bytes, unit="B", unit_scale=True, desc=f"export {fmt}", disable=not progress)

        def copy(names: list[str]) -> None:
            for name in names:
                writer.write(name, source.shared_tensor(name))
                bar.update(source.info(name).nbytes)

        copy(layout.globals_first)
        for layer in range(facts.num_layers):
            copy(layout.layer_names[layer])
            for name, tensor in target.layer_mlp(layer):
                writer.write(name, tensor)
            bar.update(layout.mlp_bytes[layer])
        copy(layout.globals_last)
        writer.close()
        bar.close()

        target.save_config(tmp)
        side = copy_side_files(source.side_dir, tmp) if source.side_dir is not None else []
        _write_manifest(tmp, source, facts, fmt, notes, side, writer.bytes_written, time.time() - started)
    return out


def _write_manifest(folder: Path, source: ExportSource, facts: MoEFacts, fmt: str, notes: list[str],
                    copied: list[str], bytes_written: int, seconds: float) -> None:
    source_manifest = None
    if source.side_dir is not None and (Path(source.side_dir) / MANIFEST_FILE).is_file():
        source_manifest = json.loads((Path(source.side_dir) / MANIFEST_FILE).read_text())
    manifest = {
        "factorllm_ds_version": __version__,
        "command": "export",
        "format": fmt,
        "architecture": _architecture(folder),
        "source": source.description,
        "moe": {"base_model_type": facts.base_type, "num_experts": facts.num_experts, "top_k": facts.top_k,
                "routing": facts.routing, "combine_scale": facts.scale},
        "notes": notes,
        "copied_files": copied,
        "bytes_written": bytes_written,
        "seconds": round(seconds, 3),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "source_manifest": source_manifest,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _architecture(folder: Path) -> str:
    return ",".join(json.loads((folder / "config.json").read_text()).get("architectures") or ["?"])


def export_factorllm_folder_to_mixtral(moe_dir: Path, out: Path, overwrite: bool = False,
                                       progress: bool = False) -> Path:
    """FactorLLM folder (softmax routing) -> MixtralForCausalLM / Qwen2MoeForCausalLM / Qwen3MoeForCausalLM folder."""
    return export(FolderSource(moe_dir), out, "mixtral", overwrite, progress=progress)


def export_factorllm_folder_to_dense(moe_dir: Path, out: Path, overwrite: bool = False,
                                     progress: bool = False) -> Path:
    """FactorLLM folder -> dense base-architecture folder (all experts active, weight 1)."""
    return export(FolderSource(moe_dir), out, "dense", overwrite, progress=progress)


# ---------------------------------------------------------------------------------------------
# CLI


@dataclass
class ExportConfig:
    """factorllm-ds export: a DeepSpeed training run or a FactorLLM folder -> one HF folder.

    --format factorllm: a FactorLLM folder (our model code inside). --format mixtral: the standard
    HF MoE class of the base family (Mixtral for LLaMA/Mistral, Qwen2-MoE, Qwen3-MoE); softmax
    routing only. --format dense: the base architecture with every expert active at weight 1.
    """

    out: Path = arg("output folder (must not exist, unless --overwrite)", default=None, required=True)
    run: Path | None = arg("DeepSpeed run folder written by `factorllm-ds train` (its checkpoints)", default=None)
    tag: str | None = arg("checkpoint tag inside --run (default: the run's 'latest')", default=None)
    model: Path | None = arg("instead of --run: a FactorLLM HF folder (from convert or a previous export)",
                             default=None)
    format: str = arg("output format", choices=FORMATS, default="factorllm")
    max_shard_size: str = arg("largest output shard, e.g. 2GB or 500MB", default="2GB")
    overwrite: bool = arg("replace --out if it exists", default=False)

    def validate(self) -> None:
        problems = []
        if (self.run is None) == (self.model is None):
            problems.append("pass exactly one source: --run RUN_DIR (a training run) or --model MOE_DIR "
                            "(a FactorLLM folder)")
        if self.tag is not None and self.run is None:
            problems.append("--tag selects a checkpoint inside --run; it needs --run")
        if self.out is not None and Path(self.out).exists() and not self.overwrite:
            problems.append(f"--out {self.out} already exists; choose another path or pass --overwrite")
        for flag, src in (("--model", self.model), ("--run", self.run)):
            if src is not None and self.out is not None and Path(self.out).resolve() == Path(src).resolve():
                problems.append(f"--out must differ from {flag}")
        try:
            parse_size(self.max_shard_size)
        except ValueError:
            problems.append(f"--max-shard-size {self.max_shard_size!r}: expected a size like 2GB or 500MB")
        fail_if(problems, "export: bad arguments")

    def source(self) -> ExportSource:
        return open_source(self.model, self.run, self.tag)


def run_export(cfg: ExportConfig, progress: bool = True) -> Path:
    cfg.validate()
    return export(cfg.source(), cfg.out, cfg.format, cfg.overwrite, cfg.max_shard_size, progress=progress)


def _export_command(ns) -> int:
    from factorllm_ds.config import from_namespace

    cfg = from_namespace(ExportConfig, ns)
    out = run_export(cfg)
    print(f"wrote {out} ({cfg.format}: {_architecture(out)})")
    return 0


CLI_COMMANDS = {
    "export": ("factorllm_ds.export:ExportConfig", _export_command,
               "FactorLLM run or folder -> HF folder (factorllm | mixtral | dense)"),
}
