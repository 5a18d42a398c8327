"""Training data through `datasets`: load, tokenize with the model's tokenizer, pack, shard.

Sample order is a pure function of (seed, sample number), so every rank knows its share
of any step without communication and a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factorllm_ds.errors import UserError

LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet", ".csv": "csv"}


def load_texts(sources: list[str], flag: str) -> list[str]:
    """Documents from local text/jsonl/json/parquet/csv files, or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    docs: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            raise UserError(f"{flag} {source}: is a folder; pass data files (.txt, .jsonl, .parquet, .csv)")
        if path.exists():
            builder = LOADERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"{flag} {source}: unknown file type {path.suffix!r}; "
                                f"use one of {sorted(LOADERS)}")
            if path.stat().st_size == 0:
                raise UserError(f"{flag} {source}: the file is empty")
            # A plain text file is one document: splitting it into lines would put an EOS between lines.
            extra = {"sample_by": "document"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **extra)
            except Exception as err:
                raise UserError(f"{flag} {source}: could not read it as {builder} ({err})") from err
        elif "/" in source and not source.startswith((".", "/")):
            try:
                ds = datasets.load_dataset(source, split="train")
            except Exception as err:
                raise UserError(f"{flag} {source}: not a local file, and loading it as a hub dataset failed "
                                f"({type(err).__name__}: {err}). Offline machines must pass local files.") from err
        else:
            raise UserError(f"{flag} {source}: no such file")
        if "text" not in ds.column_names:
            raise UserError(f"{flag} {source}: no 'text' column (columns: {ds.column_names})")
        docs.extend(t for t in ds["text"] if t)
    return docs


def tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Concatenate tokenized documents (EOS between them) and cut [N, seq_len] windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for toks in tokenizer(docs[start:start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(toks)
            if eos is not None:
                ids.append(eos)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len), len(ids)


@dataclass
class PackedData:
    train: np.ndarray  # [N, seq_len]
    eval: np.ndarray | None  # [M, seq_len]
    train_tokens: int


def prepare(data: list[str], eval_data: list[str] | None, tokenizer, seq_len: int,
            eval_fraction: float) -> PackedData:
    train, total = tokenize_and_pack(load_texts(data, "--data"), tokenizer, seq_len)
    if len(train) == 0:
        raise UserError(f"--data {' '.join(data)}: {total} tokens, fewer than one --seq-len {seq_len} window. "
                        "Give more text or a smaller --seq-len.")
    held = None
    if eval_data:
        held, total_eval = tokenize_and_pack(load_texts(eval_data, "--eval-data"), tokenizer, seq_len)
        if len(held) == 0:
            raise UserError(f"--eval-data: {total_eval} tokens, fewer than one --seq-len {seq_len} window")
    elif eval_fraction > 0 and len(train) >= 2:
        n_eval = max(1, int(len(train) * eval_fraction))
        train, held = train[:-n_eval], train[-n_eval:]
    return PackedData(train, held, int(train.size))


class Sampler:
    """Global sample s -> window id, reshuffled every epoch with a seeded permutation."""

    def __init__(self, num_windows: int, seed: int):
        self.n = num_windows
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def window(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][pos])


def micro_batch(data: np.ndarray, sampler: Sampler, step: int, micro: int, rank: int, world: int,
                micro_bs: int, accum: int) -> torch.Tensor:
    """This rank's micro-batch ``micro`` of optimizer step ``step``: [micro_bs, seq_len]."""
    global_bs = micro_bs * world * accum
    first = step * global_bs + (micro * world + rank) * micro_bs
    return torch.from_numpy(np.stack([data[sampler.window(first + b)] for b in range(micro_bs)]))
