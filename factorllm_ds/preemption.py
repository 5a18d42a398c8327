"""Preemption: SIGTERM/SIGUSR1/SIGINT become "every rank saves at the same step, then exits with a known code".

:class:`Preemption` turns the signals into a flag; :func:`agree` / :func:`agree_max` make every rank act on the
same step. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence

log = logging.getLogger("factorllm_ds")

# After a preemption signal the job saves a checkpoint and exits with 128 + the signal's number,
# the status a shell reports for a process that signal ended: SIGTERM (SLURM's preemption and
# time limit, `scancel`) -> 143, SIGUSR1 (`sbatch --signal=USR1@300`, a warning ahead of the
# limit) -> 138, SIGINT (Ctrl-C) -> 130. A batch script requeues on REQUEUE_EXIT_CODES
# (`[ $rc -eq 143 ] || [ $rc -eq 138 ] && scontrol requeue $SLURM_JOB_ID`, or RequeueExit=138,143
# in slurm.conf) and not on 130: a person who presses Ctrl-C wants the job to stop. 0, 1 and 2
# stay "done", "crashed" and "bad input".
REQUEUE_EXIT_CODES = (128 + signal.SIGUSR1, 128 + signal.SIGTERM)


class Preemption:
    """Within ``with Preemption() as pre:``, SIGTERM/SIGUSR1/SIGINT only set a flag.

    The training loop asks ``agree(pre.requested())`` once per step on every rank; when it is
    True every rank saves at that same step and the job ends with ``sys.exit(pre.exit_code)``.
    A second SIGINT raises KeyboardInterrupt at once (Ctrl-C twice: stop now, no checkpoint);
    further SIGTERM/SIGUSR1 are ignored, since the save is already coming. The previous
    handlers come back when the block ends. Install it in the main thread (Python delivers
    signals only there). SLURM sends SIGKILL KillWait (default 30 s) after SIGTERM: for big
    checkpoints ask for an earlier warning, ``sbatch --signal=USR1@300``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, signals: Sequence[int] = SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                        signal.Signals(signum).name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> Preemption:
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self) -> bool:
        """Whether this process received one of the signals (local; see :func:`agree`)."""
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """128 + the first signal's number (143 SIGTERM, 138 SIGUSR1, 130 SIGINT); 0 when none came."""
        return 0 if self.received is None else 128 + int(self.received)


def agree(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is True on any rank (MAX all-reduce); ``flag`` itself without a process group.

    A collective: every rank of ``group`` must call it at the same point (e.g. once per step).
    """
    return bool(agree_max(1 if flag else 0, group))


def agree_max(value: int, group=None) -> int:
    """The largest ``value`` over the ranks of ``group`` (``value`` itself without a process group).

    ``agree_max(preemption.exit_code)`` once per step: 0 when no rank was signalled, else the exit
    code every rank then ends with (a rank the signal did not reach has no code of its own). A collective.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    nccl = "nccl" in str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([int(value)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
