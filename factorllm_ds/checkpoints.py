"""Checkpoint rules, below every stage: which checkpoint of a training run is intact and which one to load.

train writes them, export (and train --resume) read them; neither imports the other.

    checksums     :func:`write_checksums` records every file of a saved tag in ``checksums.json`` (written last,
                  so a tag without one is a save that did not finish); :func:`verify_checksums`,
                  :func:`newest_intact` and :func:`intact_tag` check them.
    which tag     :func:`checkpoint_to_load`: the flag's, else the one ``checkpoints/latest`` names.
    run.json      :func:`read_run_manifest`, the record train writes when a run starts.
    safe loading  :func:`check_loads_safely`: every ``.pt`` of a tag unpickled weights-only first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from factorllm_ds.errors import UserError
from factorllm_ds.layout import CHECKPOINT_DIR, LATEST_FILE, RUN_MANIFEST, list_tags
from factorllm_ds.safe_load import MODEL_STATE_GLOBALS, OPTIM_STATE_GLOBALS, safe_torch_load

log = logging.getLogger("factorllm_ds")


# ============================================================================ checksums

CHECKSUM_FILE = "checksums.json"
_ALGORITHM = "sha256"  # hashlib's sha256 uses the CPU's SHA instructions: faster than blake2b on x86 and ARM
_CHUNK = 8 << 20


def _digest(path: Path, algorithm: str = _ALGORITHM) -> str:
    h = hashlib.new(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """``{name: {"size": bytes, "sha256": hex}}`` for the files ``names`` (relative to ``folder``).

    Streams each file in 8 MiB chunks. Under DeepSpeed, let each rank hash a share of a tag
    folder (``sorted(names)[rank::world]``), gather the dicts and let rank 0 pass the union to
    :func:`write_checksums` as ``entries``.
    """
    folder = Path(folder)
    return {name: {"size": (folder / name).stat().st_size, _ALGORITHM: _digest(folder / name)} for name in names}


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.name != CHECKSUM_FILE
                  and not p.name.startswith(CHECKSUM_FILE + "."))


def write_checksums(folder: Path, files: Iterable[str] | None = None, *,
                    entries: Mapping[str, dict] | None = None) -> Path:
    """Record size and SHA-256 of ``files`` (default: every file below ``folder``) in ``folder/checksums.json``.

    Pass ``entries`` (from :func:`hash_files`) instead when the hashing was done elsewhere. The
    manifest is written to a temp file, fsynced and renamed, so it exists only when complete:
    write it last, after every checkpoint file is on disk.
    """
    folder = Path(folder)
    if entries is None:
        entries = hash_files(folder, _all_files(folder) if files is None else [str(f) for f in files])
    manifest = {"version": 1, "algorithm": _ALGORITHM, "files": dict(sorted(entries.items()))}
    path = folder / CHECKSUM_FILE
    tmp = folder / f"{CHECKSUM_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def verify_checksums(folder: Path, *, sizes_only: bool = False) -> list[str]:
    """Problems with ``folder`` against its ``checksums.json``; empty when every file is intact.

    Each problem names the file: missing, size differs (truncated), digest differs (changed).
    A folder without a manifest gives exactly one problem, starting with "no checksums.json",
    so callers can tell "never recorded" from "damaged". ``sizes_only`` skips the digests
    (seconds instead of a full read, catches truncation but not flipped bytes).
    """
    folder = Path(folder)
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return [f"no {CHECKSUM_FILE} in {folder}: the save did not finish, or was made before checksums were recorded"]
    try:
        manifest = json.loads(path.read_text())
        algorithm = manifest["algorithm"]
        files = manifest["files"]
        hashlib.new(algorithm)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{path}: unreadable checksum manifest ({type(err).__name__}: {err})"]
    problems = []
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"{file}: {size} bytes, {want['size']} when saved (truncated or replaced)")
        elif not sizes_only and _digest(file, algorithm) != want[algorithm]:
            problems.append(f"{file}: content differs from when it was saved ({algorithm} mismatch)")
    return problems


def newest_intact(tags_root: Path, tags: Sequence[str], *, sizes_only: bool = False) -> str | None:
    """The first of ``tags`` (give them newest first) whose folder under ``tags_root`` verifies.

    Each tag passed over is logged with its problems; None when none verifies.
    """
    for tag in tags:
        problems = verify_checksums(Path(tags_root) / tag, sizes_only=sizes_only)
        if not problems:
            return tag
        log.warning("checkpoint %s is not intact, skipping it: %s", tag, "; ".join(problems[:3])
                    + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return None


# ============================================================================ which checkpoint


def intact_tag(run_dir: Path, tag: str, flag: str, retry: str, sizes_only: bool = False) -> None:
    """Raise :class:`UserError` unless checkpoint ``tag`` of ``run_dir`` matches its checksum manifest.

    The message names the first bad file and the newest intact tag (``retry`` formats how to use it,
    e.g. ``"--tag {tag}"``). Reads every byte of the tag folder once (``sizes_only``: only their sizes).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    problems = verify_checksums(root / tag, sizes_only=sizes_only)
    if not problems:
        return
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserError(f"{flag} {run_dir}: checkpoint {tag} is not intact: {problems[0]}{more}; "
                    f"{_intact_advice(run_dir, [tag], retry, sizes_only)}.")


