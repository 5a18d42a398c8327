"""Hugging Face checkpoint folders: config, shard index, lazy tensor reads, streamed writes.

Reads never load a whole shard: every tensor is fetched on its own, its bytes read straight
into a fresh tensor at the offset its shard's header gives (``safe_open`` validates each
shard once, up front), so a conversion holds about one layer at a time. Writes go through
:class:`StreamingSafetensorsWriter`, which lays out every shard's header from a plan
made up front and then appends each tensor's bytes the moment it is produced; a
:class:`FolderWriter` wraps it into a whole output folder that appears only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import re
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from factorllm_ds import __version__
from factorllm_ds.errors import UserError
from factorllm_ds.finite import check_finite
from factorllm_ds.layout import MANIFEST_FILE
from factorllm_ds.outputs import (
    INVENTORY_KEY,
    TEMP_MARKER,
    check_free_space,
    check_output,
    disk_full_error,
    is_disk_full,
    make_marked_dir,
    move_into_place,
    recover_replaced,
    remove_stale_temps,
    temp_dir_for,
)
from factorllm_ds.shape import MLP_PARTS, part_shape

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> torch dtypes
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# Everything beside the weights that a model folder carries and a converted folder keeps.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# A folder holding one of these has a tokenizer (the rest of TOKENIZER_FILES only configure one).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "tokenizer.tiktoken")


def tokenizer_dir(model_dir: Path, tokenizer: Path | None = None, flag: str = "--model") -> Path:
    """The folder to load the tokenizer from: ``--tokenizer`` if given, else the model folder.

    Raises :class:`UserError` when that folder holds no tokenizer vocabulary (transformers would
    say "You need to have sentencepiece or tiktoken installed", which misleads).
    """
    folder, named = (Path(tokenizer), "--tokenizer") if tokenizer is not None else (Path(model_dir), flag)
    if not folder.is_dir():
        raise UserError(f"{named} {folder}: no such folder")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        fix = ("pass the base model's folder (or any folder with its tokenizer files)" if tokenizer is not None else
               "pass --tokenizer DIR (the base model's folder), or copy its tokenizer files in")
        raise UserError(f"{named} {folder}: no tokenizer files there (none of {', '.join(TOKENIZER_VOCAB_FILES)}); "
                        f"{fix}")
    return folder


def load_tokenizer(model_dir: Path, tokenizer: Path | None = None, flag: str = "--model",
                   model_config: dict | None = None):
    """``AutoTokenizer`` of :func:`tokenizer_dir`, any failure one :class:`UserError` naming the folder.

    With ``model_config`` (the model's config.json), a tokenizer with more tokens than the model's
    ``vocab_size`` is refused too (:func:`tokenizer_fit_problem`).
    """
    from transformers import AutoTokenizer

    folder = tokenizer_dir(model_dir, tokenizer, flag)
    named = "--tokenizer" if tokenizer is not None else flag
    try:
        # A converted folder's config.json names remote code (auto_map): without trust_remote_code=False
        # transformers stops at an interactive prompt to load a tokenizer that needs none.
        loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer
        raise UserError(f"{named} {folder}: the tokenizer files there cannot be loaded ({type(err).__name__}: "
                        f"{err}). Copy the base model's tokenizer files in, or pass --tokenizer DIR.") from err
    if model_config:
        check_token_ids(-1, loaded, model_config, f"{flag} {model_dir}", f"{named} {folder}")
    loaded.factorllm_desc = f"{named} {folder}"  # what check_token_ids names later, when the text is tokenized
    return loaded


def read_config(model_dir: Path, flag: str = "--model") -> dict:
    """The folder's config.json as a dict, with a clear error if it is missing or broken."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{flag} {model_dir}: no such folder. Pass a Hugging Face model folder "
                        "(config.json + *.safetensors).")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{flag} {model_dir}: no config.json there; is this a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read it as JSON ({err}).") from err


