"""Where a command writes its output, and how: nothing of the user's is lost, nothing is left half-written.

:func:`check_output` refuses an ``--out`` whose replacement would delete the user's data (a folder this tool
did not write, entries its manifest does not list, one that holds or lies inside an input), and
:func:`check_output_file` the same for one report or plot. An output folder is built in a marked temp folder
beside ``--out`` (:func:`make_marked_dir`) and moved in whole by :func:`move_into_place` (never over what
another process made meanwhile); :func:`remove_stale_temps` and :func:`recover_replaced` clear what dead
processes left, and only what their marker proves. :func:`atomic_file` writes one file whole or not at all;
:func:`check_free_space` and :func:`disk_full_error` word a full disk.

Every refusal is a :class:`~factorllm_ds.errors.UserError` that names the flag or file, the reason and the fix.
Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from factorllm_ds.errors import UserError
from factorllm_ds.locks import LOCK_FILE

log = logging.getLogger("factorllm_ds")


# ============================================================================ output folders
def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both already resolved)."""
    return inner == outer or outer in inner.parents


# The key under which a folder's inventory marker (convert/export's manifest) lists every file the command wrote,
# as paths relative to the folder: --overwrite replaces such a folder only while it holds nothing else.
INVENTORY_KEY = "files"


def _read_json(path: Path):
    """The JSON in ``path``; None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def not_listed(out: Path, listed: set[str]) -> list[str]:
    """The top-level entries of ``out`` that hold anything outside ``listed`` (paths relative to ``out``; the run
    lock aside): ``["notes.txt", "run/ (44 files)"]``."""
    found: dict[str, int] = {}
    for root, dirs, files in os.walk(out):  # links to folders come in dirs, and are not followed
        rel = Path(root).relative_to(out)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = (rel / name).as_posix()
            if path not in listed and path != LOCK_FILE:
                found[path.split("/")[0]] = found.get(path.split("/")[0], 0) + 1
        if not dirs and not files and rel.parts:  # an empty folder someone made
            found.setdefault(rel.parts[0], 0)
    return [(f"{top}/ ({n} files)" if n else f"{top}/ (empty)") if (out / top).is_dir() and not (out / top).is_symlink()
            else top for top, n in sorted(found.items())]


def listed_files(folder: Path, inventory: str) -> set[str] | None:
    """The files (relative to ``folder``) that its ``inventory`` marker lists under :data:`INVENTORY_KEY`, as a list
    (convert/export's manifest) or as the keys of a dict (checksums.json); None when it lists none or is unreadable."""
    record = _read_json(Path(folder) / inventory)
    listed = record.get(INVENTORY_KEY) if isinstance(record, dict) else None
    return {str(name) for name in listed} if isinstance(listed, (list, dict)) else None


def _inventory_problem(out: Path, inventory: str) -> str | None:
    """Why --overwrite would delete entries the command did not write: ``out`` holds files its ``inventory``
    marker does not list (a training run, notes put there later), or the marker lists nothing."""
    listed = listed_files(out, inventory)
    if listed is None:
        return (f"its {inventory} does not list the files factorllm-ds wrote (an older version made it), so files "
                "you added cannot be told apart; move out what you keep and remove the folder yourself, or pick "
                "another path")
    extra = not_listed(out, listed)
    if not extra:
        return None
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    return (f"it holds {len(extra)} entries factorllm-ds did not write (not in its {inventory}): "
            f"{', '.join(extra[:5])}{more}; --overwrite would delete them. Move them out of the folder, "
            "or pick another path")


def _replace_problems(out: Path, inputs: Mapping[str, Path], own_markers: Sequence[str],
                      inventory: str | None = None) -> list[str]:
    """Why replacing the existing ``out`` would lose data the tool does not own (empty: it is safe)."""
    problems = []
    if out.is_symlink():
        problems.append(f"it is a symbolic link (to {os.readlink(out)}); remove the link yourself or pick another path")
    elif not out.is_dir():
        problems.append("it is a file, not a folder this tool wrote; move it away or pick another path")
    else:
        try:
            entries = [e for e in out.iterdir() if e.name != LOCK_FILE]  # a run lock alone holds no data
        except OSError as err:
            entries = None
            problems.append(f"its contents cannot be listed ({err.strerror}); pick another path")
        # An empty folder holds nothing to lose (e.g. made by `mkdir` or a job script).
        if entries and not any((out / marker).is_file() for marker in own_markers):
            problems.append(f"it holds none of {', '.join(own_markers)}, so factorllm-ds did not write it and "
                            "will not delete it; pick another path, or empty or remove it yourself")
        elif entries and inventory is not None and (out / inventory).is_file():
            problems += [p for p in [_inventory_problem(out, inventory)] if p]
    real_out = _resolved(out)
    for flag, path in inputs.items():
        if path is None:  # an optional input the user did not pass
            continue
        real_in = _resolved(path)
        if _is_within(real_in, real_out):
            where = "is" if real_in == real_out else "holds"
            problems.append(f"it {where} the input {flag} {path}: replacing it would delete the input; "
                            "pick an output path outside every input")
        elif _is_within(real_out, real_in):
            problems.append(f"it lies inside the input {flag} {path}: replacing it would delete part of the input; "
                            "pick an output path outside every input")
    return problems


def _parent_problems(out: Path) -> list[str]:
    """Why ``out`` cannot be created: an ancestor that is a file, or an unwritable folder."""
    ancestor = Path(os.path.abspath(Path(out).expanduser())).parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link: exists() is False but mkdir would fail
            return [f"its parent {ancestor} is a broken symbolic link; fix the link or pick another path"]
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"its parent {ancestor} is a file, not a folder; pick another path"]
    # The output and its temp folder are made next to each other, in the parent (or below the
    # nearest existing ancestor, which mkdir then fills in).
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"the folder {ancestor} is not writable by this user; pick another path or fix its permissions"]
    return []


