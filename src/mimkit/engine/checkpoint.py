"""Training-state checkpoints and the run folder they live in.

A checkpoint holds tensors and plain values only (it loads with `torch.load(weights_only=True)`). It is written to
a temporary file, fsynced and renamed over `last.pt`, after the previous `last.pt` became `prev.pt`: a crash at
any point leaves a complete newest state, and a corrupt `last.pt` falls back to `prev.pt` with a warning. A state
with a non-finite weight is never written. Rank 0 holds a lock file in the run folder while it trains, so a second
run into the same `--out` is refused instead of interleaving its checkpoints and metrics with the first.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import config_from_dict, to_dict
from ..errors import CheckpointError, TrainingError
from .logging import say
from .resume_check import check_config_change, flatten, with_patch_size


def save_atomic(state: dict, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (the old file becomes
    `prev.pt` first when `keep_previous`). A full disk raises CheckpointError naming the folder and the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if keep_previous and path.exists():
            prev = path.with_name("prev.pt")
            link = prev.with_name(f".{prev.name}.link.tmp")
            link.unlink(missing_ok=True)
            os.link(path, link)  # `path` stays in place until the new state replaces it
            os.replace(link, prev)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = state_bytes(state)
            raise CheckpointError(
                f"no space left in '{path.parent}' for a checkpoint of about {need / 2**20:.0f} MiB; "
                f"'{path}' still holds the previous state"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path, expect_method: str | None = None) -> dict:
    """Load a mimkit checkpoint safely; errors name the file (missing, unreadable, foreign, another method's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, zeroed, a pickle with code in it...
        # torch's own text advises weights_only=False, which is wrong advice for a file that may be crafted
        raise CheckpointError(
            f"checkpoint '{path}' is damaged or not a mimkit checkpoint: it does not load as tensors and plain values "
            f"({type(e).__name__}); it was not executed"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' is not a mimkit checkpoint (no 'model'/'config' entries)")
    if expect_method is not None and state.get("method") != expect_method:
        method = state.get("method")
        raise CheckpointError(f"checkpoint '{path}' was written by method '{method}', not '{expect_method}'")
    return state


def load_usable(path: Path) -> dict:
    """A checkpoint that loads and whose weights are all finite (a NaN weight cannot continue a run)."""
    state = load_checkpoint(path)
    bad = first_non_finite(state["model"]) if isinstance(state.get("model"), dict) else None
    if bad is not None:
        raise CheckpointError(f"checkpoint '{path}' holds a non-finite weight ('{bad}')")
    return state


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or inf (one host sync), or None."""
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(tensors[k]).all().to(tensors[names[0]].device) for k in names])
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


def capture_rng(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class RunFolder:
    """`out/checkpoints/{last,prev}.pt`, the run lock `out/.mimkit.lock`, and `out/bad_files.txt`."""

    def __init__(self, out: Path, main: bool):
        self.out, self.main = Path(out), main
        self.last = self.out / "checkpoints" / "last.pt"
        self.prev = self.last.with_name("prev.pt")
        self.lock = self.out / ".mimkit.lock"
        self.bad_files = self.out / "bad_files.txt"
        self.resumed_from: Path | None = None
        self.locked = False

    # ---- resume --------------------------------------------------------------------------------------------
    def load_resume(self, kind: str, cfg, resume_keys, identity: dict) -> dict | None:
        """The newest loadable checkpoint of this run, checked against it; None for a fresh start. A corrupt
        `last.pt` falls back to `prev.pt` with a warning naming both."""
        if not self.last.exists() and not self.prev.exists():
            return None
        try:
            state = load_usable(self.last)
            self.resumed_from = self.last
        except CheckpointError as e:
            if not self.prev.exists():
                raise
            try:
                state = load_usable(self.prev)
            except CheckpointError as e2:
                raise CheckpointError(f"neither checkpoint can continue the run: {e}; {e2}") from None
            self.resumed_from = self.prev
            say(f"warning: {e}; resuming from the previous checkpoint '{self.prev}' instead", self.main)
        changes = check_same_run(state, self.resumed_from, kind, cfg, resume_keys, identity)
        if changes:
            say(f"continuing '{self.resumed_from}' with changed settings (train.allow_config_change): "
                + "; ".join(changes), self.main)  # fmt: skip
        return state

    # ---- lock, clean-up ------------------------------------------------------------------------------------
    def start(self, fresh: bool) -> None:
        """Take the run lock, remove temporary files a killed run left behind, and say so when a fresh run starts
        in a folder that already holds results (its metrics.jsonl is truncated)."""
        if not self.main:
            return
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"--out '{self.out}' is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.acquire()
        for tmp in self.last.parent.glob(".*.tmp") if self.last.parent.exists() else []:
            tmp.unlink(missing_ok=True)
        metrics = self.out / "metrics.jsonl"
        if fresh and metrics.exists() and metrics.stat().st_size:
            say(f"'{self.out}' holds an earlier run's metrics but no checkpoint: starting from step 0 and "
                "truncating metrics.jsonl", True)  # fmt: skip

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_lock()
                if holder is not None and holder_alive(holder):
                    raise CheckpointError(
                        f"another run (pid {holder.get('pid')} on {holder.get('host')}) is writing into '{self.out}' "
                        f"(lock '{self.lock}'); wait for it, use another --out, or delete the lock if that run is gone"
                    ) from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.locked = True
            return
        raise CheckpointError(f"could not take the run lock '{self.lock}'")

    def read_lock(self) -> dict | None:
        try:
            return json.loads(self.lock.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.locked:
            self.lock.unlink(missing_ok=True)
            self.locked = False

    # ---- writing -------------------------------------------------------------------------------------------
    def save(self, state: dict, model: nn.Module, keep_epochs: int = 0) -> None:
        """Write `state` as the newest checkpoint (rank 0), unless a weight is not finite; at an epoch end with
        `keep_epochs`, also as `epoch-<E>.pt` (a hard link), keeping the newest `keep_epochs` of those."""
        bad = first_non_finite(state["model"])
        if bad is not None:
            raise TrainingError(
                f"weight '{bad}' is not finite at step {state['run']['step']}: not saved, so '{self.last}' keeps the "
                "last good state (try a lower optim.blr, optim.clip_grad, or train.precision=fp32)"
            )
        if self.main:
            save_atomic(state, self.last, keep_previous=True)
            if keep_epochs and state["run"]["batch"] == 0:
                snapshot = self.last.with_name(f"epoch-{state['run']['epoch']}.pt")
                snapshot.unlink(missing_ok=True)
                os.link(self.last, snapshot)
                kept = sorted(self.last.parent.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
                for old in kept[:-keep_epochs]:
                    old.unlink()

    def after_divergence(self, bad_step: int) -> str:
        """After a non-finite step: when the newest checkpoint is the state the diverged update started from, its
        weights may already be what overflows (a huge but finite step), so it moves aside and the one before it
        becomes `last.pt`. -> what the run folder now holds, for the message."""
        if not self.main:
            return "rank 0 says what the run folder holds"
        if not self.last.exists():
            return "no checkpoint was written yet"
        step = torch.load(self.last, map_location="cpu", weights_only=True)["run"]["step"]
        if step < bad_step - 1 or not self.prev.exists():
            return f"'{self.last}' holds step {step}, the last state saved before it"
        aside = self.last.with_name(f"diverged-step{step}.pt")
        os.replace(self.last, aside)
        os.replace(self.prev, self.last)
        prev_step = torch.load(self.last, map_location="cpu", weights_only=True)["run"]["step"]
        return (f"'{self.last}' now holds step {prev_step}, the checkpoint before the one of step {step} that the "
                f"diverged update started from (moved to '{aside}')")  # fmt: skip

    def record_bad_files(self, epoch: int, names: list[str]) -> None:
        if self.main:
            with self.bad_files.open("a") as f:
                f.writelines(f"epoch {epoch}\t{n}\n" for n in names)


def holder_alive(holder: dict) -> bool:
    """True unless the lock's process is known to be gone (same host, no such pid)."""
    if holder.get("host") != socket.gethostname():
        return True  # another node of a shared file system: cannot tell
    try:
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return False  # this process's own earlier run (runs in one process are sequential)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def check_same_run(state: dict, path: Path, kind: str, cfg, resume_keys, identity: dict) -> list[str]:
    """A checkpoint continues this run only if it is of the same `kind` and shares `identity` and the config
    values at `resume_keys`; otherwise an error naming the file and the first difference. Other settings that
    differ are refused too unless `train.allow_config_change` (resume_check.py). -> the allowed changes."""
    stored_kind = state.get("kind", "pretrain")
    if stored_kind != kind:
        raise CheckpointError(f"'{path}' is a {stored_kind} checkpoint, not a {kind} one; use another --out")
    stored = state.get("identity", {})
    for key, value in identity.items():
        old = stored.get(key, state.get(key))
        if old != value:
            raise CheckpointError(f"checkpoint '{path}' was written by {key} '{old}', not '{value}'; use another --out")
    old_cfg = to_dict(config_from_dict(state["config"]))  # keys added since then: their defaults
    new_cfg = to_dict(cfg)
    old_flat, new_flat = with_patch_size(flatten(old_cfg)), with_patch_size(flatten(new_cfg))  # None -> 16
    for key in resume_keys:
        a, b = old_flat.get(key, dotted(old_cfg, key)), new_flat.get(key, dotted(new_cfg, key))
        if a != b:
            raise CheckpointError(
                f"checkpoint '{path}' has {key}={a!r} but this run asks for {b!r}; use another --out or the same "
                "settings"
            )
    return check_config_change(path, old_cfg, new_cfg, cfg.train.allow_config_change, state.get("finished", False))
