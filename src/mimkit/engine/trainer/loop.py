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
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ... import __version__
from ...config import Config, to_dict
from ...config_yaml import dump_yaml
from ...errors import DivergedError, TrainingError, WriteError, write_advice
from ...runtime import prepare_for_precision
from . import distributed as D
from .checkpoint import RunFolder, capture_rng, restore_rng
from .logging import MetricsLog, Progress, say
from .optim import decaying_groups, peak_lr, set_weight_decay
from .signals import StopSignal
from .step import StepPath
from .task import Position, Runtime, Task, start_runtime
from .window import Window


def run(cfg: Config, make_task: Callable[[Runtime], Task]) -> dict:
    """The one entry of every training command: start the runtime (device, precision, process group), build the
    task, train it and its `report` under the run lock, wait for every process, leave the group. -> the report."""
    try:
        rt = start_runtime(cfg)
        task = make_task(rt)
        report = train(task, finish=task.report)["report"]
        D.barrier()
        return report
    finally:
        D.shutdown()


def train(task: Task, finish: Callable[[int], dict] | None = None) -> dict:
    """Run `task` to its last epoch (or resume it), then `finish(steps)` (the export, final evaluation and
    summary), all under the run lock; -> {'steps', 'out', 'finished', 'report': what `finish` returned}."""
    loop = Loop(task)
    resume = loop.folder.load_resume(task.kind, task.cfg, task.resume_keys, task.identity(), task.method_sections())
    if resume is not None:
        loop.restore(resume)
    loop.folder.start(fresh=resume is None)  # run lock, stale temp files, metrics truncated to the checkpoint
    cleanup = contextlib.ExitStack()  # each runs even if one before it fails; the lock is released last
    cleanup.callback(loop.folder.release)
    try:
        loop.open(resume, cleanup)
        while loop.pos.epoch < task.cfg.train.epochs:
            loop.run_epoch()
            loop.end_epoch()
        report = finish(loop.pos.step) if finish is not None else {}
        cleanup.close()  # a full disk while TensorBoard closes is said like any other
    except DivergedError as e:
        kept = loop.folder.after_divergence(e.step)
        raise TrainingError(f"{e}; {kept} (re-run with a lower optim.blr, optim.clip_grad or train.precision=fp32, "
                            "and --allow-config-change to go on from it)") from None  # fmt: skip
    except WriteError as e:
        holds = loop.folder.holds()
        said = f"{e}" if holds in str(e) else f"{e}; {holds}"
        advice = f"{write_advice(e.reason)} and re-run the same command to go on"
        raise WriteError(f"{said}; {advice}", e.reason, advised=True) from None
    finally:
        cleanup.close()
    return {"steps": loop.pos.step, "out": loop.out, "finished": True, "report": report}