def output_problems(out: Path, flag: str, overwrite: bool, inputs: Mapping[str, Path],
                    own_markers: Sequence[str], inventory: str | None = None) -> list[str]:
    """The reasons :func:`check_output` would give, each starting ``FLAG OUT:`` (empty: writing ``out`` is safe),
    for a command that reports them with its other problems."""
    return [f"{flag} {out}: {p}" for p in _output_problems(out, overwrite, inputs, own_markers, inventory)]


def _output_problems(out: Path, overwrite: bool, inputs: Mapping[str, Path], own_markers: Sequence[str],
                     inventory: str | None) -> list[str]:
    out = Path(out)
    problems = []
    if out.exists() or out.is_symlink():
        replace = _replace_problems(out, inputs, own_markers, inventory)
        if not overwrite:
            fix = ("pick another path, or pass --overwrite to replace it" if not replace else
                   "pick another path (--overwrite would be refused too: " + "; ".join(replace) + ")")
            problems.append(f"it already exists; {fix}")
        else:
            problems += [f"--overwrite refused: {p}" for p in replace]
    return problems + _parent_problems(out)


def check_output(out: Path, flag: str, overwrite: bool, inputs: Mapping[str, Path],
                 own_markers: Sequence[str], inventory: str | None = None) -> None:
    """Raise one :class:`UserError` listing every reason writing ``out`` is unsafe; return if it is safe.

    ``inputs`` maps each input's flag to its path (``{"--model": cfg.model}``): every path the command
    reads, those it finds recorded elsewhere included (export: the run's base model). ``own_markers``
    are the file names only this tool's outputs hold at their top level (``("factorllm_manifest.json",)``
    for convert/export, ``("run.json",)`` for train). ``inventory``, one of them, lists under
    :data:`INVENTORY_KEY` every file the command wrote. ``out`` must not exist unless ``overwrite``;
    with ``overwrite`` it may be replaced only when it is an empty folder or a folder holding a
    marker (and, with ``inventory``, nothing that marker does not list), when it holds no input and
    when it lies inside none (a *new* folder inside an input is fine: nothing is replaced). Its
    nearest existing ancestor must be a writable folder. Call it before any work starts; it changes
    nothing on disk.
    """
    _refuse(f"{flag} {out}: cannot write the output there",
            _output_problems(out, overwrite, inputs, own_markers, inventory))


