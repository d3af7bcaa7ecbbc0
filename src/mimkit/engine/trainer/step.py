"""The loop's step: from micro-batches to one optimizer step, the one path that `train` runs and that
`seconds_per_step` times (so a wall-clock budget is sized on the step a run really takes)."""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn

from ...runtime import prepare_for_precision
from .optim import set_lr, set_weight_decay, weight_decay_at
from .task import Task
from .window import Window


class StepPath:
    """The loop's way from micro-batches to one optimizer step, shared by `train` and `seconds_per_step` (so a
    budget is timed on the step the run really takes): DDP's no_sync while accumulating, autocast, the scaled
    backward; then the lr (and the weight decay under `optim.weight_decay_end`), clipping, the non-finite guard, the
    optimizer, the weight EMA and the task's `after_step` (teacher updates)."""

    def __init__(self, task: Task, model: nn.Module, step_model: nn.Module, optimizer, scaler, window: Window,
                 accum: int, clip_grad: float | None):  # fmt: skip
        self.task, self.model, self.step_model, self.optimizer = task, model, step_model, optimizer
        self.scaler, self.window, self.accum, self.clip_grad = scaler, window, accum, clip_grad
        self.params = [p for p in task.model.parameters() if p.requires_grad]

    def forward_backward(self, batch, update: bool):
        """One micro-batch -> (loss, metrics, unreadable indices); gradients accumulate (synced when `update`)."""
        rt = self.task.rt
        sync = contextlib.nullcontext() if update or rt.world == 1 else self.model.no_sync()
        with sync:
            with rt.autocast():
                loss, metrics, bad = self.task.step(self.step_model, batch)
            self.scaler.scale(loss / self.accum).backward()
        return loss, metrics, bad

    def apply(self, lr: float, step: int, total: int) -> None:
        """Take optimizer step `step` (1-based) of `total` at `lr` with the accumulated gradients."""
        set_lr(self.optimizer, lr)
        o = self.task.cfg.optim
        if o.weight_decay_end is not None:  # DINO's schedule; the step index is 0-based there
            set_weight_decay(self.optimizer, weight_decay_at(step - 1, total, o.weight_decay, o.weight_decay_end))
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad or math.inf)
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite steps itself (and lowers its scale)
            self.window.guard(grad_norm, step, self.params)
        self.window.add_grad_norm(grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.task.ema is not None:
            self.task.ema.update(self.task.model, step=step)
        self.task.after_step(step, total)


def seconds_per_step(task: Task, steps: int = 4) -> float:
    """Wall time of one optimizer step of `task` (data, every accumulated micro-batch, clipping and the teacher
    update included), through the loop's own `StepPath`, averaged over `steps` steps after a first one that pays
    one-off costs. lr 0: the weights stay as built (an EMA teacher may still move towards them)."""
    cfg, rt = task.cfg, task.rt
    optimizer = task.build_optimizer(0.0)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16)
    accum = cfg.optim.accum_steps
    prepare_for_precision(task.model, rt.device, rt.amp)
    path = StepPath(task, task.model, task.model, optimizer, scaler, Window(rt.device, cfg.train.max_loss_jump),
                    accum, cfg.optim.clip_grad)  # fmt: skip
    total = max(steps + 1, cfg.train.epochs * (task.batches_per_epoch() // accum))
    task.model.train()
    t0, micro, done = time.perf_counter(), 0, 0
    for batch in task.batches(0, 0):
        micro += 1
        update = micro % accum == 0
        path.forward_backward(batch, update)
        if not update:
            continue
        done += 1
        path.apply(0.0, done, total)
        if done == 1:
            t0 = time.perf_counter()
        if done > steps:
            break
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(done - 1, 1)
