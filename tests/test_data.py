"""data.py: one reader for --data, --eval-data and --calib-data; packing, sampling, sharding.

Every accepted format is written as a small file and read back (text and tokens, with the real
32k LLaMA tokenizer); every bad file fails with one UserError naming the flag and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest

from factorllm_ds import data
from factorllm_ds.data import (
    FORMATS,
    MixSampler,
    Sampler,
    load_documents,
    make_sampler,
    micro_batch,
    prepare,
    read_documents,
    read_text,
    tokenize_and_pack,
)
from factorllm_ds.errors import UserError

DOCS = ["The first document, with a comma.", "Second: \"quoted\" and ünïcode.", "Third\nspans two lines."]


def _jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def _json_array(path: Path, docs: list[str]) -> None:
    path.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")


def _parquet(path: Path, docs: list[str]) -> None:
    pa.parquet.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path)


def _csv(path: Path, docs: list[str]) -> None:
    pa.csv.write_csv(pa.table({"id": list(range(len(docs))), "text": docs}), path)


# name -> (file name, writer); the plain text formats hold the whole file as one document.
WRITERS = {
    "jsonl": ("d.jsonl", _jsonl),
    "json_lines": ("d.json", _jsonl),
    "json_array": ("d.json", _json_array),
    "parquet": ("d.parquet", _parquet),
    "csv": ("d.csv", _csv),
}
PLAIN = ("d.txt", "d.text", "d.md")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _ids(tokenizer, docs: list[str]) -> list[int]:
    """The training token stream: each document's tokens, then EOS."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


# ----------------------------------------------------------------------------- formats


def test_every_suffix_is_covered_here_and_in_the_help():
    assert {name for name, _ in WRITERS.values()} | set(PLAIN) == {f"d{suffix}" for suffix in FORMATS}
    assert all(suffix in data.FORMATS_HELP for suffix in FORMATS)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_documents_of_each_format(fmt, tmp_path, tokenizer):
    name, write = WRITERS[fmt]
    path = tmp_path / name
    write(path, DOCS)
    assert read_documents(path, "--data") == DOCS
    assert read_text(path, "--calib-data") == "\n".join(DOCS)  # one file: documents joined by a newline
    assert load_documents([str(path)], "--data") == DOCS
    windows, total = tokenize_and_pack(load_documents([str(path)], "--data"), tokenizer, seq_len=4)
    want = _ids(tokenizer, DOCS)
    assert total == len(want) and windows.reshape(-1).tolist() == want[: len(want) // 4 * 4]


@pytest.mark.parametrize("name", PLAIN)
def test_plain_text_is_one_document_with_universal_newlines(name, tmp_path, tokenizer):
    path = tmp_path / name
    path.write_bytes("Line one.\r\nLine two.\rLine thrée.\n".encode())
    text = "Line one.\nLine two.\nLine thrée.\n"
    assert read_documents(path, "--data") == [text]
    assert read_text([path], "--data") == text
    windows, total = tokenize_and_pack(load_documents([str(path)], "--data"), tokenizer, seq_len=2)
    assert total == len(_ids(tokenizer, [text]))  # one EOS: the lines are not split into documents


def test_empty_entries_are_skipped_and_files_join_with_a_blank_line(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": null}\n{"text": "two"}\n')
    b.write_text("three")
    assert read_documents(a, "--data") == ["one", "two"]
    assert read_text([a, b], "--data") == "one\ntwo\n\nthree"
    assert load_documents([str(a), str(b)], "--data") == ["one", "two", "three"]


def test_csv_text_of_digits_stays_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\n123\n4.5\n")
    assert read_documents(path, "--data") == ["123", "4.5"]


def test_the_three_flags_share_one_reader():
    from factorllm_ds import calibration, evaluate

    assert calibration.read_text is read_text and evaluate.read_text is read_text


# ----------------------------------------------------------------------------- errors


def _error(path: Path, flag: str = "--calib-data") -> str:
    with pytest.raises(UserError) as err:
        read_documents(path, flag)
    msg = str(err.value)
    assert msg.startswith(f"{flag} {path}: "), msg
    return msg


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.txt")


def test_folder(tmp_path):
    assert "is a folder" in _error(tmp_path)


def test_unknown_suffix_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "d.docx"
    path.write_text("text")
    msg = _error(path, "--data")
    assert "unknown file type '.docx'" in msg and all(suffix in msg for suffix in FORMATS), msg


@pytest.mark.parametrize("name", ["d.txt", "d.jsonl", "d.parquet", "d.csv"])
def test_empty_file(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"")
    assert "the file is empty" in _error(path, "--eval-data")


def test_file_of_only_empty_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n')
    assert "no text in it" in _error(path)


def test_jsonl_line_without_text_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
    assert "line 3 is not a JSON object with a 'text' field" in _error(path)


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    assert "line 2 is not valid JSON" in _error(path, "--data")


def test_jsonl_text_that_is_not_a_string(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 3}\n')
    assert "line 1: 'text' is a int, not a string" in _error(path)


def test_json_array_entry_without_text_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "ok"}, ["no"]]')
    assert "entry 2 is not a JSON object with a 'text' field" in _error(path)


