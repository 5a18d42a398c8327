"""Hugging Face checkpoint folders: config, shard index, lazy tensor reads, streamed writes.

Reads never load a whole shard: every tensor is fetched on its own, its bytes read straight
into a fresh tensor at the offset its shard's header gives (``safe_open`` validates each
shard once, up front), so a conversion holds about one layer at a time. Writes go through
:class:`StreamingSafetensorsWriter`, which lays out every shard's header from a plan
made up front and then appends each tensor's bytes the moment it is produced; a
:class:`FolderWriter` wraps it into a whole output folder that appears only when complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
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
from factorllm_ds.layout import MANIFEST_FILE
from factorllm_ds.safety import check_finite, check_output, old_dir_for, recover_replaced, remove_stale_temps, temp_dir_for

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


def load_tokenizer(model_dir: Path, tokenizer: Path | None = None, flag: str = "--model"):
    """``AutoTokenizer`` of :func:`tokenizer_dir`, any failure one :class:`UserError` naming the folder."""
    from transformers import AutoTokenizer

    folder = tokenizer_dir(model_dir, tokenizer, flag)
    named = "--tokenizer" if tokenizer is not None else flag
    try:
        # A converted folder's config.json names remote code (auto_map): without trust_remote_code=False
        # transformers stops at an interactive prompt to load a tokenizer that needs none.
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer
        raise UserError(f"{named} {folder}: the tokenizer files there cannot be loaded ({type(err).__name__}: "
                        f"{err}). Copy the base model's tokenizer files in, or pass --tokenizer DIR.") from err


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
        return math.prod(self.shape) * self.dtype.itemsize


_NONFINITE_FIX = ("The checkpoint is damaged or was saved after a diverged run; use another copy, or pass "
                  "--allow-nonfinite to convert it anyway.")


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
                            "safetensors. Re-save the model with `model.save_pretrained(dir, safe_serialization=True)`.")
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
        tensor = torch.empty(info.shape, dtype=info.dtype) if out is None else out
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
        buf = torch.empty(step // size, dtype=info.dtype)
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

    It is built in the hidden sibling ``safety.temp_dir_for(out)`` and renamed to ``out`` only
    when the ``with`` body succeeds: a failed or interrupted run leaves nothing at ``out``, and a
    folder being overwritten stays until the new one is complete. ``out`` is checked with
    ``safety.check_output`` (``inputs``: the command's input paths by flag): ``--overwrite``
    replaces only a folder this tool wrote, holding and inside no input. On entry, the temp
    folders of dead processes in ``out``'s parent are removed, and a replacement of ``out`` that
    a dead process left half done is finished (``safety.recover_replaced``). ``manifest`` takes
    the command's own fields.
    """

    def __init__(self, out: Path, plan: list[TensorInfo], max_shard_bytes: int, *, command: str,
                 overwrite: bool = False, progress: bool = True, desc: str | None = None,
                 inputs: dict[str, Path] | None = None,
                 shard_writer: type[StreamingSafetensorsWriter] = StreamingSafetensorsWriter):
        self.out, self.overwrite, self.inputs = Path(out), overwrite, dict(inputs or {})
        self.path = temp_dir_for(self.out)
        self.shards = shard_writer(self.path, plan, max_shard_bytes)
        self.manifest: dict = {"factorllm_ds_version": __version__, "command": command}
        self._bar_args = dict(total=sum(i.nbytes for i in plan), unit="B", unit_scale=True, desc=desc or command,
                              disable=not progress)

    def __enter__(self) -> "FolderWriter":
        recover_replaced(self.out)  # before the check: a restored `out` is what --overwrite would replace
        check_output(self.out, "--out", self.overwrite, self.inputs, (MANIFEST_FILE,))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out.parent)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
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

    def __exit__(self, exc_type, *_) -> None:
        self._bar.close()
        try:
            if exc_type is not None:
                return
            self.shards.close()
            self.manifest.update(bytes_written=self.shards.bytes_written, seconds=round(time.time() - self._started, 3),
                                 python=platform.python_version(), torch=torch.__version__)
            (self.path / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))
            self._move_in()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)  # gone already when the rename succeeded

    def _move_in(self) -> None:
        # Two renames, never a moment where a crash loses the previous `out`: it is parked under a
        # name that says which process parked it, and recover_replaced() puts it back if that
        # process dies before the new folder is in place.
        old = old_dir_for(self.out)
        if self.out.exists():
            self.out.rename(old)
        try:
            self.path.rename(self.out)
        except BaseException:
            if old.exists() and not self.out.exists():
                old.rename(self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)