def _intact_advice(run_dir: Path, bad: list[str], retry: str, sizes_only: bool = False) -> str:
    """Which checkpoint to use instead of the ``bad`` tags. The one named is verified byte by byte, as the retry will
    verify it: a size-only check would name a tag whose bytes changed, whose own error then names another (a loop)."""
    if sizes_only:  # a process that compares sizes only must not vouch for a tag
        return "rank 0, which reads every byte, names the newest intact checkpoint"
    others = [t for t in reversed(list_tags(run_dir)) if t not in bad]
    good = newest_intact(Path(run_dir) / CHECKPOINT_DIR, others) if others else None
    return (f"the newest intact checkpoint is {good}: use {retry.format(tag=good)}" if good else
            "no other checkpoint of this run is intact")


# The keys of run.json that commands read, with their JSON types.
RUN_MANIFEST_TYPES = {"model": str, "model_fingerprint": str, "ep_size": int, "world_size": int, "total_steps": int,
                      "settings": dict}


def read_run_manifest(run_dir: Path, flag: str, need: tuple[str, ...] = ("model",)) -> dict:
    """``run_dir/run.json`` (written by train when the run starts) as a dict holding the keys ``need``; one
    :class:`UserError` naming the file when it is missing, not JSON or incomplete."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise UserError(f"{flag} {run_dir}: no {RUN_MANIFEST}; is this a `factorllm-ds train` --out folder?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"is not readable JSON ({type(err).__name__}: {err})"
    else:
        if not isinstance(manifest, dict):
            problem = f"holds a JSON {type(manifest).__name__}, not the object train writes"
        elif missing := [k for k in need if k not in manifest]:
            problem = f"lacks {', '.join(missing)}"
        elif wrong := [f"{k} {manifest[k]!r} is not a {kind.__name__}" for k, kind in RUN_MANIFEST_TYPES.items()
                       if k in manifest and not isinstance(manifest[k], kind)]:
            problem = f"is damaged: {'; '.join(wrong)}"
        else:
            return manifest
    raise UserError(f"{flag} {run_dir}: {path} {problem}. train writes it when a run starts (the model, the layout, "
                    "the settings); put back an intact copy of it, or train into a new --out")


def checkpoint_to_load(run_dir: Path, tag: str | None, tag_flag: str, retry: str) -> str:
    """The tag to load from ``run_dir`` (which holds at least one): ``tag`` when given (with ``tag_flag``), else the
    one ``checkpoints/latest`` names, else the newest. A missing tag is blamed on what chose it: the flag or the file
    (``retry`` formats the flag that picks another, as for :func:`intact_tag`)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    tags = list_tags(run_dir)
    if tag is not None:
        if tag not in tags:
            raise UserError(f"{tag_flag} {tag}: no such checkpoint in {root}; available: {', '.join(tags) or 'none'}")
        return tag
    latest = root / LATEST_FILE
    if not latest.exists():
        return tags[-1]
    try:
        named = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        named, problem = None, f"cannot be read ({type(err).__name__}: {err})"
    else:
        problem = f"names {named!r}, which is not a checkpoint in {root} (available: {', '.join(tags)})"
    if named in tags:
        return named
    raise UserError(f"{latest} {problem}: the save it points to did not finish, its folder was removed or the file "
                    f"was damaged. Fix: "
                    f"{_intact_advice(run_dir, [], retry)}, or write that tag into {latest}.")


# What DeepSpeed's checkpoint files may hold besides tensors and containers (safe_load.py lists why).
CHECKPOINT_GLOBALS = MODEL_STATE_GLOBALS + OPTIM_STATE_GLOBALS


def check_loads_safely(run_dir: Path, tag: str, flag: str) -> None:
    """Unpickle every ``.pt`` file of checkpoint ``tag`` as :func:`safe_torch_load` does (``weights_only`` and the
    DeepSpeed allow-list), tensors memory-mapped and not read: a file that would run code, or needs a type outside the
    list, raises :class:`UserError` naming it before DeepSpeed opens any file. Checksums do not make a file trusted:
    whoever can write the folder can rewrite them."""
    for path in sorted((Path(run_dir) / CHECKPOINT_DIR / tag).rglob("*.pt")):
        # mmap needs torch's zip format (DeepSpeed's default); a legacy-format file is read whole.
        safe_torch_load(path, flag, CHECKPOINT_GLOBALS, mmap=zipfile.is_zipfile(path))
