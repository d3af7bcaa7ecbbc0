"""The one training loop. Pre-training, tokenizer training, fine-tuning and segmentation are `Task`s: each says
what it trains and how one micro-batch becomes a loss; the loop owns everything else.

Owned here, once: device and precision, DDP (with `no_sync` while accumulating), gradient accumulation, gradient
clipping and the gradient norm, the lr schedule, an optional weight EMA, the metrics window (summed on the device,
one host sync per `train.log_every`), the non-finite guard (a non-finite loss or gradient is never applied and a
checkpoint with non-finite weights is never written), logging (JSONL, TensorBoard, a bar in a terminal or plain
progress lines in a log file), atomic checkpoints with the previous one kept, exact mid-epoch resume, and a
graceful stop on a pre-emption signal (SIGTERM/SIGUSR1: finish the step, checkpoint, exit with status 3).

Re-running the same command with the same `out` resumes: model, optimizer, scaler, EMA, RNG, the task's own
state and the position inside the epoch are restored, so on CPU a killed-and-resumed run logs exactly the metrics
of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..config import Config, to_dict
from ..config_yaml import dump_yaml
from ..errors import DiskFullError, DivergedError, TrainingError
from ..runtime import autocast, precision_and_reason, prepare_for_precision, resolve_device
from . import distributed as D
from .checkpoint import RunFolder, capture_rng, restore_rng
from .logging import MetricsLog, Progress, say
from .optim import lr_at, peak_lr, set_lr
from .signals import StopSignal
from .window import Window


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
    model: nn.Module
    batch_size: int
    num_images: int = 0  # training images per epoch (all processes), to report what full batches leave out

    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.ema = None  # the loop's weight EMA (timm ModelEmaV3) when train.ema, for `end_epoch` to evaluate

    def identity(self) -> dict:
        """Plain values (beyond `resume_keys`) that a checkpoint must share to continue this run."""
        return {}

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


def train(task: Task, finish: Callable[[int], dict] | None = None) -> dict:
    """Run `task` to its last epoch (or resume it), then `finish(steps)` (the export, final evaluation and
    summary), all under the run lock; -> {'steps', 'out', 'finished', 'report': what `finish` returned}."""
    cfg, rt = task.cfg, task.rt
    out = Path(cfg.out)
    folder = RunFolder(out, rt.main)
    resume = folder.load_resume(task.kind, cfg, task.resume_keys, task.identity())

    accum = cfg.optim.accum_steps
    micro = task.batches_per_epoch()
    steps_per_epoch = micro // accum
    if steps_per_epoch == 0:
        raise_config(f"optim.accum_steps {accum} is more than the {micro} batches per epoch")
    micro_per_epoch = steps_per_epoch * accum
    total = cfg.train.epochs * steps_per_epoch
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    effective_batch = task.batch_size * rt.world * accum
    lr_peak = peak_lr(cfg.optim, effective_batch)
    optimizer = task.build_optimizer(lr_peak)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16)
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        task.ema = ModelEmaV3(task.model, decay=cfg.train.ema_decay)

    pos, window = Position(), Window(rt.device, cfg.train.max_loss_jump)
    if resume is not None:
        task.model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if task.ema is not None and "ema" in resume:
            task.ema.module.load_state_dict(resume["ema"])
        task.load_state_dict(resume, folder.resumed_from)
        pos = Position(**resume["run"])
        window.load(resume["window"])
        restore_rng(resume["rng"], rt.device)
    folder.start(fresh=resume is None)  # run lock, stale temp files, metrics truncated to the checkpoint
    cleanup = contextlib.ExitStack()  # each runs even if one before it fails; the lock is released last
    cleanup.callback(folder.release)
    try:
        wandb = {"project": cfg.log.wandb_project, "mode": cfg.log.wandb_mode, "config": to_dict(cfg)}
        log = MetricsLog(out, enabled=rt.main, tensorboard=cfg.log.tensorboard,
                         run_id=resume.get("run_id") if resume else None, wandb=wandb if cfg.log.wandb else None,
                         purge_step=pos.step + 1)  # a fresh start purges a killed run's events too  # fmt: skip
        cleanup.callback(log.close)
        log.truncate_after(pos.step if resume is not None else -1)
        if rt.main:
            dump_yaml(cfg, out / "config.yaml")
        if resume is not None and pos.epoch >= cfg.train.epochs:
            say(f"'{folder.resumed_from}' holds a finished run ({pos.step} steps, {pos.epoch} epochs): nothing to "
                "train; reporting again (raise --epochs to train on)", rt.main)  # fmt: skip
        elif resume is not None:
            say(f"resuming from '{folder.resumed_from}' at step {pos.step} (epoch {pos.epoch + 1} of "
                f"{cfg.train.epochs}, batch {pos.batch})", rt.main)  # fmt: skip
        precision = f"; precision {rt.precision}" if rt.precision else ""
        say(task.describe(steps_per_epoch, effective_batch, lr_peak) + precision, rt.main)
        left_out = task.num_images - micro_per_epoch * task.batch_size * rt.world
        if left_out > 0:
            say(f"each epoch leaves out {left_out} of {task.num_images} images (batches are full: the last partial "
                "batch, and micro-batches short of an accumulation step, are dropped; a new order every epoch)",
                rt.main)  # fmt: skip

        model = task.model
        prepare_for_precision(model, rt.device, rt.amp)
        if rt.world > 1:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids,
                                            find_unused_parameters=task.find_unused_parameters)  # fmt: skip
        step_model = torch.compile(model) if cfg.train.compile else model

        def save(finished: bool = False) -> None:
            window.check_finite(pos.step, folder.last)
            state = {
                "mimkit_version": __version__,
                "kind": task.kind,
                "method": task.identity().get("method", task.kind),  # what trained (plain value, for tools)
                "config": to_dict(cfg),
                "identity": task.identity(),
                "model": task.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "run": dict(pos.__dict__),
                "window": window.state(),
                "rng": capture_rng(rt.device),
                "run_id": log.run_id,
                "finished": finished,
            }
            extra = task.state_dict()
            assert not set(extra) & set(state), f"task state keys {set(extra) & set(state)} clash with the loop's"
            state.update(extra)
            if task.ema is not None:
                state["ema"] = task.ema.module.state_dict()
            folder.save(state, task.model, cfg.train.keep_checkpoints)

        bar = Progress(total, pos.step, rt.main, cfg.train.log_every)
        cleanup.callback(bar.close)
        bad_limit = task_bad_limit(cfg, task)
        stop = StopSignal(cfg.train.stop_signals)
        cleanup.callback(stop.restore)
        params = [p for p in task.model.parameters() if p.requires_grad]
        task.model.train()
        while pos.epoch < cfg.train.epochs:
            bad_seen: set[int] = set()
            for batch in task.batches(pos.epoch, pos.batch):
                if pos.batch >= micro_per_epoch:
                    break
                update = (pos.batch + 1) % accum == 0
                sync = contextlib.nullcontext() if update or rt.world == 1 else model.no_sync()
                with sync:
                    with rt.autocast():
                        loss, metrics, bad = task.step(step_model, batch)
                    scaler.scale(loss / accum).backward()
                if bad:
                    bad_seen.update(bad)
                    if len(bad_seen) > bad_limit:  # listed first: the file names are what the user needs
                        folder.record_bad_files(pos.epoch + 1, task.bad_file_names(sorted(bad_seen)))
                        raise_data(cfg, task, bad_seen, bad_limit, folder.bad_files)
                window.add(loss, metrics, pos.step + 1, task.batch_size * rt.world)
                pos.batch += 1
                if not update:
                    continue
                lr = task.lr(pos.step, total, warmup, lr_peak)
                set_lr(optimizer, lr)
                if scaler.is_enabled():
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad or math.inf)
                if not scaler.is_enabled():  # fp16's scaler skips non-finite steps itself (and lowers its scale)
                    window.guard(grad_norm, pos.step + 1, params)
                window.add_grad_norm(grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                if task.ema is not None:
                    task.ema.update(task.model, step=pos.step)
                task.after_step(pos.step, total)
                if pos.step % cfg.train.log_every == 0 or pos.step == total:
                    window.check_finite(pos.step, folder.last)
                    record = {"step": pos.step, "epoch": pos.epoch + 1, "lr": lr, **window.flush(rt)}
                    log.write(record)
                    bar.log(record)
                bar.update(pos.step)
                stopping = stop.requested(pos.step, cfg.train.log_every)
                # not on an epoch's last step: that state is saved after the epoch-end work (evaluation), so a
                # resume never sits between that work's log lines and the checkpoint and logs them twice
                every = cfg.train.checkpoint_every
                if (stopping or (every and pos.step % every == 0)) and pos.batch < micro_per_epoch:
                    save()
                if stopping:
                    stop.exit(folder.last)
            bad_total = D.all_reduce_sum_int(len(bad_seen), rt.device)
            if bad_total:
                folder.record_bad_files(pos.epoch + 1, task.bad_file_names(sorted(bad_seen)))
                say(f"epoch {pos.epoch + 1}: skipped {bad_total} unreadable image(s); listed in "
                    f"'{folder.bad_files}'", rt.main)  # fmt: skip
            pos.epoch, pos.batch = pos.epoch + 1, 0
            extra = task.end_epoch(pos.epoch, pos.step, pos.epoch >= cfg.train.epochs)
            if extra:
                log.write({"step": pos.step, "epoch": pos.epoch, **extra})
            D.barrier()  # rank 0 may have evaluated alone
            save(finished=pos.epoch >= cfg.train.epochs)
            if stop.requested():
                stop.exit(folder.last)
        report = finish(pos.step) if finish is not None else {}
        cleanup.close()  # a full disk while TensorBoard closes is said like any other
    except DivergedError as e:
        kept = folder.after_divergence(e.step)
        raise TrainingError(f"{e}; {kept} (re-run with a lower optim.blr, optim.clip_grad or train.precision=fp32, "
                            "and --allow-config-change to go on from it)") from None  # fmt: skip
    except DiskFullError as e:
        holds = folder.holds()
        said = f"{e}" if holds in str(e) else f"{e}; {holds}"
        raise DiskFullError(f"{said}; free some space and re-run the same command to go on") from None
    finally:
        cleanup.close()
    return {"steps": pos.step, "out": out, "finished": True, "report": report}


def seconds_per_step(task: Task, steps: int = 4) -> float:
    """Wall time of one training step of `task` (data included), through the loop's own step path, averaged over
    `steps` steps after a first one that pays one-off costs. lr 0: the weights stay as built."""
    rt, optimizer = task.rt, task.build_optimizer(0.0)
    prepare_for_precision(task.model, rt.device, rt.amp)
    task.model.train()
    t0, done = time.perf_counter(), 0
    for batch in task.batches(0, 0):
        with rt.autocast():
            loss, _, _ = task.step(task.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        if done == 1:
            t0 = time.perf_counter()
        if done > steps:
            break
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(done - 1, 1)


def task_bad_limit(cfg: Config, task: Task) -> int:
    """Unreadable files tolerated per epoch: data.bad_file_limit of the images, and at least one."""
    return max(1, int(cfg.data.bad_file_limit * task.batches_per_epoch() * task.batch_size * task.rt.world))


def raise_config(message: str):
    from ..errors import ConfigError

    raise ConfigError(message)


def raise_data(cfg: Config, task: Task, bad: set[int], limit: int, listed: Path):
    from ..errors import DataError

    names = task.bad_file_names(sorted(bad)[:3])
    raise DataError(
        f"{len(bad)} unreadable images in '{cfg.data.path}' this epoch, more than data.bad_file_limit="
        f"{cfg.data.bad_file_limit} allows ({limit}); e.g. {names}, all listed in '{listed}'"
    )
