"""Run outputs: metrics as JSON lines (always), TensorBoard (when installed), a progress bar in a terminal."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from ...atomic import on_write_failure, replace_text
from ...errors import write_failure

TIMING_KEYS = ("img_per_s", "time")  # differ between runs by nature; everything else is reproducible


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`; mirrors scalars to TensorBoard. `run_id` names the
    run across resumes (kept in the checkpoint; a tracker such as W&B continues the same run with it)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True, run_id: str | None = None,
                 wandb: dict | None = None, purge_step: int | None = None):  # fmt: skip
        """`wandb`: {"project", "mode", "config"} to log to Weights & Biases too (None: off)."""
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.writer = self.wandb = None
        if enabled and wandb is not None:
            self.wandb = start_wandb(out, self.run_id, **wandb)
        self.events = out / "tensorboard"
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
                SummaryWriter = None
            if SummaryWriter is not None:
                quiet_full_disk_in_threads()
                with on_write_failure(self.events):
                    # a resumed run drops the events it will log again, as metrics.jsonl drops its lines
                    self.writer = SummaryWriter(str(self.events), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (-1: all): a resumed run rewrites them, so the file reads like one run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        replace_text(self.path, "".join(line + "\n" for line in kept))  # a kill leaves the old file or the new one

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 7) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with on_write_failure(self.path, f"'{self.path.name}' holds the lines before step {record['step']}"):
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, int | float)}
        if self.writer is not None:
            with on_write_failure(self.events, f"TensorBoard's event files hold the steps before {record['step']}"):
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, record["step"])
                self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": record.get("epoch")}, step=record["step"])

    def close(self) -> None:
        writer, self.writer = self.writer, None  # closed once, even when closing fails
        if writer is not None:
            with on_write_failure(self.events, "TensorBoard's event files hold what was flushed before"):
                writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def quiet_full_disk_in_threads() -> None:
    """A failed write in TensorBoard's writer thread (a full disk anywhere; EIO, EACCES, EPERM there, where every
    call writes): no traceback from the thread, since the writer raises the same error in the main thread at its
    next call, which says it in one line. Every other thread error as before (an EIO elsewhere may be a read)."""
    previous = threading.excepthook
    if getattr(previous, "mimkit", False):
        return

    def hook(args):
        writer = type(args.thread).__module__.startswith("tensorboard.")
        if args.exc_value is None or write_failure(args.exc_value, writing=writer) is None:
            previous(args)

    hook.mimkit = True
    threading.excepthook = hook


def start_wandb(out: Path, run_id: str, project: str, mode: str, config: dict):
    """A W&B run with the mimkit run's id, so a resumed run continues it (resume='allow'); offline by default
    (compute nodes rarely reach the internet: `wandb sync out/wandb/...` later)."""
    try:
        import wandb
    except ImportError:
        from ...errors import ConfigError

        raise ConfigError("log.wandb=true needs the wandb package (pip install wandb)") from None
    return wandb.init(project=project, id=run_id, resume="allow", mode=mode, dir=str(out), name=out.name,
                      config=config)  # fmt: skip


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise (a batch job's log file, nohup, CI) one plain line per
    log interval on stdout: step, epoch, loss, images/s and the time left."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int):
        self.total, self.start_step, self.enabled, self.every = total, initial, enabled, every
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, record: dict) -> None:
        loss = record.get("loss")
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f}")
            return
        if not self.enabled:
            return
        step = record["step"]
        done = step - self.start_step
        left = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}", f"epoch {record.get('epoch')}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if "img_per_s" in record:
            parts.append(f"{record['img_per_s']:.1f} img/s")
        parts.append(f"ETA {format_seconds(left)}")
        print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, flush=True)