class Loop:
    """One run of `train`, in its phases: the schedule and training state (`__init__`), `restore` from a
    checkpoint, `open` (log, first lines, the wrapped model), `run_epoch` (steps, logging, mid-epoch checkpoints
    and stops), `end_epoch` (the task's epoch-end work, then the epoch's checkpoint)."""

    def __init__(self, task: Task):
        cfg, rt = task.cfg, task.rt
        self.task, self.cfg, self.rt = task, cfg, rt
        self.out = Path(cfg.out)
        self.folder = RunFolder(self.out, rt.main)
        self.accum = cfg.optim.accum_steps
        micro = task.batches_per_epoch()
        self.steps_per_epoch = micro // self.accum
        if self.steps_per_epoch == 0:
            raise_config(f"optim.accum_steps {self.accum} is more than the {micro} batches per epoch")
        self.micro_per_epoch = self.steps_per_epoch * self.accum
        self.total = cfg.train.epochs * self.steps_per_epoch
        self.warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.effective_batch = task.batch_size * rt.world * self.accum
        self.lr_peak = peak_lr(cfg.optim, self.effective_batch)
        self.optimizer = task.build_optimizer(self.lr_peak)
        if cfg.optim.weight_decay_end is not None and not decaying_groups(self.optimizer):
            raise_config(f"optim.weight_decay_end {cfg.optim.weight_decay_end}: no parameter group of this task "
                         "decays (built with optim.weight_decay 0): set optim.weight_decay > 0")  # fmt: skip
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16)
        if cfg.train.ema:
            from timm.utils import ModelEmaV3

            task.ema = ModelEmaV3(task.model, decay=cfg.train.ema_decay)
        self.pos, self.window = Position(), Window(rt.device, cfg.train.max_loss_jump)

    # ---- phases --------------------------------------------------------------------------------------------
    def restore(self, resume: dict) -> None:
        """Model, optimizer, scaler, EMA, the task's state, position, metrics window and RNG from a checkpoint."""
        task = self.task
        task.model.load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        if self.cfg.optim.weight_decay_end is None:  # a schedule turned off on resume: back to the constant
            set_weight_decay(self.optimizer, self.cfg.optim.weight_decay)
        if resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        if task.ema is not None and "ema" in resume:
            task.ema.module.load_state_dict(resume["ema"])
        task.load_state_dict(resume, self.folder.resumed_from)
        self.pos = Position(**resume["run"])
        self.window.load(resume["window"])
        restore_rng(resume["rng"], self.rt.device)

    def open(self, resume: dict | None, cleanup: contextlib.ExitStack) -> None:
        """The metrics log (cut back to the checkpoint), config.yaml, the run's first lines, the model as the
        steps see it (precision kernels, SyncBatchNorm, DDP, compile), the step path, progress bar and stop signal."""
        cfg, rt, task, pos = self.cfg, self.rt, self.task, self.pos
        wandb = {
            "project": cfg.log.wandb_project,
            "mode": cfg.log.wandb_mode,
            "config": to_dict(cfg, task.method_sections()),
        }
        self.log = MetricsLog(self.out, enabled=rt.main, tensorboard=cfg.log.tensorboard,
                              run_id=resume.get("run_id") if resume else None,
                              wandb=wandb if cfg.log.wandb else None,
                              purge_step=pos.step + 1)  # a fresh start purges a killed run's events too  # fmt: skip
        cleanup.callback(self.log.close)
        self.log.truncate_after(pos.step if resume is not None else -1)
        if rt.main:
            dump_yaml(cfg, self.out / "config.yaml", task.method_sections())
        self.announce(resume)
        model = task.model
        prepare_for_precision(model, rt.device, rt.amp)
        if rt.world > 1:
            if D.sync_batchnorm(model, task.sync_batchnorm):
                say("BatchNorm layers normalise over the global batch (SyncBatchNorm)", rt.main)
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids,
                                            find_unused_parameters=task.find_unused_parameters)  # fmt: skip
        step_model = torch.compile(model) if cfg.train.compile else model
        self.path = StepPath(task, model, step_model, self.optimizer, self.scaler, self.window, self.accum,
                             cfg.optim.clip_grad)  # fmt: skip
        self.bar = Progress(self.total, pos.step, rt.main, cfg.train.log_every)
        cleanup.callback(self.bar.close)
        self.bad_limit = task_bad_limit(cfg, task)
        self.stop = StopSignal(cfg.train.stop_signals)
        cleanup.callback(self.stop.restore)
        task.model.train()

    def announce(self, resume: dict | None) -> None:
        cfg, rt, pos, folder = self.cfg, self.rt, self.pos, self.folder
        if resume is not None and pos.epoch >= cfg.train.epochs:
            say(f"'{folder.resumed_from}' holds a finished run ({pos.step} steps, {pos.epoch} epochs): nothing to "
                "train; reporting again (raise --epochs to train on)", rt.main)  # fmt: skip
        elif resume is not None:
            say(f"resuming from '{folder.resumed_from}' at step {pos.step} (epoch {pos.epoch + 1} of "
                f"{cfg.train.epochs}, batch {pos.batch})", rt.main)  # fmt: skip
        precision = f"; precision {rt.precision}" if rt.precision else ""
        say(self.task.describe(self.steps_per_epoch, self.effective_batch, self.lr_peak) + precision, rt.main)
        left_out = self.task.num_images - self.micro_per_epoch * self.task.batch_size * rt.world
        if left_out > 0:
            say(f"each epoch leaves out {left_out} of {self.task.num_images} images (batches are full: the last "
                "partial batch, and micro-batches short of an accumulation step, are dropped; a new order every "
                "epoch)", rt.main)  # fmt: skip

    def run_epoch(self) -> None:
        """The steps of the epoch in progress, from its saved position; unreadable images counted and listed."""
        cfg, rt, task, pos = self.cfg, self.rt, self.task, self.pos
        bad_seen: set[int] = set()
        for batch in task.batches(pos.epoch, pos.batch):
            if pos.batch >= self.micro_per_epoch:
                break
            update = (pos.batch + 1) % self.accum == 0
            loss, metrics, bad = self.path.forward_backward(batch, update)
            if bad:
                bad_seen.update(bad)
                if len(bad_seen) > self.bad_limit:  # listed first: the file names are what the user needs
                    self.folder.record_bad_files(pos.epoch + 1, task.bad_file_names(sorted(bad_seen)))
                    raise_data(cfg, task, bad_seen, self.bad_limit, self.folder.bad_files)
            self.window.add(loss, metrics, pos.step + 1, task.batch_size * rt.world)
            pos.batch += 1
            if update:
                self.optimizer_step()
        bad_total = D.all_reduce_sum_int(len(bad_seen), rt.device)
        if bad_total:
            self.folder.record_bad_files(pos.epoch + 1, task.bad_file_names(sorted(bad_seen)))
            say(f"epoch {pos.epoch + 1}: skipped {bad_total} unreadable image(s); listed in "
                f"'{self.folder.bad_files}'", rt.main)  # fmt: skip

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients, then log, checkpoint or stop when due."""
        cfg, pos = self.cfg, self.pos
        lr = self.task.lr(pos.step, self.total, self.warmup, self.lr_peak)
        self.path.apply(lr, pos.step + 1, self.total)
        pos.step += 1
        if pos.step % cfg.train.log_every == 0 or pos.step == self.total:
            self.window.check_finite(pos.step, self.folder.last)
            record = {"step": pos.step, "epoch": pos.epoch + 1, "lr": lr, **self.window.flush(self.rt)}
            self.log.write(record)
            self.bar.log(record)
        self.bar.update(pos.step)
        stopping = self.stop.requested(pos.step, cfg.train.log_every)
        # not on an epoch's last step: that state is saved after the epoch-end work (evaluation), so a resume
        # never sits between that work's log lines and the checkpoint and logs them twice
        every = cfg.train.checkpoint_every
        if (stopping or (every and pos.step % every == 0)) and pos.batch < self.micro_per_epoch:
            self.save()
        if stopping:
            self.stop.exit(self.folder.last)

    def end_epoch(self) -> None:
        pos = self.pos
        pos.epoch, pos.batch = pos.epoch + 1, 0
        extra = self.task.end_epoch(pos.epoch, pos.step, pos.epoch >= self.cfg.train.epochs)
        if extra:
            self.log.write({"step": pos.step, "epoch": pos.epoch, **extra})
        D.barrier()  # rank 0 may have evaluated alone
        self.save(finished=pos.epoch >= self.cfg.train.epochs)
        if self.stop.requested():
            self.stop.exit(self.folder.last)

    def save(self, finished: bool = False) -> None:
        """The checkpoint: tensors and plain values only, never with non-finite weights."""
        task, pos = self.task, self.pos
        self.window.check_finite(pos.step, self.folder.last)
        state = {
            "mimkit_version": __version__,
            "kind": task.kind,
            "method": task.identity().get("method", task.kind),  # what trained (plain value, for tools)
            "config": to_dict(self.cfg, task.method_sections()),
            "identity": task.identity(),
            "model": task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "run": dict(pos.__dict__),
            "window": self.window.state(),
            "rng": capture_rng(self.rt.device),
            "run_id": self.log.run_id,
            "finished": finished,
        }
        extra = task.state_dict()
        assert not set(extra) & set(state), f"task state keys {set(extra) & set(state)} clash with the loop's"
        state.update(extra)
        if task.ema is not None:
            state["ema"] = task.ema.module.state_dict()
        self.folder.save(state, task.model, self.cfg.train.keep_checkpoints)


def task_bad_limit(cfg: Config, task: Task) -> int:
    """Unreadable files tolerated per epoch: data.bad_file_limit of the images, and at least one."""
    return max(1, int(cfg.data.bad_file_limit * task.batches_per_epoch() * task.batch_size * task.rt.world))


def raise_config(message: str):
    from ...errors import ConfigError

    raise ConfigError(message)


def raise_data(cfg: Config, task: Task, bad: set[int], limit: int, listed: Path):
    from ...errors import DataError

    names = task.bad_file_names(sorted(bad)[:3])
    raise DataError(
        f"{len(bad)} unreadable images in '{cfg.data.path}' this epoch, more than data.bad_file_limit="
        f"{cfg.data.bad_file_limit} allows ({limit}); e.g. {names}, all listed in '{listed}'"
    )
