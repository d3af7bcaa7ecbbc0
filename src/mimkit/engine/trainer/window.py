"""The training loop's metrics window: metrics summed on the device between two log lines, and the guard that
stops a run whose loss or gradient is not finite or whose loss exploded (mimkit.engine.trainer.loop)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import DivergedError
from . import distributed as D

if TYPE_CHECKING:
    from .task import Runtime


RECENT_LOSSES = 20  # logged losses the loss-level guard compares with


class Window:
    """Metrics summed on the device between two log lines (no host sync per step), and the first step whose loss
    or gradient was not finite, or whose loss exploded (-1: none). Exploded: above `max_jump` times the lowest of
    the last RECENT_LOSSES logged losses (0: never); finite but orders of magnitude off, the weights that gave it
    are as lost as NaN ones, so they are treated alike (never applied, never kept as the newest checkpoint)."""

    def __init__(self, device: torch.device, max_jump: float = 0.0):
        self.device, self.max_jump = device, max_jump
        self.count, self.sums, self.images = 0, {}, 0
        self.grad_sum, self.grad_steps = torch.zeros((), device=device), 0
        self.bad_step = torch.tensor(-1, device=device)
        self.bad_loss = torch.tensor(math.nan, device=device)  # the flagged step's loss
        self.recent: list[float] = []  # the last RECENT_LOSSES logged losses
        self.limit = torch.tensor(math.inf, device=device)
        self.t_last = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict, step: int, images: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1
        self.images += images
        loss = loss.detach().float()
        self._flag(torch.isfinite(loss) & (loss <= self.limit), step, loss)

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        """The global gradient norm of one optimizer step (before clipping)."""
        self.grad_sum = self.grad_sum + torch.nan_to_num(norm.detach().float(), nan=0.0, posinf=0.0)
        self.grad_steps += 1

    def guard(self, grad_norm: torch.Tensor, step: int, params: list[torch.Tensor]) -> None:
        """A non-finite loss or gradient must not reach the weights: zero every gradient of this step (on the
        device, no sync); the run stops at the next check, before anything is saved."""
        finite = torch.isfinite(grad_norm) & (self.bad_step < 0)
        self._flag(finite, step)
        keep = finite.to(torch.float32)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, keep)
        for g in grads:  # inf * 0 is nan: make them exact zeros
            g.nan_to_num_(0.0, 0.0, 0.0)

    def _flag(self, finite: torch.Tensor, step: int, loss: torch.Tensor | None = None) -> None:
        first = finite.logical_not() & (self.bad_step < 0)
        self.bad_step = torch.where(first, torch.tensor(step, device=self.device), self.bad_step)
        if loss is not None:
            self.bad_loss = torch.where(first, loss, self.bad_loss)

    def check_finite(self, step: int, ckpt: Path) -> None:
        bad = int(D.all_reduce_max(self.bad_step).item())  # every rank stops together
        if bad >= 0:
            value = self.bad_loss.item()
            what = (f"loss {value:.3g} at step {bad} is over train.max_loss_jump={self.max_jump:g} times the lowest "
                    f"of the last {len(self.recent)} logged losses ({min(self.recent):.3g}); that update"
                    if math.isfinite(value) else
                    f"non-finite loss at step {bad}; that update (a NaN or inf loss or gradient)")  # fmt: skip
            raise DivergedError(f"{what} was not applied and the run stopped before saving", bad)

    def judge(self, loss: float | None) -> None:
        """The loss level later losses are judged by, after a log line with this mean `loss`."""
        if loss is not None and math.isfinite(loss):
            self.recent = [*self.recent, loss][-RECENT_LOSSES:]
        limit = self.max_jump * min(self.recent) if self.max_jump and self.recent else math.inf
        self.limit = torch.tensor(limit, device=self.device)

    def flush(self, rt: Runtime) -> dict:
        """Mean of each metric over the window (one host sync), all-reduced across ranks, and images/s."""
        names = sorted(self.sums)
        out = {}
        if names:
            stacked = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
            out = dict(zip(names, D.all_reduce_mean(stacked).tolist()))
        if self.grad_steps:
            out["grad_norm"] = (self.grad_sum / self.grad_steps).item()
        now = time.perf_counter()
        out["img_per_s"] = self.images / max(now - self.t_last, 1e-9)
        if rt.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        self.sums, self.count, self.images, self.t_last = {}, 0, 0, now
        self.grad_sum, self.grad_steps = torch.zeros((), device=self.device), 0
        self.judge(out.get("loss"))
        return out

    def state(self) -> dict:
        sums = {k: v.detach().cpu() for k, v in self.sums.items()}
        return {"count": self.count, "sums": sums, "grad_sum": self.grad_sum.cpu(), "grad_steps": self.grad_steps,
                "recent_losses": list(self.recent)}  # fmt: skip

    def load(self, state: dict) -> None:
        self.count = state["count"]
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.grad_sum, self.grad_steps = state["grad_sum"].to(self.device), state["grad_steps"]
        self.recent = list(state.get("recent_losses", []))  # none in checkpoints of mimkit before the guard
        self.judge(None)