def text_config(config: dict) -> dict:
    """The base model's fields (sizes, positions, vocabulary): a FactorLLM config's ``text_config``, or a dense
    config itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def tokenizer_fit_problem(tokenizer, config: dict, model_desc: str, tokenizer_desc: str,
                          max_id: int | None = None) -> str | None:
    """Why ``tokenizer`` cannot feed the model of ``config``: it makes token ids the embedding has no row for
    (an IndexError deep in the forward pass otherwise). ``vocab_size`` may exceed the tokenizer (padded rows).

    The base vocabulary must fit. Tokens added on top of it (a chat template's special tokens, say) may lie beyond
    ``vocab_size`` as long as the text never produces them: pass ``max_id``, the largest id of the tokenized text,
    to check that (tokenizers load such added tokens for models whose embedding lacks them).
    """
    vocab = text_config(config).get("vocab_size")
    needed = max(tokenizer.vocab_size, -1 if max_id is None else max_id + 1)
    if not isinstance(vocab, int) or needed <= vocab:
        return None
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    where = (f"the text holds token id {max_id} ({tokenizer.convert_ids_to_tokens(max_id)!r}), which has no "
             "embedding" if max_id is not None and max_id >= vocab else f"token ids {vocab}..{size - 1} have no "
             "embedding")
    return (f"{tokenizer_desc}: the tokenizer has {size} tokens, but {model_desc} has vocab_size {vocab} in "
            f"config.json: {where}. Use the tokenizer the model was trained with (pass --tokenizer DIR, the base "
            "model's folder)")


def check_token_ids(max_id: int, tokenizer, config: dict, model_desc: str, tokenizer_desc: str) -> None:
    """Raise :class:`UserError` when the tokenized text holds an id the model has no embedding for."""
    problem = tokenizer_fit_problem(tokenizer, config, model_desc, tokenizer_desc, max_id)
    if problem:
        raise UserError(problem)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_NONFINITE_FIX = ("The checkpoint is damaged or was saved after a diverged run; use another copy, or pass "
                  "--allow-nonfinite to go ahead anyway.")


class CheckpointReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path, flag: str = "--model", *, allow_nonfinite: bool = False):
        self.model_dir = Path(model_dir)
        self.flag = flag
        # Every tensor read (get) or copied (check_finite) is checked for NaN/Inf unless this is set.
        self.allow_nonfinite = allow_nonfinite
        self.weight_map = self._weight_map()
        self.infos: dict[str, TensorInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # name -> absolute [start, end) byte offsets in its shard
        for shard in sorted(set(self.weight_map.values())):
            self._scan_shard(shard)
        missing = sorted(set(self.weight_map) - set(self.infos))
        if missing:
            raise UserError(f"{flag} {self.model_dir}: {INDEX_FILE} names {len(missing)} tensors that are in no "
                            f"shard (first: {missing[0]}). The checkpoint is incomplete; download it again.")

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{self.flag} {index}: not a valid safetensors index ({err}).") from err
            for shard in sorted(set(weight_map.values())):
                if not (self.model_dir / shard).is_file():
                    raise UserError(f"{self.flag} {self.model_dir}: shard {shard} named in {INDEX_FILE} is missing. "
                                    "Download the checkpoint again (all shards).")
            return weight_map
        if (self.model_dir / SINGLE_FILE).is_file():
            return {name: SINGLE_FILE for name in self._header(SINGLE_FILE)[1]}
        if any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pth")):
            raise UserError(f"{self.flag} {self.model_dir}: only PyTorch .bin/.pth weights found; factorllm-ds reads "
                            "safetensors. Re-save the model with "
                            "`model.save_pretrained(dir, safe_serialization=True)`.")
        raise UserError(f"{self.flag} {self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found.")

    def _header(self, shard: str) -> tuple[int, dict]:
        """(where the data starts, {tensor name: its header entry}) of a shard, once ``safe_open`` has
        validated it: offsets, dtypes and shapes consistent, and the data filling the file exactly
        (a truncated file is refused here, not when a tensor is read)."""
        path = self.model_dir / shard
        try:
            safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError
            raise UserError(f"{self.flag} {path}: unreadable safetensors file ({err}). It may be truncated or "
                            "corrupt; download it again.") from err
        with open(path, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        return 8 + header_len, header

    def _scan_shard(self, shard: str) -> None:
        data_start, header = self._header(shard)
        for name in sorted(header):  # safe_open's order, which names() keeps
            if self.weight_map.get(name) == shard:
                entry = header[name]
                self.infos[name] = TensorInfo(name, tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]])
                start, end = entry["data_offsets"]
                self._spans[name] = (data_start + start, data_start + end)

    def span(self, name: str) -> tuple[Path, int, int]:
        """(shard file, start, end): where tensor ``name``'s bytes lie, as absolute file offsets."""
        return (self.model_dir / self.weight_map[name], *self._spans[name])

    def names(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, materialized: its bytes are read once, straight into a new tensor (or ``out``).

        (``safe_open(...).get_tensor(...).clone()`` costs a page-faulting pass over a memory
        map plus a copy, and keeps the mapped pages resident meanwhile: about 5x slower.)
        ``out``, a contiguous CPU tensor of the same shape and dtype, lets a caller reuse one
        buffer for tensors of one shape (e.g. every layer's MLP), which keeps the allocator
        from piling up freed blocks.
        """
        tensor = self._read(name, out)
        if not self.allow_nonfinite:
            check_finite(f"{self.flag} {self.span(name)[0]}: tensor {name}", tensor, _NONFINITE_FIX)
        return tensor

    def _read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.infos[name]
        path, start, end = self.span(name)
        if out is not None and (tuple(out.shape) != info.shape or out.dtype != info.dtype
                                or not out.is_contiguous() or out.device.type != "cpu"):
            raise ValueError(f"get({name!r}, out=...): out must be a contiguous CPU tensor of shape {info.shape} "
                             f"and dtype {info.dtype}, not {tuple(out.shape)} {out.dtype}")
        tensor = torch.empty(info.shape, dtype=info.dtype, device="cpu") if out is None else out
        with open(path, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(_byte_view(tensor))
        if got != end - start:
            raise UserError(f"{self.flag} {path}: truncated safetensors file (tensor {name} ends at byte {end}, "
                            f"the file holds {start + got}). Download it again.")
        return tensor

    def check_finite(self, name: str, chunk_bytes: int = 64 << 20) -> None:
        """Raise :class:`UserError` if tensor ``name`` holds NaN/Inf, reading it in chunks (one chunk in memory).

        For tensors that are copied file to file and so never pass through :meth:`get`.
        Nothing is checked when ``allow_nonfinite`` is set, or for integer tensors.
        """
        info = self.infos[name]
        if self.allow_nonfinite or not info.dtype.is_floating_point:
            return
        path, start, end = self.span(name)
        size = info.dtype.itemsize
        step = max(size, chunk_bytes // size * size)
        buf = torch.empty(step // size, dtype=info.dtype, device="cpu")
        with open(path, "rb", buffering=0) as fh:
            for offset in range(start, end, step):
                n = min(step, end - offset)
                view = buf[: n // size]
                fh.seek(offset)
                if fh.readinto(_byte_view(view)) != n:
                    raise UserError(f"{self.flag} {path}: truncated safetensors file (tensor {name} ends at byte "
                                    f"{end}). Download it again.")
                if not bool(torch.isfinite(view).all()):
                    # The whole tensor, once, for the message's counts and first index.
                    check_finite(f"{self.flag} {path}: tensor {name}", self._read(name), _NONFINITE_FIX)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    def check_config(self, config: dict) -> None:
        """:func:`check_config_shapes` of this folder's config.json (``config``) against its weights."""
        check_config_shapes(config, self.infos, self.model_dir / "config.json", f"{self.flag} {self.model_dir}")


# ------------------------------------------------------------------------------------------------
# config.json against the weights' shapes: a config that does not fit its weights fails later in
# the middle of a conversion (KeyError, ValueError) or writes a folder that cannot load.

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
Dim = tuple[str, object]  # (what config.json says this dimension is, its value there)


def _config_dims(config: dict) -> tuple[dict[str, tuple[Dim, ...]], dict[str, tuple[Dim, ...]]]:
    """(global tensor name -> dims, per-layer suffix -> dims) as ``config`` (dense or FactorLLM) has them.

    Per-layer suffixes are in order of preference for naming a layer that is missing (its MLP first).
    """
    t = text_config(config)
    hidden, vocab, inter = (("hidden_size", t.get("hidden_size")), ("vocab_size", t.get("vocab_size")),
                            ("intermediate_size", t.get("intermediate_size")))
    heads, kv_heads, head_dim = t.get("num_attention_heads"), t.get("num_key_value_heads"), t.get("head_dim")
    kv_heads = heads if kv_heads is None else kv_heads
    derived = head_dim is None and _positive(hidden[1]) and _positive(heads)  # the families' default
    head = ("head_dim", hidden[1] // heads if derived else head_dim)
    head_said = f"head_dim {head[1]}" + (" (hidden_size / num_attention_heads)" if derived else "")
    q = (f"num_attention_heads {heads!r} x {head_said}", _product(heads, head[1]))
    kv = (f"num_key_value_heads {kv_heads!r} x {head_said}", _product(kv_heads, head[1]))
    def said(*names: str, default=None) -> Dim:  # FactorLLM's name first, then the standard MoE classes' (exports)
        return next(((n, config[n]) for n in names if config.get(n) is not None), (names[0], default))

    experts = said("num_experts", "num_local_experts")
    expert = said("expert_intermediate_size", "moe_intermediate_size")
    shared = said("shared_intermediate_size", "shared_expert_intermediate_size", default=0)

    def mlp(prefix: str, rows: Dim) -> dict[str, tuple[Dim, ...]]:
        return {f"{prefix}.{part}_proj.weight": part_shape(part, rows, hidden) for part in MLP_PARTS}

    layer = {**mlp("mlp", inter), "mlp.router.weight": (experts, hidden), "mlp.router.bias": (experts,),
             "mlp.gate.weight": (experts, hidden), "mlp.shared_expert_gate.weight": ((1, 1), hidden),
             **mlp("mlp.experts.*", expert), **mlp("mlp.shared_expert", shared),
             "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
             "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.bias": (hidden,), "self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,)}
    whole = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
             "model.norm.weight": (hidden,)}
    return whole, layer


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _product(a, b) -> int | None:
    return a * b if _positive(a) and _positive(b) else None


def _said(dim: Dim) -> str:
    """'hidden_size 96' or 'hidden_size (not set)': a dimension as config.json gives it."""
    label, value = dim
    if value is None:
        return f"{label} (not set, or not a number)"
    return f"{label} = {value}" if " x " in label else f"{label} {value!r}"


def _layer_problem(config: dict, names: list[str], layer_suffixes: list[str]) -> str | None:
    """config.json's num_hidden_layers against the layer indices the weights hold."""
    count = text_config(config).get("num_hidden_layers")
    held = sorted({int(m.group(1)) for m in map(_LAYER_NAME.fullmatch, names) if m})
    if (count is None and not held) or (_positive(count) and held == list(range(count))):
        return None
    span = f"{len(held)} layers ({held[0]}..{held[-1]})" if held else "no model.layers.* tensors"
    if not isinstance(count, int) or isinstance(count, bool):
        return f"num_hidden_layers {count!r} (not set, or not a number): the weights hold {span}"
    lacking = [i for i in range(count) if i not in held]
    if lacking:
        present = {m.group(2) for m in map(_LAYER_NAME.fullmatch, names) if m}
        suffix = next((s for s in layer_suffixes if s in present), "*")
        return (f"num_hidden_layers {count}: the weights hold {span}; the checkpoint lacks "
                f"model.layers.{lacking[0]}.{suffix}"
                + (f" (and {len(lacking) - 1} more layers)" if len(lacking) > 1 else ""))
    beyond = f"layer {count}" if held[-1] == count else f"layers {count}..{held[-1]}"
    return f"num_hidden_layers {count}: the weights hold {span}, so {beyond} lie beyond the config"


def config_shape_problems(config: dict, infos: dict[str, TensorInfo]) -> list[str]:
    """Where ``config`` (a dense or FactorLLM config.json) and the weights' shapes disagree: one line per config
    field (its value, what the weights say, the first tensor that says so), then the layer count.

    Only tensors of the supported LLaMA-family naming are compared; others are the callers' business.
    """
    whole, layer = _config_dims(config)
    found: dict[str, str] = {}  # field -> the first disagreement
    order = {name: i for i, name in enumerate(whole)}  # the embeddings first: they say hidden_size and vocab_size
    names = sorted(infos, key=lambda n: (int(m.group(1)) if (m := _LAYER_NAME.fullmatch(n)) else -1,
                                         order.get(n, len(order)), n))
    for name in names:
        m = _LAYER_NAME.fullmatch(name)
        suffix = m and ("mlp.experts.*." + m.group(2).split(".", 3)[-1] if _EXPERT_NAME.fullmatch(m.group(2))
                        else m.group(2))
        dims = whole.get(name) if m is None else layer.get(suffix)
        shape = list(infos[name].shape)
        if dims is None:
            continue
        if len(dims) != len(shape):
            found.setdefault(name, f"{name} has shape {shape}, where config.json implies {len(dims)} dimensions")
            continue
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if dim[1] != size:
                found.setdefault(dim[0], f"{_said(dim)}, but the weights say {size} ({name} is {shape}, "
                                         f"dimension {axis})")
    layers = _layer_problem(config, list(infos), list(layer))
    return _mirror_problems(config) + list(found.values()) + ([layers] if layers else [])


def _mirror_problems(config: dict) -> list[str]:
    """A FactorLLM config.json repeats some text_config fields at its top level; the two must agree."""
    inner = text_config(config)
    if inner is config:
        return []
    return [f"{name} {config[name]!r} at the top level, but text_config has {name} {inner.get(name)!r}"
            for name in ("vocab_size", "hidden_size", "num_hidden_layers")
            if name in config and config[name] != inner.get(name)]


def check_config_shapes(config: dict, infos: dict[str, TensorInfo], config_path: Path, where: str) -> None:
    """Raise one :class:`UserError` listing every :func:`config_shape_problems`; ``where`` names the input
    (``--model DIR``). Runs before any plan is made, so nothing is written."""
    problems = config_shape_problems(config, infos)
    if problems:
        raise UserError(f"{where}: {config_path} disagrees with the weights:\n  - " + "\n  - ".join(problems)
                        + "\n  Fix config.json, or use the config.json that came with these weights (an edited "
                          "config or one of another model does not fit them).")


def check_model_folder(model_dir: Path, flag: str = "--model", config: dict | None = None) -> dict:
    """What a command checks before it loads a model folder (returns its config.json): every shard the index
    names is there and readable (:class:`CheckpointReader`), and config.json fits the weights' shapes
    (:func:`check_config_shapes`). Without it a missing shard is a FileNotFoundError and a bad config a size
    mismatch or an IndexError deep in transformers."""
    config = read_config(model_dir, flag) if config is None else config
    CheckpointReader(model_dir, flag).check_config(config)
    return config


class StreamingSafetensorsWriter:
    """Writes a sharded safetensors checkpoint one tensor at a time, in a planned order.

    The plan (names, shapes, dtypes) is known before any data exists, so each shard's
    header is written first and tensor bytes are appended as they are produced: peak
    memory is one tensor, not one shard.
    """

    def __init__(self, out_dir: Path, plan: list[TensorInfo], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = self._assign_shards(plan, max_shard_bytes)
        self.weight_map = {info.name: shard_name for shard_name, infos in self.shards for info in infos}
        self._queue: Iterator[tuple[str, TensorInfo]] = ((s, i) for s, infos in self.shards for i in infos)
        self._handle = None
        self._current_shard: str | None = None
        self.bytes_written = 0

    @staticmethod
    def _assign_shards(plan: list[TensorInfo], max_shard_bytes: int) -> list[tuple[str, list[TensorInfo]]]:
        groups: list[list[TensorInfo]] = [[]]
        size = 0
        for info in plan:
            if groups[-1] and size + info.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
        n = len(groups)
        if n == 1:
            return [(SINGLE_FILE, groups[0])]
        return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def _start_shard(self, shard_name: str, infos: list[TensorInfo]) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in infos:
            header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
        self._handle = open(self.out_dir / shard_name, "wb")
        self._handle.write(struct.pack("<Q", len(blob)))
        self._handle.write(blob)
        self._current_shard = shard_name

    def _advance(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorInfo:
        """Check that ``name`` is the plan's next tensor and open its shard if needed."""
        shard_name, info = next(self._queue)
        if name != info.name or tuple(shape) != info.shape or dtype != info.dtype:
            raise RuntimeError(f"internal error: writer expected {info} next, got {name} {tuple(shape)} {dtype}")
        if shard_name != self._current_shard:
            self._start_shard(shard_name, dict(self.shards)[shard_name])
        return info

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self._advance(name, tensor.shape, tensor.dtype)
        # Written from the tensor's own memory: a bytes() copy would double the peak.
        self._handle.write(_byte_view(tensor.detach().cpu().contiguous()))
        self.bytes_written += info.nbytes

    def copy_from(self, reader: CheckpointReader, name: str) -> None:
        """Append tensor ``name`` of ``reader`` unchanged, file to file: it is never held in memory here.

        Its values are checked for NaN/Inf first, a chunk at a time (``reader.check_finite``).
        """
        reader.check_finite(name)
        src = reader.infos[name]
        info = self._advance(name, src.shape, src.dtype)
        path, start, end = reader.span(name)
        self._handle.flush()  # the bytes go to the file descriptor, behind the buffer
        with open(path, "rb") as fh:
            _copy_range(fh.fileno(), self._handle.fileno(), start, end - start, path)
        self.bytes_written += info.nbytes

    def discard(self) -> None:
        """Close the open shard after a failure, without close()'s checks (a full disk may refuse its last bytes)."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None

    def close(self) -> None:
        leftover = next(self._queue, None)
        if leftover is not None:
            raise RuntimeError(f"internal error: writer closed before {leftover[1].name} was written")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(i.nbytes for _, g in self.shards for i in g)},
                     "weight_map": self.weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, src_path: Path) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``'s current position.

    ``os.copy_file_range`` keeps the bytes in the kernel (no trip through user memory); where
    it is missing or refuses the pair of files, a bounded ``pread``/``write`` loop does it.
    """
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, offset)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                fast = False
                continue
        else:
            chunk = memoryview(os.pread(src_fd, min(count, 16 << 20), offset))
            n = len(chunk)
            while chunk:
                chunk = chunk[os.write(dst_fd, chunk):]
        if n == 0:
            raise UserError(f"{src_path}: truncated safetensors file (ends before byte {offset + count}). "
                            "Download it again.")
        offset += n
        count -= n


def _byte_view(tensor: torch.Tensor):
    """The contiguous tensor's bytes as a writable buffer sharing its memory (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src``; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return copied


class FolderWriter:
    """One output model folder: the tensors of ``plan`` streamed into shards (with a progress bar
    by bytes written), then whatever the caller adds under ``path``, then a manifest.

    It is built in the hidden sibling ``outputs.temp_dir_for(out)``, its marker written first, and
    moved to ``out`` only when the ``with`` body succeeds (``outputs.move_into_place``: never over a
    folder another process made meanwhile): a failed or interrupted run leaves nothing at ``out``,
    and a folder being overwritten stays until the new one is complete. ``out`` is checked with
    ``outputs.check_output`` (``inputs``: every path the command reads, by flag) on entry and again
    before the move: ``--overwrite`` replaces only a folder this tool wrote, holding nothing its
    manifest does not list, and holding and inside no input. The file system must have room for the
    planned tensors; a disk that fills up anyway is one UserError naming ``--out``. On entry, this
    ``out``'s temp folders that dead processes of this host provably left are removed, and a
    replacement of ``out`` that such a process left half done is finished
    (``outputs.recover_replaced``). ``manifest`` takes the command's own fields; the list of the files
    written is added at the end.
    """

    def __init__(self, out: Path, plan: list[TensorInfo], max_shard_bytes: int, *, command: str,
                 overwrite: bool = False, progress: bool = True, desc: str | None = None,
                 inputs: dict[str, Path] | None = None,
                 shard_writer: type[StreamingSafetensorsWriter] = StreamingSafetensorsWriter):
        self.out, self.overwrite, self.inputs = Path(out), overwrite, dict(inputs or {})
        self.path = temp_dir_for(self.out)
        self.shards = shard_writer(self.path, plan, max_shard_bytes)
        self.manifest: dict = {"factorllm_ds_version": __version__, "command": command}
        self.needed = sum(i.nbytes for i in plan)  # bytes the shards will take (the rest is small)
        self._bar_args = dict(total=self.needed, unit="B", unit_scale=True, desc=desc or command, disable=not progress)

    def _check(self) -> None:
        check_output(self.out, "--out", self.overwrite, self.inputs, (MANIFEST_FILE,), inventory=MANIFEST_FILE)

    def __enter__(self) -> FolderWriter:
        recover_replaced(self.out)  # before the check: a restored `out` is what --overwrite would replace
        self._check()
        check_free_space(self.out, self.needed, "--out")
        remove_stale_temps(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            make_marked_dir(self.out)
        except OSError as err:
            self._reword(err)
            raise
        self._started = time.time()
        self._bar = tqdm(**self._bar_args)
        return self

    def copy(self, reader: CheckpointReader, name: str) -> None:
        """Tensor ``name`` of ``reader``, unchanged, file to file (checked for NaN/Inf on the way)."""
        self.shards.copy_from(reader, name)
        self._bar.update(reader.infos[name].nbytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The plan's next tensor."""
        self.shards.write(name, tensor)
        self._bar.update(tensor.nbytes)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        try:
            if exc is None:
                self._finish()
        except BaseException as err:
            self._discard()
            self._reword(err)
            raise
        self._discard()  # gone already when the move succeeded
        if exc is not None:
            self._reword(exc)

    def _finish(self) -> None:
        self.shards.close()
        written = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                         if (p.is_file() or p.is_symlink()) and p.name != TEMP_MARKER)
        self.manifest.update(bytes_written=self.shards.bytes_written, seconds=round(time.time() - self._started, 3),
                             python=platform.python_version(), torch=torch.__version__,
                             **{INVENTORY_KEY: sorted([*written, MANIFEST_FILE])})
        (self.path / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))
        (self.path / TEMP_MARKER).unlink()  # the marker proves the temp folder, it does not move in with it
        if self.overwrite:
            self._check()  # what --overwrite will replace may have changed while this command worked
        move_into_place(self.path, self.out, self.overwrite)

    def _discard(self) -> None:
        self.shards.discard()
        shutil.rmtree(self.path, ignore_errors=True)

    def _reword(self, err: BaseException) -> None:
        """A full disk, once the partial output is gone: one UserError naming --out and the space needed."""
        if is_disk_full(err):
            raise disk_full_error("--out", self.out, self.needed) from err
