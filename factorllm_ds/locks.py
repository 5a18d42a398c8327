"""The run lock: one job at a time in a folder it writes (train's --out).

:class:`RunLock` holds ``fcntl.flock`` on ``folder/.factorllm.lock``; the kernel drops it when the process ends,
however it ends, so no stale lock ever needs removing. Standard library only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from factorllm_ds.errors import UserError

log = logging.getLogger("factorllm_ds")

LOCK_FILE = ".factorllm.lock"


class RunLock:
    """Exclusive use of ``folder`` by one job, for as long as the ``with`` block runs.

    ``fcntl.flock`` on ``folder/.factorllm.lock``: the kernel drops it when the process ends,
    however it ends (crash, SIGKILL), so no stale lock ever needs removing. The file records
    the holder (host, pid, start time, command) so that a second job's error names it. Take it
    in one process per job (rank 0), before the work starts; it is not re-entrant (a second
    ``RunLock`` on the same folder in the same process is refused too). The folder is created
    if missing.
    On a file system without flock support (Lustre mounted ``noflock``) a warning says the
    folder is unguarded and the job runs anyway.
    """

    def __init__(self, folder: Path, flag: str = "--out"):
        self.folder = Path(folder)
        self.flag = flag
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning("%s %s: cannot lock %s (%s); nothing stops a second job from writing this folder",
                            self.flag, self.folder, self.path, err.strerror)
                return self
            raise UserError(f"{self.flag} {self.folder}: another job is using this folder "
                            f"({_describe_holder(holder)}). Wait for it to end or stop it, or pick another folder."
                            ) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *_) -> None:
        # The file stays: deleting it would let a third process lock a fresh inode while a
        # second one waits on the old.
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _describe_holder(text: str) -> str:
    try:
        rec = json.loads(text)
        return f"host {rec['host']}, pid {rec['pid']}, started {rec['started']}: {rec.get('command', '?')}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"