@pytest.mark.parametrize("name,raw,where", [
    ("d.txt", b"text\x00\x01\x02 more", "a NUL byte at byte 4"),
    ("d.md", "café au lait".encode("latin-1"), "invalid continuation byte at byte 3"),
    ("d.jsonl", b'{"text": "\xff"}\n', "invalid start byte at byte 10"),
    ("d.csv", b"text\n\xc3\x28\n", "invalid continuation byte at byte 5"),
])
def test_binary_file_is_one_clear_error(name, raw, where, tmp_path):
    path = tmp_path / name
    path.write_bytes(raw)
    msg = _error(path, "--data")
    assert f"not UTF-8 text ({where}" in msg and "binary" in msg and "\ufffd" not in msg, msg


def test_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PK\x03\x04 a zip file")
    assert "could not read it as parquet" in _error(path)


@pytest.mark.parametrize("name,write", [("d.parquet", pa.parquet.write_table), ("d.csv", pa.csv.write_csv)])
def test_table_without_text_column(name, write, tmp_path):
    path = tmp_path / name
    write(pa.table({"body": ["a", "b"]}), path)
    assert "no 'text' column (columns: ['body'])" in _error(path)


def test_parquet_text_column_of_numbers(tmp_path):
    path = tmp_path / "d.parquet"
    pa.parquet.write_table(pa.table({"text": [1, 2]}), path)
    assert "the 'text' column holds int64, not strings" in _error(path)


def test_training_names_the_flag_of_the_bad_file(tmp_path, tokenizer):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("word " * 200)
    bad.write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match=f"^--eval-data {bad}: not UTF-8 text"):
        prepare([str(good)], [str(bad)], tokenizer, seq_len=16, eval_fraction=0.0)
    with pytest.raises(UserError, match=f"^--data {tmp_path / 'missing.txt'}: no such file"):
        prepare([str(tmp_path / "missing.txt")], None, tokenizer, seq_len=16, eval_fraction=0.0)


# ----------------------------------------------------------------------------- packing


