"""What the one training loop trains: a `Task` (pre-training, tokenizer training, fine-tuning, segmentation) says
what it trains and how one micro-batch becomes a loss; `Runtime` says where this process computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ...runtime import autocast, precision_and_reason, resolve_device
from . import distributed as D
from .optim import lr_at


@dataclass
class Runtime:
    """Where this process computes: device, autocast dtype (None = fp32), rank and world size."""

    device: torch.device
    amp: torch.dtype | None
    rank: int = 0
    world: int = 1
    precision: str = ""  # the choice and why, for the run's first line ("bf16 (auto: ...)")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.amp)


def start_runtime(cfg: Config) -> Runtime:
    """Resolve `train.device` / `train.precision` and join the process group when launched by torchrun/SLURM."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp, why = precision_and_reason(cfg.train.precision, device)
    rank, world = D.init_distributed(device)
    return Runtime(device, amp, rank, world, precision=why)


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of `epoch` already consumed


class Task:
    """What differs between trainings. A task builds everything in `__init__` (nothing written into `out` yet)
    and sets `model` (what the optimizer trains and DDP wraps) and `batch_size` (images per micro-batch and
    process). The loop calls the rest."""

    kind: str = ""  # the checkpoint's `kind`
    resume_keys: tuple[str, ...] = ()  # dotted config keys (or whole sections) a resumed run must share
    find_unused_parameters: bool = False  # DDP: parameters that get no gradient in some steps
    sync_batchnorm: bool = False  # DDP on NCCL: BatchNorm layers normalise over the global batch (SyncBatchNorm)
    model: nn.Module
    batch_size: int
    num_images: int = 0  # training images per epoch (all processes), to report what full batches leave out

    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.ema = None  # the loop's weight EMA (timm ModelEmaV3) when train.ema, for `end_epoch` to evaluate

    def identity(self) -> dict:
        """Plain values (beyond `resume_keys`) that a checkpoint must share to continue this run."""
        return {}

    def method_sections(self) -> tuple[str, ...]:
        """The method config sections this run uses: recorded (config.yaml, checkpoints, W&B) and compared on
        resume beside the shared sections; the others are left out (a fine-tuning run has none)."""
        return ()

    def describe(self, steps_per_epoch: int, effective_batch: int, lr: float) -> str:
        raise NotImplementedError

    sampler = None  # an EpochBatchSampler (seeded order per epoch, sharded by rank, positioned for resume)
    loader = None  # made once by `make_loader`, re-iterated every epoch (persistent workers)

    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch and process."""
        return self.sampler.batches_per_epoch()

    def make_loader(self):
        """An iterable of micro-batches in the order of `self.sampler`, re-iterable after `sampler.start`."""
        raise NotImplementedError

    def batches(self, epoch: int, start: int):
        """The micro-batches of `epoch` from position `start` (exact resume), as the loader delivers them."""
        self.sampler.start(epoch, start)
        if self.loader is None:
            self.loader = self.make_loader()
        yield from self.loader

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr(self, step: int, total: int, warmup: int, peak: float) -> float:
        return lr_at(step, total, warmup, peak, self.cfg.optim.min_lr)

    def step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
        """One micro-batch under autocast -> (loss, metrics: detached scalars to average, unreadable indices).
        `model` is `self.model`, possibly wrapped by DDP / torch.compile."""
        raise NotImplementedError

    def after_step(self, step: int, total: int) -> None:
        pass

    def end_epoch(self, epoch: int, step: int, last: bool) -> dict:
        """Work after `epoch` (1-based) finished (evaluation, crop boxes); -> scalars to log."""
        return {}

    def state_dict(self) -> dict:
        """The task's own entries for the checkpoint (tensors and plain values; keys beside the loop's)."""
        return {}

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Restore the task's entries from the checkpoint `state` read from `path`."""

    def bad_file_names(self, indices: list[int]) -> list[str]:
        return [str(i) for i in indices]

    def report(self, steps: int) -> dict:
        """After the last epoch, under the run lock, on every process (writing is rank 0's): export, final
        evaluation and the summary file; -> the summary the command returns."""
        return {}