def _refuse(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise UserError(f"{what}:" + "".join(f"\n  - {p}" for p in problems))


# Reports and plots carry this in their first bytes (a JSON key, a PNG text chunk): an existing
# file that does not is the user's, and is never replaced.
FILE_MARKER = b"factorllm_ds"
# Less than this free where a report or plot goes means the disk is all but full: refused before the work.
FILE_SPACE = 1 << 20


def _head(path: Path) -> bytes:
    """The first 4 KiB of ``path``, where a report or plot carries :data:`FILE_MARKER`."""
    with open(path, "rb") as fh:
        return fh.read(4096)


def has_file_marker(path: Path) -> bool:
    """``path`` is a file (not a link) this tool wrote: a report or plot carrying :data:`FILE_MARKER`."""
    try:
        return Path(path).is_file() and not Path(path).is_symlink() and FILE_MARKER in _head(path)
    except OSError:
        return False


def check_output_file(path: Path | None, flag: str, inputs: Mapping[str, Path | None]) -> None:
    """The rule of :func:`check_output` for one output *file* (``eval --report``, ``--plot``).

    An existing ``path`` is replaced only when this tool wrote it (its first 4 KiB hold
    :data:`FILE_MARKER`) or it is empty, and it is no input and lies inside none; its parent must
    be creatable, on a file system with :data:`FILE_SPACE` free. ``None`` (the flag was not
    given) passes. Changes nothing on disk.
    """
    if path is None:
        return
    path = Path(path)
    problems = []
    if path.is_symlink() or path.is_dir():
        problems.append("it is a folder or a link, not a file this tool wrote; pick another path")
    elif path.exists():
        real = _resolved(path)
        for name, given in inputs.items():
            if given is not None and _is_within(real, _resolved(given)):
                problems.append(f"it is (or lies inside) the input {name} {given}: writing it would destroy input "
                                "data; pick another path")
        try:
            head = _head(path)
        except OSError as err:
            head = b""
            problems.append(f"it cannot be read ({err.strerror})")
        # An empty file holds nothing to lose (e.g. one a failed write of an older version left).
        if head and FILE_MARKER not in head and not problems:
            problems.append("it is a file factorllm-ds did not write, so it will not be replaced; pick another path "
                            "or remove it yourself")
    parent = _parent_problems(path)
    _refuse(f"{flag} {path}: cannot write the file there",
            problems + parent + ([] if parent else _space_problems(path, FILE_SPACE)))


# ============================================================================ disk space

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(Path(path).expanduser()))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Bytes this user may still write on the file system that holds ``path`` (or would: its nearest existing
    ancestor's); None where the file system does not say (it reports no blocks, as some network mounts do)."""
    try:
        st = os.statvfs(_existing_ancestor(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize if st.f_blocks else None


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path`` (or would)."""
    path = _existing_ancestor(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def human_bytes(count: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (powers of 1000, as --max-shard-size counts)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _space_problems(path: Path, needed: int) -> list[str]:
    free = free_bytes(path)
    if free is None or free >= needed:
        return []
    return [f"the file system at {mount_point(path)} has {human_bytes(free)} free and this output needs about "
            f"{human_bytes(needed)}; free some space, or pick a path on another file system"]


def check_free_space(path: Path, needed: int, flag: str) -> None:
    """Raise :class:`UserError` naming ``flag`` when the file system of ``path`` has less than ``needed`` bytes free."""
    _refuse(f"{flag} {path}: not enough disk space", _space_problems(path, needed))


def is_disk_full(err: BaseException) -> bool:
    """``err`` (or the error it came from) says the file system is full or the user's quota is spent.

    A library that wraps the OSError in a type of its own (safetensors: "No space left on device
    (os error 28)") is recognised by the system's wording.
    """
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError):
            if cause.errno in _DISK_FULL:
                return True
        elif cause is not None and any(os.strerror(code) in str(cause) for code in _DISK_FULL):
            return True
    return False


def disk_full_error(flag: str, path: Path, needed: int | None = None) -> UserError:
    """The one message for a write that ran out of space (call it after removing the partial output, so that
    the free space it gives is what the next try will find)."""
    free = free_bytes(path)
    sizes = ([f"this output needs about {human_bytes(needed)}"] if needed else []) + (
        [f"{human_bytes(free)} is free"] if free is not None else [])
    return UserError(f"{flag} {path}: the file system at {mount_point(path)} is full (or the disk quota is "
                     f"spent){' (' + ', '.join(sizes) + ')' if sizes else ''}. The partial output was removed and "
                     f"what was at {flag} before is unchanged; free some space, or pick a {flag} on another file "
                     "system.")


@contextlib.contextmanager
def atomic_file(path: Path, flag: str) -> Iterator[Path]:
    """A temp path beside ``path`` for the block to write; it becomes ``path`` (fsynced, then renamed over it)
    when the block succeeds and is removed when it fails.

    So ``path`` is always either the previous file or the complete new one, never a truncated or
    empty one. A full disk is one :class:`UserError` naming ``flag``.
    """
    path = Path(path)
    tmp = _sibling(path, "tmp", None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(flag, path) from err
        raise


def write_text_atomic(path: Path, text: str, flag: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path, flag) as tmp:
        tmp.write_text(text)
    return Path(path)


# ============================================================================ temp folders

# An output folder OUT is built in the hidden sibling ".OUT.tmp-PID@HOST" and moved in at the end; while an
# existing OUT is replaced, it waits inside ".OUT.old-PID@HOST". The command writes TEMP_MARKER into such a
# folder before anything else, naming the process, the host and OUT. A later command deletes one (or puts a
# parked OUT back) only with proof that it was made for its own --out: the name derives from that --out and
# carries this host, its process no longer runs, and the marker says all three. Anything short of that (a
# user's ".results.tmp-4000001", another node's output in progress on a shared file system, a name without a
# host, an older version's folder) is left alone, at most reported.
TEMP_MARKER = ".factorllm-temp.json"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>[^@/]+)$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)@(?P<host>[^@/]+)$")
_KINDS = {"tmp": _TEMP_RE, "old": _OLD_RE}


def _host() -> str:
    return socket.gethostname().replace("/", "_").replace("@", "_") or "localhost"


def _sibling(out: Path, kind: str, pid: int | None) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}@{_host()}"


def temp_dir_for(out: Path, pid: int | None = None) -> Path:
    """The hidden sibling folder in which ``out`` is built by process ``pid`` (default: this one)."""
    return _sibling(out, "tmp", pid)


def old_dir_for(out: Path, pid: int | None = None) -> Path:
    """The folder in which process ``pid`` parks the previous ``out`` (as ``old_dir_for(out) / out.name``)
    while it moves the new one in."""
    return _sibling(out, "old", pid)


def _marker(out: Path, kind: str, pid: int) -> dict:
    return {"kind": kind, "pid": pid, "host": _host(), "out": str(_resolved(out))}


def _proven(folder: Path, out: Path, kind: str, pid: int) -> bool:
    """``folder`` holds the marker that process ``pid`` of this host wrote when it made it for ``out``."""
    marker = folder / TEMP_MARKER
    record = None if marker.is_symlink() else _read_json(marker)
    return isinstance(record, dict) and all(record.get(k) == v for k, v in _marker(out, kind, pid).items())


def make_marked_dir(out: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """Create :func:`temp_dir_for` (``kind`` "tmp") or :func:`old_dir_for` ("old") of ``out`` for process ``pid``
    (default: this one), with its :data:`TEMP_MARKER` written before anything else goes in; returns it.

    A folder already there by that name is replaced only when its marker proves it was made for
    ``out`` by a process with this id (one that crashed, whose id came round again); else UserError.
    """
    pid = os.getpid() if pid is None else pid
    folder = _sibling(out, kind, pid)
    if folder.exists() or folder.is_symlink():
        if folder.is_symlink() or not folder.is_dir() or not _proven(folder, out, kind, pid):
            raise UserError(f"--out {out}: {folder} is in the way of this command's temporary folder and holds no "
                            "marker of factorllm-ds; move it away or remove it yourself")
        shutil.rmtree(folder)
    folder.mkdir()
    try:
        record = dict(_marker(out, kind, pid), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=" ".join(sys.argv))
        (folder / TEMP_MARKER).write_text(json.dumps(record) + "\n")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # made a moment ago, empty but for a partial marker
        raise
    return folder


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>


@functools.cache
def _renameat2():
    """The C library's ``renameat2`` (Linux 3.15+ with glibc 2.28+), or None."""
    import ctypes

    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None
    if func is not None:
        func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return func


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that raises FileExistsError when ``dst`` exists, an empty folder included (a plain
    rename would replace that one silently).

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and the file system have it; elsewhere ``dst``
    is claimed with ``mkdir`` (atomic: it fails when anything is there) and ``src`` renamed onto
    that empty folder of its own.
    """
    func = _renameat2()
    if func is not None:
        import ctypes

        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # those: this file system lacks the flag
            raise OSError(code, os.strerror(code), str(dst))
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def _unpark(holder: Path, out: Path) -> None:
    """Put the ``out`` parked in ``holder`` back. Where something took its place meanwhile, it stays parked,
    its marker removed so that nothing deletes it later, and a warning says where it is."""
    try:
        _rename_noreplace(holder / out.name, out)
    except OSError:
        (holder / TEMP_MARKER).unlink(missing_ok=True)
        log.warning("the previous %s waits in %s: move it back by hand", out, holder / out.name)
        return
    shutil.rmtree(holder, ignore_errors=True)  # only the marker is left in it


def move_into_place(folder: Path, out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Rename the finished ``folder`` to ``out``, never replacing what the caller did not mean to.

    With ``overwrite`` an existing ``out`` (which :func:`check_output` must have allowed, just
    before) is parked in a marked :func:`old_dir_for` and deleted only once the new one is in: a
    crash between the two renames leaves it parked, and :func:`recover_replaced` puts it back. The
    rename itself replaces nothing, not even an empty folder: when another process made ``out``
    meanwhile (two jobs writing one new --out), UserError, and that process's ``out`` stays as it is.
    """
    out = Path(out)
    raced = UserError(f"{flag} {out}: another process created it while this one was writing; it is left as that "
                      f"process made it, and this command's output was discarded. Give each job its own {flag} "
                      "(or pass --overwrite to replace it).")
    holder = None
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise raced
        holder = make_marked_dir(out, "old")
        try:
            os.rename(out, holder / out.name)
        except BaseException:
            shutil.rmtree(holder, ignore_errors=True)  # holds only its marker
            raise
    try:
        _rename_noreplace(folder, out)
    except BaseException as err:
        if holder is not None:
            _unpark(holder, out)
        if isinstance(err, OSError) and err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise raced from None
        raise
    if holder is not None:
        shutil.rmtree(holder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real process id: never treat the folder as abandoned
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _abandoned(out: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """(folder, pid) for each ``kind`` ("tmp", "old") sibling of ``out`` that a process of this host made for
    this very ``out`` (its marker says so) and that no longer runs.

    A live process's folder, another host's, one without a host in its name, a file or a link:
    never. One of this host's that looks abandoned but holds no such marker is reported, not touched.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    host, prefix = _host(), f".{out.name}.{kind}-"
    for entry in sorted(out.parent.iterdir()):
        match = _KINDS[kind].match(entry.name) if entry.name.startswith(prefix) else None
        if (match is None or match["name"] != out.name or match["host"] != host or entry.is_symlink()
                or not entry.is_dir() or _pid_alive(int(match["pid"]))):
            continue
        if _proven(entry, out, kind, int(match["pid"])):
            yield entry, int(match["pid"])
        else:
            log.warning("left %s alone: it is named like a folder factorllm-ds leaves behind, but holds no marker "
                        "proving that factorllm-ds made it for %s; remove it yourself if you do not need it",
                        entry, out)


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temp folders of ``out`` (:func:`temp_dir_for`) left by processes of this host that no longer
    run and that are proven by their marker (see :data:`TEMP_MARKER`); returns them (each is also logged)."""
    removed = []
    for entry, pid in _abandoned(out, "tmp"):
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            log.warning("could not remove the abandoned temp folder %s; remove it by hand", entry)
        else:
            log.warning("removed %s, left by process %s, which no longer runs", entry, pid)
            removed.append(entry)
    return removed


def recover_replaced(out: Path) -> list[Path]:
    """Finish the replacements of ``out`` that a dead process of this host left half done.

    Replacing ``out`` is two renames (:func:`move_into_place`): ``out`` into a marked
    :func:`old_dir_for`, then the temp folder to ``out``. A crash between them leaves no ``out`` and
    the previous one parked: it is renamed back. A crash after both leaves the parked copy beside
    the new ``out``: it is deleted. Only parked folders proven by their marker are touched (see
    :data:`TEMP_MARKER`). Returns the parked folders dealt with.
    """
    out = Path(out)
    done = []
    for holder, pid in _abandoned(out, "old"):
        parked = holder / out.name
        if parked.is_dir() and not parked.is_symlink() and not (out.exists() or out.is_symlink()):
            try:
                _rename_noreplace(parked, out)
            except OSError as err:
                log.warning("could not put %s back at %s (%s); move it back by hand", parked, out, err)
                continue
            log.warning("restored %s from %s: process %s was replacing it and stopped before the new one was "
                        "moved in", out, holder.name, pid)
        elif parked.exists():
            log.warning("removed %s, the previous %s that process %s replaced", holder, out.name, pid)
        shutil.rmtree(holder, ignore_errors=True)
        done.append(holder)
    return done
