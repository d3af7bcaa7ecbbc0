"""Pre-emption: a scheduler's warning signal (SIGTERM, SIGUSR1) makes every rank finish its step, write one
checkpoint and exit with `PREEMPTED`, so that re-running (or requeueing) the same command resumes exactly."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from . import distributed as D
from .logging import say

PREEMPTED = 3  # exit status of a run stopped by a pre-emption signal after checkpointing


class StopSignal:
    """Records that one of `names` (e.g. "SIGTERM,SIGUSR1"; "" = none) arrived; `requested()` agrees across
    ranks (a signal may reach only some of them), at the cost of one tiny all-reduce per step when distributed."""

    def __init__(self, names: str):
        self.flag = False
        self.previous = {}
        for name in [n.strip() for n in names.split(",") if n.strip()]:
            sig = getattr(signal, name)
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner's worker): no handler, no pre-emption
                pass

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self, step: int = 0, every: int = 1) -> bool:
        """Polled after each step; across processes only every `every` steps (the agreement is a host sync)."""
        if not self.previous:
            return False
        if D.is_distributed():
            if step % every:
                return False
            t = torch.tensor([int(self.flag)], device=D.collective_device())
            return bool(D.all_reduce_sum(t).item())
        return self.flag

    def exit(self, checkpoint: Path) -> None:
        say(f"stop signal received: checkpoint written to '{checkpoint}'; re-run the same command to resume", True)
        D.shutdown()
        sys.exit(PREEMPTED)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
