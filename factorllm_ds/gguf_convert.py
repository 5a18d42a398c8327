"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a Qwen2-MoE folder written by ``export --format gguf``.

    python -m factorllm_ds.gguf_convert LLAMA_CPP_DIR HF_DIR [converter flags: --outtype, --outfile, ...]

The converter is llama.cpp's own, unchanged but for one thing: its Qwen2-MoE class reads only a BPE
tokenizer (Qwen's), while a LLaMA or Mistral base brings a SentencePiece one (``tokenizer.model``).
Its dense Qwen2 class already tries SentencePiece first and BPE second; the MoE class here does the
same. It runs in its own process, so its ``gguf-py`` never meets the installed ``gguf`` package.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

CONVERTER = "convert_hf_to_gguf.py"


def _set_vocab(model) -> None:
    try:
        model._set_vocab_sentencepiece()
    except FileNotFoundError:  # no tokenizer.model: a BPE tokenizer (tokenizer.json)
        model._set_vocab_gpt2()


def main(argv: list[str]) -> None:
    tree = Path(argv[0])
    script = tree / CONVERTER
    sys.argv = [str(script), *argv[1:]]
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    from conversion.qwen import Qwen2MoeModel  # the converter's own package, from ``tree``

    Qwen2MoeModel.set_vocab = _set_vocab
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
