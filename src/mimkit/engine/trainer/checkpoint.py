"""Training-state checkpoints and the run folder they live in.

A checkpoint holds tensors and plain values only (it loads with `torch.load(weights_only=True)`). It is written to
a temporary file, fsynced and renamed over `last.pt`, after the previous `last.pt` became `prev.pt`: a crash at
any point leaves a complete newest state, and a corrupt `last.pt` falls back to `prev.pt` with a warning. A state
with a non-finite weight is never written. Rank 0 holds a lock file in the run folder while it trains, so a second
run into the same `--out` is refused instead of interleaving its checkpoints and metrics with the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import torch
from torch import nn

from ...atomic import discard, on_write_failure, pid_alive, remove_leftovers, save_torch, temp_name
from ...config import to_dict
from ...errors import CheckpointError, TrainingError
from ...run_config import config_from_dict
from ...safe_load import torch_load_safely
from .logging import say
from .resume_check import check_config_change, flatten, with_patch_size

# the lock appears with its holder in it (a hard link of a complete file); an empty or unreadable one comes from
# an older mimkit, which created it empty and then wrote it: younger than this, its writer may still be at work
UNREADABLE_LOCK_GRACE_S = 10


def load_checkpoint(path: str | Path, expect_method: str | None = None) -> dict:
    """Load a mimkit checkpoint safely; errors name the file (missing, unreadable, foreign, another method's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch_load_safely(path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint '{path}' is damaged or not a mimkit checkpoint: {e}") from None
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
    def load_resume(self, kind: str, cfg, resume_keys, identity: dict, sections=()) -> dict | None:
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
        changes = check_same_run(state, self.resumed_from, kind, cfg, resume_keys, identity, sections)
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
        self.acquire()
        for tmp in self.last.parent.glob(".*.tmp") if self.last.parent.exists() else []:
            discard(tmp)  # the lock is ours: no other writer is at work in here
        for name in ("encoder", "metrics.jsonl", "config.yaml", "summary.json", "bad_files.txt"):
            remove_leftovers(self.out / name)
        metrics = self.out / "metrics.jsonl"
        if fresh and metrics.exists() and metrics.stat().st_size:
            say(f"'{self.out}' holds an earlier run's metrics but no checkpoint: starting from step 0 and "
                "truncating metrics.jsonl", True)  # fmt: skip

    def acquire(self) -> None:
        """Take `out/.mimkit.lock`: a file holding this process's pid, host and start time, written in full beside
        it and hard-linked to its name, so the lock never exists half-written. A lock whose process is gone on this
        host is taken over; one that is unreadable only once it is older than UNREADABLE_LOCK_GRACE_S."""
        if self.locked:
            return
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        tmp = self.lock.with_name(temp_name(self.lock) + "tmp")
        with on_write_failure(self.lock, "no lock was taken and nothing was written"):
            self.out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.lock)
            try:
                with tmp.open("w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
                for _ in range(3):
                    try:
                        os.link(tmp, self.lock)  # fails if the name exists: the one atomic step
                        self.locked = True
                        return
                    except FileExistsError:
                        self.remove_stale_lock()
            finally:
                discard(tmp)  # the lock stands; a leftover is removed once this run is gone
        raise CheckpointError(f"could not take the run lock '{self.lock}'")

    def remove_stale_lock(self) -> None:
        """Remove the lock if its holder is gone; otherwise refuse, naming the holder. The lock is moved aside
        before it is removed, and put back if what was moved is not the lock judged stale (another run took the
        stale lock over in between)."""
        holder = self.read_lock()
        if holder is None:
            try:
                age = time.time() - self.lock.stat().st_mtime
            except FileNotFoundError:
                return
            if age < UNREADABLE_LOCK_GRACE_S:
                raise CheckpointError(f"the run lock '{self.lock}' is being written by another run; wait for it or "
                                      "use another --out")  # fmt: skip
        elif holder_alive(holder):
            raise CheckpointError(
                f"another run (pid {holder.get('pid')} on {holder.get('host')}) is writing into '{self.out}' "
                f"(lock '{self.lock}'); wait for it, use another --out, or delete the lock if that run is gone"
            )
        aside = self.lock.with_name(temp_name(self.lock) + "stale.tmp")
        try:
            os.replace(self.lock, aside)
        except FileNotFoundError:
            return
        moved = read_json(aside)
        if moved != holder:  # a live run's lock, taken in the meantime: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.lock)
            discard(aside)
            raise CheckpointError(f"another run took the run lock '{self.lock}' just now; use another --out")
        discard(aside)  # a leftover of ours if refused: removed by the next run
        if holder is None:
            say(f"warning: removed the unreadable run lock '{self.lock}' (left by a run that is gone)", True)

    def read_lock(self) -> dict | None:
        return read_json(self.lock)

    def release(self) -> None:
        """Remove the run lock. One the device will not remove names this process, which is gone by the time a
        next run on this host looks: that run takes it over, so the results stand and a warning says so."""
        if self.locked:
            if (self.read_lock() or {}).get("pid") == os.getpid() and not discard(self.lock):
                say(f"warning: could not remove the run lock '{self.lock}'; a next run in '{self.out}' on this host "
                    "takes it over (from another host, delete it)", True)  # fmt: skip
            self.locked = False

    def holds(self) -> str:
        """What the newest checkpoint is, for a message after a failure: true whatever was or was not written."""
        if not self.main:
            return "rank 0 says what the run folder holds"
        if not self.last.exists():
            return "no checkpoint was written yet"
        try:
            return f"'{self.last}' holds step {saved_step(self.last)}"
        except Exception:  # noqa: BLE001 — damaged: say so rather than fail while reporting another failure
            return f"'{self.last}' does not load"

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
            save_torch(state, self.last, keep_previous=True, kept=self.holds)
            if keep_epochs and state["run"]["batch"] == 0:
                snapshot = self.last.with_name(f"epoch-{state['run']['epoch']}.pt")
                snapshot.unlink(missing_ok=True)
                os.link(self.last, snapshot)
                kept = sorted(self.last.parent.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
                for old in kept[:-keep_epochs]:
                    if not discard(old):  # an extra snapshot costs space, never the run
                        say(f"warning: could not remove '{old}' (train.keep_checkpoints={keep_epochs})", True)

    def after_divergence(self, bad_step: int) -> str:
        """After a non-finite step: when the newest checkpoint is the state the diverged update started from, its
        weights may already be what overflows (a huge but finite step), so it moves aside and the one before it
        becomes `last.pt`. -> what the run folder now holds, for the message."""
        if not self.main:
            return "rank 0 says what the run folder holds"
        if not self.last.exists():
            return "no checkpoint was written yet"
        step = saved_step(self.last)
        if step < bad_step - 1 or not self.prev.exists():
            return f"'{self.last}' holds step {step}, the last state saved before it"
        aside = self.last.with_name(f"diverged-step{step}.pt")
        os.replace(self.last, aside)
        os.replace(self.prev, self.last)
        prev_step = saved_step(self.last)
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
    except (TypeError, ValueError):
        return True
    if pid == os.getpid():
        return False  # this process's own earlier run (runs in one process are sequential)
    return pid_alive(pid)


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def saved_step(path: Path) -> int:
    """The step a checkpoint was saved at (memory-mapped: its tensors are not read)."""
    return torch_load_safely(path, mmap=True)["run"]["step"]


def check_same_run(state: dict, path: Path, kind: str, cfg, resume_keys, identity: dict, sections=()) -> list[str]:
    """A checkpoint continues this run only if it is of the same `kind` and shares `identity` and the config
    values at `resume_keys`; otherwise an error naming the file and the first difference. Other settings that
    differ are refused too unless `train.allow_config_change` (resume_check.py); of the method sections only
    `sections` (the ones this run uses) are compared, so checkpoints that recorded every section still resume.
    -> the allowed changes."""
    stored_kind = state.get("kind", "pretrain")
    if stored_kind != kind:
        raise CheckpointError(f"'{path}' is a {stored_kind} checkpoint, not a {kind} one; use another --out")
    stored = state.get("identity", {})
    for key, value in identity.items():
        old = stored.get(key, state.get(key))
        if old != value:
            raise CheckpointError(f"checkpoint '{path}' was written by {key} '{old}', not '{value}'; use another --out")
    old_cfg = to_dict(config_from_dict(state["config"]), sections)  # keys added since then: their defaults
    new_cfg = to_dict(cfg, sections)
    old_flat, new_flat = with_patch_size(flatten(old_cfg)), with_patch_size(flatten(new_cfg))  # None -> 16
    for key in resume_keys:
        a, b = old_flat.get(key, dotted(old_cfg, key)), new_flat.get(key, dotted(new_cfg, key))
        if a != b:
            raise CheckpointError(
                f"checkpoint '{path}' has {key}={a!r} but this run asks for {b!r}; use another --out or the same "
                "settings"
            )
    return check_config_change(path, old_flat, new_flat, cfg.train.allow_config_change, state.get("finished", False))
