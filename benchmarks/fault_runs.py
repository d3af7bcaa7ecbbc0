"""The fault campaign's machinery (benchmarks/faults.py): each run of the CLI in a process of its own, forked from
a server that imported mimkit once, with faults installed in it (a disk that fills, the network refused and
counted); and what a finished or killed run leaves, compared with an uninterrupted one."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from mimkit.engine.trainer.checkpoint import load_checkpoint
from mimkit.engine.trainer.logging import TIMING_KEYS

PRELOAD = ["torch", "timm", "sklearn.datasets", "torch.utils.tensorboard", "safetensors.torch", "mimkit.cli",
           "mimkit.engine.tasks.pretrain", "mimkit.engine.tasks.finetune", "mimkit.engine.tasks.segment",
           "mimkit.export"]  # fmt: skip


# ---- runs in processes of their own ---------------------------------------------------------------------------


def child(job: dict) -> None:
    """Each command of `job` with stdout+stderr in its log, under the job's faults; the exit codes and network
    attempts go to job['result']. An uncaught exception prints its traceback and counts as status 1, as under
    `python -m mimkit.cli`."""
    attempts = install_faults(job["faults"])
    from mimkit.cli import main

    codes = []
    for argv, log in job["commands"]:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2), os.close(fd)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 — exactly what the campaign counts
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        codes.append(code)
    Path(job["result"]).write_text(json.dumps({"codes": codes, "network": attempts}))
    os._exit(codes[-1])


def install_faults(faults: dict) -> list[str]:
    """A checkpoint writer that fills the disk, an export writer that does, and/or the network counted and
    refused. -> the list network attempts are appended to."""
    attempts: list[str] = []
    if "checkpoint_full_at" in faults:
        from mimkit import atomic

        atomic.torch = FullDiskTorch(**faults["checkpoint_full_at"])  # the checkpoint writer's torch.save
    if faults.get("export_full"):
        from mimkit import atomic

        def save_file(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        atomic.save_file = save_file
    if faults.get("block_network"):
        block_network(attempts)
    if "slow_export" in faults:
        install_slow_export(faults["slow_export"])
    if "tensorboard_fault" in faults:
        install_tensorboard_fault(**faults["tensorboard_fault"])
    return attempts


def install_tensorboard_fault(at: int, fault: str) -> None:
    """TensorBoard's writer thread fails its `at`-th write with ENOSPC, or is SIGKILLed there (the whole run)."""
    import signal

    from tensorboard.summary.writer import record_writer

    real, calls = record_writer.RecordWriter.write, []

    def write(self, data):
        calls.append(1)
        if len(calls) == at:
            if fault == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    record_writer.RecordWriter.write = write


def install_slow_export(marker: str) -> None:
    """The export of a run waits 2 s after writing `marker`: a window for a second run to try the lock."""
    from mimkit.engine import pretrain

    export = pretrain.export_method

    def slow(*args, **kwargs):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(2)
        return export(*args, **kwargs)

    pretrain.export_method = slow


class FullDiskTorch:
    """`torch` as mimkit.atomic (the checkpoint writer) sees it, except that the `at`-th save copies the checkpoints in
    `folder` to `snapshot` (what must survive), writes a few bytes and fails with `code`."""

    def __init__(self, at: int, folder: str, snapshot: str, code: int = errno.ENOSPC):
        self.calls, self.at, self.folder, self.snapshot, self.code = 0, at, Path(folder), Path(snapshot), code

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls < self.at:
            return torch.save(obj, f, *args, **kwargs)
        self.snapshot.mkdir(parents=True, exist_ok=True)
        for p in self.folder.glob("*.pt"):
            shutil.copyfile(p, self.snapshot / p.name)
        f.write(b"PK\x03\x04 partial")
        f.flush()
        raise OSError(self.code, os.strerror(self.code))


def block_network(attempts: list[str]) -> None:
    """Sockets (but Unix ones: loader workers), DNS, and the Hub/timm/torch download functions record the attempt
    and fail."""
    import socket

    import huggingface_hub
    import timm.models._factory as timm_factory
    import timm.models._hub as timm_hub

    def refuse(name, real=None):
        def blocked(*args, **kwargs):
            if real is not None and args[0].family == socket.AF_UNIX:
                return real(*args, **kwargs)
            attempts.append(name)
            raise OSError(f"network access attempted: {name}")

        return blocked

    for method in ("connect", "connect_ex"):
        setattr(socket.socket, method, refuse(f"socket.{method}", getattr(socket.socket, method)))
    targets = {
        socket: ("create_connection", "getaddrinfo"),
        torch.hub: ("download_url_to_file", "load_state_dict_from_url"),
        huggingface_hub: ("hf_hub_download", "snapshot_download", "model_info"),
        timm_factory: ("load_model_config_from_hf",),
        timm_hub: ("hf_hub_download", "download_from_hf", "load_model_config_from_hf", "load_state_dict_from_hf"),
    }
    for module, names in targets.items():
        for name in names:
            setattr(module, name, refuse(f"{module.__name__}.{name}"))


