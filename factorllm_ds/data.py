"""Text for every command: one file reader, then tokenize, pack and shard for training.

``--data``/``--eval-data`` (train), ``--data`` (eval) and ``--calib-data`` (convert) all read
files through :func:`read_documents`, so they accept the same formats and fail with the same
errors. Training may also name a Hugging Face hub dataset instead of a file.

Sample order is a pure function of (seed, sample number), so every rank knows its share
of any step without communication and a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factorllm_ds.errors import UserError

# suffix -> layout. A plain text file is one document (splitting it into lines would put an
# EOS between lines); the other layouts hold one document per 'text' entry.
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet", ".csv": "csv"}
FORMATS_HELP = ".txt/.text/.md (plain text), .jsonl/.json (a 'text' field), .parquet/.csv (a 'text' column)"


def read_documents(path: str | Path, flag: str) -> list[str]:
    """The non-empty documents of one local file, in file order."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass data files ({FORMATS_HELP})")
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    layout = FORMATS.get(path.suffix.lower())
    if layout is None:
        raise UserError(f"{flag} {path}: unknown file type {path.suffix!r}; use one of {FORMATS_HELP}")
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"{flag} {path}: the file is empty; pass a file that holds text")
    text = _decode(raw, path, flag) if layout != "parquet" else None
    if layout == "text":
        # Universal newlines, as open() in text mode (and `datasets`' text loader) reads them.
        docs = [text.replace("\r\n", "\n").replace("\r", "\n")]
    elif layout == "json":
        docs = _json_documents(text, path, flag)
    else:
        docs = _column_documents(raw, layout, path, flag)
    docs = [doc for doc in docs if doc]
    if not docs:
        raise UserError(f"{flag} {path}: no text in it (every 'text' entry is empty); pass a file that holds text")
    return docs


def read_text(paths: str | Path | Sequence[str | Path], flag: str) -> str:
    """One string for perplexity or calibration: a file's documents joined by a newline, files by a blank line."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return "\n\n".join("\n".join(read_documents(path, flag)) for path in paths)


def _decode(raw: bytes, path: Path, flag: str) -> str:
    """UTF-8 text, or one error: a binary file must not turn into replacement characters."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        problem = f"a NUL byte at byte {nul}"
    else:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"{err.reason} at byte {err.start}"
    raise UserError(f"{flag} {path}: not UTF-8 text ({problem}), a binary file? Pass text as {FORMATS_HELP}.")


def _json_documents(text: str, path: Path, flag: str) -> list[str | None]:
    """The 'text' fields of JSON Lines, or of a JSON array of objects (both as `datasets` reads them)."""
    if text.lstrip().startswith("["):
        where = "entry"
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as err:
            raise UserError(f"{flag} {path}: not valid JSON ({err}); pass an array of objects with a 'text' "
                            "field, or JSON Lines.") from err
    else:
        where, rows = "line", []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{flag} {path}: line {i} is not valid JSON ({err}); each line must be one "
                                    "JSON object with a 'text' field.") from err
    docs = []
    for i, row in rows:
        if not isinstance(row, dict) or "text" not in row:
            raise UserError(f"{flag} {path}: {where} {i} is not a JSON object with a 'text' field; give every "
                            f"{where} one, e.g. {{\"text\": \"...\"}}.")
        if row["text"] is not None and not isinstance(row["text"], str):
            raise UserError(f"{flag} {path}: {where} {i}: 'text' is a {type(row['text']).__name__}, "
                            "not a string.")
        docs.append(row["text"])
    return docs


def _column_documents(raw: bytes, layout: str, path: Path, flag: str) -> list[str | None]:
    """The 'text' column of a parquet or CSV file (a CSV file checked by ``_decode`` first)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if layout == "parquet":
            table = pa.parquet.read_table(pa.BufferReader(raw))
        else:  # a 'text' column of digits must stay text
            table = pa.csv.read_csv(pa.BufferReader(raw), convert_options=pa.csv.ConvertOptions(
                column_types={"text": pa.string()}))
    except pa.ArrowException as err:
        raise UserError(f"{flag} {path}: could not read it as {layout} ({err}).") from err
    if "text" not in table.column_names:
        raise UserError(f"{flag} {path}: no 'text' column (columns: {table.column_names}); name the column "
                        "that holds the text 'text'.")
    kind = table.schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{flag} {path}: the 'text' column holds {kind}, not strings.")
    return table.column("text").to_pylist()


def load_documents(sources: list[str], flag: str) -> list[str]:
    """Training documents: local files (see :data:`FORMATS`) or Hugging Face hub dataset names."""
    docs: list[str] = []
    for source in sources:
        hub = not Path(source).exists() and "/" in source and not source.startswith((".", "/"))
        docs += _hub_documents(source, flag) if hub else read_documents(source, flag)
    return docs


def _hub_documents(name: str, flag: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise UserError(f"{flag} {name}: not a local file, and loading it as a hub dataset failed "
                        f"({type(err).__name__}: {err}). Offline machines must pass local files.") from err
    if "text" not in ds.column_names:
        raise UserError(f"{flag} {name}: no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate tokenized documents (EOS after each) and cut [N, seq_len] windows; also the token count."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for toks in tokenizer(docs[start:start + batch], add_special_tokens=False)["input_ids"]:
            ids += toks + eos
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len), len(ids)


DATA_MIXES = ("concat", "equal")


@dataclass
class PackedData:
    train: np.ndarray  # [N, seq_len]
    eval: np.ndarray | None  # [M, seq_len]
    train_tokens: int
    # --data-mix equal: how many of ``train``'s windows (in order) came from each --data source; None: one stream
    sources: list[int] | None = None


def _split_eval(windows: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The last ``eval_fraction`` of the windows (at least one, when there are two) held out."""
    if eval_fraction > 0 and len(windows) >= 2:
        n_eval = max(1, int(len(windows) * eval_fraction))
        return windows[:-n_eval], windows[-n_eval:]
    return windows, None


