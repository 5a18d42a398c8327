"""Hugging Face checkpoint folders: config, shard index, lazy tensor reads, streamed writes.

Reads never load a whole shard: every tensor is fetched on its own through ``safe_open``
(memory-mapped), so a conversion holds about one layer at a time. Writes go through
:class:`StreamingSafetensorsWriter`, which lays out every shard's header from a plan
made up front and then appends each tensor's bytes the moment it is produced.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from factorllm_ds.errors import UserError

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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class CheckpointReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path, flag: str = "--model"):
        self.model_dir = Path(model_dir)
        self.flag = flag
        self.weight_map = self._weight_map()
        self.infos: dict[str, TensorInfo] = {}
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
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            with self._open(SINGLE_FILE) as f:
                return {name: SINGLE_FILE for name in f.keys()}
        if any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pth")):
            raise UserError(f"{self.flag} {self.model_dir}: only PyTorch .bin/.pth weights found; factorllm-ds reads "
                            "safetensors. Re-save the model with `model.save_pretrained(dir, safe_serialization=True)`.")
        raise UserError(f"{self.flag} {self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found.")

    @contextmanager
    def _open(self, shard: str):
        path = self.model_dir / shard
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError
            raise UserError(f"{self.flag} {path}: unreadable safetensors file ({err}). It may be truncated or "
                            "corrupt; download it again.") from err
        try:
            yield handle
        finally:
            del handle

    def _scan_shard(self, shard: str) -> None:
        path = self.model_dir / shard
        with self._open(shard) as f:
            for name in f.keys():
                if self.weight_map.get(name) != shard:
                    continue
                sl = f.get_slice(name)
                self.infos[name] = TensorInfo(name, tuple(sl.get_shape()), TORCH_DTYPES[sl.get_dtype()])
        self._check_size(path)

    def _check_size(self, path: Path) -> None:
        # safe_open maps lazily, so a truncated file only fails when a tensor is read:
        # compare the header's end offset with the file size up front instead.
        with open(path, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        actual = path.stat().st_size
        if actual < 8 + header_len + end:
            raise UserError(f"{self.flag} {path}: truncated safetensors file ({actual} bytes, header says "
                            f"{8 + header_len + end}). Download it again.")

    def names(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, materialized (a copy: the memory map is released on return)."""
        with self._open(self.weight_map[name]) as f:
            return f.get_tensor(name).clone()

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())


class StreamingSafetensorsWriter:
    """Writes a sharded safetensors checkpoint one tensor at a time, in a planned order.

    The plan (names, shapes, dtypes) is known before any data exists, so each shard's
    header is written first and tensor bytes are appended as they are produced: peak
    memory is one tensor, not one shard.
    """

    def __init__(self, out_dir: Path, plan: list[TensorInfo], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = self._assign_shards(plan, max_shard_bytes)
        self.weight_map: dict[str, str] = {}
        for shard_name, infos in self.shards:
            for info in infos:
                self.weight_map[info.name] = shard_name
        self._queue: Iterator[tuple[str, TensorInfo]] = self._expected()
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

    def _expected(self) -> Iterator[tuple[str, TensorInfo]]:
        for shard_name, infos in self.shards:
            for info in infos:
                yield shard_name, info

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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_name, info = next(self._queue)
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(f"internal error: writer expected {info} next, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if shard_name != self._current_shard:
            self._start_shard(shard_name, dict(self.shards)[shard_name])
        data = tensor.detach().contiguous().cpu()
        self._handle.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self.bytes_written += info.nbytes

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


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool, flag: str = "--out"):
    """Yield a temporary sibling folder; rename it to ``out`` only if the body succeeds.

    An interrupted or failed run leaves nothing at ``out`` (the partial folder is removed).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} already exists. Choose another path or pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