class Run:
    """One child process running `commands` one after the other; logs and result under `logs`."""

    ctx, count = None, 0

    def __init__(self, logs: Path, *commands: list[str], faults: dict | None = None):
        if Run.ctx is None:
            Run.ctx = mp.get_context("forkserver")
            Run.ctx.set_forkserver_preload(PRELOAD)
        Run.count += 1
        self.logs = [logs / f"{Run.count:04d}-{i}.log" for i in range(len(commands))]
        self.result = logs / f"{Run.count:04d}.json"
        job = {"commands": list(zip(commands, map(str, self.logs))), "faults": faults or {}, "result": str(self.result)}
        self.proc = Run.ctx.Process(target=child, args=(job,))
        self.proc.start()

    def wait(self) -> Run:
        self.proc.join()
        return self

    @property
    def code(self) -> int | None:
        return self.proc.exitcode

    def text(self, i: int = -1) -> str:
        return self.logs[i].read_text() if self.logs[i].exists() else ""

    def last_line(self) -> str:
        lines = self.text().strip().splitlines()
        return lines[-1] if lines else ""

    def outcome(self) -> dict:
        return json.loads(self.result.read_text()) if self.result.exists() else {"codes": [self.code], "network": []}

    def tracebacks(self) -> int:
        bad_codes = sum(c not in (0, 1, 2) for c in self.outcome()["codes"])
        return bad_codes + sum("Traceback" in self.text(i) for i in range(len(self.logs)))


# ---- what a run leaves ----------------------------------------------------------------------------------------


def tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict | list | tuple):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders anywhere in `out` (checkpoint writes, export folders)."""
    found = [p for p in out.rglob(".*") if ".tmp" in p.name or p.name.startswith(".encoder.")]
    return sorted(str(p.relative_to(out)) for p in found)


def newest_state(out: Path) -> str:
    """The newest checkpoint: 'step N, loads, finite', 'none yet', or what is wrong with it."""
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        return "prev.pt without last.pt" if last.with_name("prev.pt").exists() else "none yet"
    try:
        state = load_checkpoint(last)
    except Exception as e:  # noqa: BLE001
        return f"unreadable: {str(e)[:80]}"
    bad = [k for k, t in tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()]
    return f"non-finite {bad[:2]}" if bad else f"step {state['run']['step']}, loads, finite"


def same_as(ref: Path, out: Path) -> tuple[bool, str]:
    """Every tensor of the final checkpoint and of the export, and metrics.jsonl, equal to `ref`'s; no duplicate
    line, no temporary file, no lock."""
    from safetensors.torch import load_file

    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (ref, out))
    ta, tb = dict(tensors(a)), dict(tensors(b))
    diff = sorted(set(ta) ^ set(tb)) + [k for k in ta if k in tb and not torch.equal(ta[k], tb[k])]
    ea, eb = (load_file(str(p / "encoder" / "model.safetensors")) for p in (ref, out))
    ediff = sorted(set(ea) ^ set(eb)) + [k for k in ea if k in eb and not torch.equal(ea[k], eb[k])]
    ma, mb = metrics(ref), metrics(out)
    dup = len(mb) - len({json.dumps(r, sort_keys=True) for r in mb})
    left = leftovers(out) + [".mimkit.lock"] * (out / ".mimkit.lock").exists()
    ok = not (diff or ediff or dup or left) and ma == mb and a["run"] == b["run"] and b["finished"]
    detail = (f"{len(ta) - len(diff)}/{len(ta)} checkpoint and {len(ea) - len(ediff)}/{len(ea)} export tensors "
              f"equal, metrics {'equal' if ma == mb else 'DIFFER'} ({len(mb)} lines, {dup} duplicate)")  # fmt: skip
    return ok, detail + (f", left behind: {left}" if left else "") + (f", differ: {diff[:3]}" if diff else "")


def tensorboard_points(out: Path) -> str:
    """Loss points in the run's TensorBoard files and the steps they cover (a point per step when none repeats)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for f in sorted((out / "tensorboard").glob("events*")):
        (acc := EventAccumulator(str(f))).Reload()
        steps += [e.step for e in acc.Scalars("loss")] if "loss" in acc.Tags()["scalars"] else []
    return f"TensorBoard: {len(steps)} loss points for {len(set(steps))} steps"


def ends_like(ref: Path, out: Path, run: Run) -> tuple[bool, str]:
    return same_as(ref, out) if run.code == 0 else (False, f"exit {run.code}: {run.last_line()[:150]!r}")
