"""Run outputs: metrics as JSON lines (always), TensorBoard (when installed), a progress bar in a terminal."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

TIMING_KEYS = ("img_per_s", "time")  # differ between runs by nature; everything else is reproducible


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run rewrites them, so the file reads like one run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 7) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, int | float):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress(total: int, initial: int, enabled: bool):
    """A tqdm bar only when stderr is a terminal (cluster logs stay clean); otherwise a no-op object."""
    if enabled and sys.stderr.isatty():
        return tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, flush=True)
