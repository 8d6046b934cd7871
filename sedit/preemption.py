"""Stop a run at a step boundary when the scheduler asks, so it can checkpoint and come back.

SLURM announces the end of a job with a signal: SIGUSR1 some minutes ahead of the time limit
(``#SBATCH --signal=USR1@300``) or SIGTERM when the job is preempted, requeued or cancelled. The
handler only records the request. At the end of each optimizer step every rank calls
``StopRequest.agreed()``, an all-reduce (max) of a 0/1 flag, so all ranks stop after the same step
even though the signal reaches them at slightly different times. The trainer then writes a
checkpoint and exits with ``REQUEUE_EXIT``; ``launch/slurm/stage.sbatch`` turns that exit code into
``scontrol requeue`` and the requeued job resumes from the checkpoint (``--resume auto``).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT = 75  # sysexits.h EX_TEMPFAIL: stopped at a checkpoint, run me again
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records SIGUSR1/SIGTERM; ``agreed()`` tells every rank whether any rank received one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None  # number of the first stop signal received, if any
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """Ignore stop signals for the rest of the process (call once the checkpoint is written).

        srun sends SIGTERM to the remaining tasks as soon as the first one exits non-zero; a task
        killed by it makes srun report the signal instead of ``REQUEUE_EXIT``. SIG_IGN, unlike a
        Python handler, stays in force while the interpreter shuts down.
        """
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank received a stop signal (collective when distributed)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