def prepare(data: list[str], eval_data: list[str] | None, tokenizer, seq_len: int,
            eval_fraction: float, mix: str = "concat") -> PackedData:
    """Training (and held-out) windows of ``data``. ``mix`` ``concat``: the sources are one stream, each sampled
    in proportion to its size; ``equal``: each source is packed and held out on its own (the last
    ``eval_fraction`` of each), and :func:`make_sampler` draws the same number of windows from each."""
    if mix not in DATA_MIXES:
        raise UserError(f"--data-mix {mix}: expected one of {', '.join(DATA_MIXES)}.")
    held = None
    if eval_data:
        held, total_eval = tokenize_and_pack(load_documents(eval_data, "--eval-data"), tokenizer, seq_len)
        if len(held) == 0:
            raise UserError(f"--eval-data: {total_eval} tokens, fewer than one --seq-len {seq_len} window")
    if mix == "concat" or len(data) == 1:
        train, total = tokenize_and_pack(load_documents(data, "--data"), tokenizer, seq_len)
        if len(train) == 0:
            raise UserError(f"--data {' '.join(data)}: {total} tokens, fewer than one --seq-len {seq_len} window. "
                            "Give more text or a smaller --seq-len.")
        if held is None:
            train, held = _split_eval(train, eval_fraction)
        return PackedData(train, held, int(train.size))
    if len(set(data)) != len(data):
        raise UserError(f"--data {' '.join(data)}: a source is named twice; with --data-mix equal each source is "
                        "one share of the mix. Name each once.")
    trains, helds = [], []
    for source in data:
        windows, total = tokenize_and_pack(load_documents([source], "--data"), tokenizer, seq_len)
        own_held = None if held is not None else _split_eval(windows, eval_fraction)[1]
        train_part = windows if own_held is None else windows[:len(windows) - len(own_held)]
        if len(train_part) == 0:
            raise UserError(f"--data {source}: {total} tokens, {len(windows)} --seq-len {seq_len} window(s) and none "
                            "left to train on after the held-out share; with --data-mix equal every source needs "
                            "its own training windows. Give it more text, or a smaller --seq-len or --eval-fraction.")
        trains.append(train_part)
        if own_held is not None:
            helds.append(own_held)
    train = np.concatenate(trains)
    return PackedData(train, held if held is not None else (np.concatenate(helds) if helds else None),
                      int(train.size), [len(t) for t in trains])


class Sampler:
    """Global sample s -> window id, reshuffled every epoch with a seeded permutation."""

    def __init__(self, num_windows: int, seed: int):
        self.n, self.seed = num_windows, seed
        self._perms: dict[int, np.ndarray] = {}

    def window(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][pos])


class MixSampler:
    """Global sample s -> window id, taking the sources in turn (s mod n): an equal number of windows from each,
    each source reshuffled every one of its own epochs. A pure function of s, as :class:`Sampler`."""

    def __init__(self, counts: list[int], seed: int):
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        self.samplers = [Sampler(c, seed * 1000003 + i) for i, c in enumerate(counts)]

    def window(self, sample: int) -> int:
        source, turn = sample % len(self.samplers), sample // len(self.samplers)
        return self.offsets[source] + self.samplers[source].window(turn)


def make_sampler(packed: PackedData, seed: int) -> Sampler | MixSampler:
    """The sampler of ``packed``'s training windows: one stream, or the sources in equal shares."""
    return Sampler(len(packed.train), seed) if packed.sources is None else MixSampler(packed.sources, seed)


def micro_batch(data: np.ndarray, sampler: Sampler | MixSampler, step: int, micro: int, rank: int, world: int,
                micro_bs: int, accum: int) -> torch.Tensor:
    """This rank's micro-batch ``micro`` of optimizer step ``step``: [micro_bs, seq_len]."""
    global_bs = micro_bs * world * accum
    first = step * global_bs + (micro * world + rank) * micro_bs
    return torch.from_numpy(np.stack([data[sampler.window(first + b)] for b in range(micro_bs)]))