def test_packed_windows_cover_the_tokens_in_order(calib_text, tokenizer):
    docs = load_documents([str(calib_text)], "--data")
    want = _ids(tokenizer, docs)
    windows, total = tokenize_and_pack(docs, tokenizer, seq_len=64)
    assert total == len(want) and windows.dtype == np.int64
    assert windows.shape == (len(want) // 64, 64)
    assert windows.reshape(-1).tolist() == want[: windows.size]  # only the short tail is dropped


def test_eos_between_documents(tokenizer):
    windows, total = tokenize_and_pack(["a b c", "d e f"], tokenizer, seq_len=1)
    stream = windows[:, 0].tolist()
    assert total == len(stream) and stream.count(tokenizer.eos_token_id) == 2 and stream[-1] == tokenizer.eos_token_id


def test_prepare_holds_out_the_last_windows(calib_text, tokenizer):
    full, _ = tokenize_and_pack(load_documents([str(calib_text)], "--data"), tokenizer, seq_len=64)
    packed = prepare([str(calib_text)], None, tokenizer, seq_len=64, eval_fraction=0.1)
    n_eval = int(len(full) * 0.1)
    assert n_eval >= 1 and len(packed.eval) == n_eval and len(packed.train) == len(full) - n_eval
    assert np.array_equal(np.concatenate([packed.train, packed.eval]), full)
    assert packed.train_tokens == packed.train.size


def test_prepare_with_eval_data_keeps_all_of_data(calib_text, tmp_path, tokenizer):
    held = tmp_path / "held.jsonl"
    _jsonl(held, ["held-out text " * 20])
    packed = prepare([str(calib_text)], [str(held)], tokenizer, seq_len=32, eval_fraction=0.5)
    full, _ = tokenize_and_pack(load_documents([str(calib_text)], "--data"), tokenizer, seq_len=32)
    assert np.array_equal(packed.train, full)
    assert np.array_equal(packed.eval, tokenize_and_pack(["held-out text " * 20], tokenizer, 32)[0])


def test_prepare_refuses_text_shorter_than_one_window(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(UserError, match="fewer than one --seq-len 512 window"):
        prepare([str(short)], None, tokenizer, seq_len=512, eval_fraction=0.0)


def test_equal_mix_holds_out_and_samples_each_source_on_its_own(calib_text, tmp_path, tokenizer):
    """--data-mix equal: each source keeps its own last windows for eval, and a small source is drawn as often as
    a large one (each of its windows once per its own epoch), where concat draws it in proportion to its size."""
    small = tmp_path / "small.txt"
    small.write_text("A short text of another domain, about gears and levers. " * 40)
    seq = 32
    big_w, _ = tokenize_and_pack(load_documents([str(calib_text)], "--data"), tokenizer, seq)
    small_w, _ = tokenize_and_pack(load_documents([str(small)], "--data"), tokenizer, seq)
    assert len(big_w) > 4 * len(small_w) >= 8
    packed = prepare([str(calib_text), str(small)], None, tokenizer, seq, eval_fraction=0.1, mix="equal")
    n_big, n_small = len(big_w) - max(1, int(len(big_w) * 0.1)), len(small_w) - max(1, int(len(small_w) * 0.1))
    assert packed.sources == [n_big, n_small]
    assert np.array_equal(packed.train, np.concatenate([big_w[:n_big], small_w[:n_small]]))
    assert np.array_equal(packed.eval, np.concatenate([big_w[n_big:], small_w[n_small:]]))
    sampler = make_sampler(packed, seed=0)
    assert isinstance(sampler, MixSampler)
    drawn = [sampler.window(s) for s in range(2 * 3 * n_small)]
    from_small = [w - n_big for w in drawn if w >= n_big]
    assert len(from_small) == len(drawn) // 2  # half of the windows, though it holds a fifth or less of the text
    for epoch in range(3):  # every small window once per epoch of the small source, reshuffled
        assert sorted(from_small[epoch * n_small:(epoch + 1) * n_small]) == list(range(n_small))
    assert from_small[:n_small] != from_small[n_small:2 * n_small]
    assert all(0 <= w < n_big for w in drawn[0::2])
    # a pure function of the sample number, as resume needs
    again = make_sampler(packed, seed=0)
    assert [again.window(s) for s in reversed(range(len(drawn)))] == drawn[::-1]
    # concat (the default) is one stream: the small text in proportion to its size
    plain = prepare([str(calib_text), str(small)], None, tokenizer, seq, eval_fraction=0.1)
    assert plain.sources is None and isinstance(make_sampler(plain, 0), Sampler)


def test_equal_mix_refusals(calib_text, tmp_path, tokenizer):
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("a few words")
    with pytest.raises(UserError, match=r"--data .*tiny\.txt: .* none left to train on"):
        prepare([str(calib_text), str(tiny_text)], None, tokenizer, seq_len=16, eval_fraction=0.5, mix="equal")
    with pytest.raises(UserError, match="named twice"):
        prepare([str(calib_text), str(calib_text)], None, tokenizer, seq_len=16, eval_fraction=0.0, mix="equal")
    with pytest.raises(UserError, match="--data-mix bogus"):
        prepare([str(calib_text)], None, tokenizer, seq_len=16, eval_fraction=0.0, mix="bogus")


# ----------------------------------------------------------------------------- sampling and sharding


def test_each_epoch_visits_every_window_once():
    sampler = Sampler(10, seed=3)
    epochs = [[sampler.window(e * 10 + i) for i in range(10)] for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_same_seed_same_order_other_seed_other_order():
    order = [Sampler(50, seed=7).window(s) for s in range(120)]
    assert order == [Sampler(50, seed=7).window(s) for s in range(120)]
    assert order != [Sampler(50, seed=8).window(s) for s in range(120)]
    # order does not depend on which samples were asked for before (what resume relies on)
    fresh = Sampler(50, seed=7)
    assert [fresh.window(s) for s in range(119, -1, -1)] == order[::-1]


@pytest.mark.parametrize("world,micro_bs,accum", [(1, 2, 1), (2, 1, 2), (2, 2, 2), (4, 1, 1)])
def test_ranks_get_disjoint_batches_that_make_the_global_batch(world, micro_bs, accum):
    n, seq_len = 16, 3
    windows = np.arange(n)[:, None] * 100 + np.arange(seq_len)  # row i is window i
    sampler = Sampler(n, seed=1)
    global_bs = micro_bs * world * accum
    seen: list[int] = []
    for step in range(2 * n // global_bs):  # two epochs
        step_rows = []
        for rank in range(world):
            rows = [row // 100 for micro in range(accum)
                    for row in micro_batch(windows, sampler, step, micro, rank, world, micro_bs, accum)[:, 0].tolist()]
            assert len(rows) == micro_bs * accum
            step_rows.append(rows)
        flat = [w for rows in step_rows for w in rows]
        assert len(set(flat)) == global_bs  # no window on two ranks (or twice) in one step
        assert sorted(flat) == sorted(sampler.window(step * global_bs + i) for i in range(global_bs))
        seen += flat
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))


def test_micro_batch_is_the_windows_rows():
    windows = np.arange(24, dtype=np.int64).reshape(8, 3)
    sampler = Sampler(8, seed=0)
    batch = micro_batch(windows, sampler, step=1, micro=0, rank=1, world=2, micro_bs=2, accum=1)
    first = 1 * 4 + 1 * 2  # step 1 of global batch 4, rank 1's two samples
    assert batch.shape == (2, 3) and batch.tolist() == [windows[sampler.window(first + b)].tolist() for b in (0, 1)]
