"""Writes under faults (issue 24): a full disk wherever it strikes (a checkpoint, in torch's disguise or not, the
metrics, TensorBoard's writer thread, the run lock, a disk full before the run starts) is one line and exit 2
that says truthfully what the run folder holds, and leaves no lock and no temporary file; every in-place rewrite
is atomic; a killed export's temporary folder goes at the next run; the run lock covers the export and the
summary; an unreadable lock is not taken over while its writer may still be at work.

The real full disks are a 3 MiB tmpfs (root only: skipped otherwise); the rest patch the writer that fails."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import threading
import time

import pytest
import torch
from test_faults import TorchWithFullDisk, argv, load, metrics, run

from mimkit import atomic as atomic_writes
from mimkit.cli import main
from mimkit.engine.tasks import pretrain as pretrain_module
from mimkit.engine.trainer import checkpoint as checkpoint_module
from mimkit.engine.trainer.logging import MetricsLog


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("writes") / "reference"
    assert main(argv(out)) == 0
    return out


def left_behind(out) -> list[str]:
    """The lock and every temporary file or folder in the run folder."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


@pytest.mark.parametrize("at, holds", [(1, "no checkpoint was written yet"), (3, "holds step 2")])
def test_torch_disguised_full_disk_is_one_line_saying_what_is_kept(tmp_path, monkeypatch, capsys, at, holds):
    out = tmp_path / "run"
    monkeypatch.setattr(atomic_writes, "torch", TorchWithFullDisk(at, disguised=True))
    code, _, err = run(out, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{out / 'checkpoints'}'" in err and "no space left" in err and holds in err, err
    assert "previous state" not in err, err
    monkeypatch.undo()
    assert left_behind(out) == []
    names = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert names == (["last.pt"] if at == 2 else ["last.pt", "prev.pt"] if at > 2 else [])
    if at > 1:
        assert load(out / "checkpoints" / "last.pt")["run"]["step"] == at - 1


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "no space left"), (errno.EIO, "input/output error")])
def test_full_disk_in_tensorboards_thread_is_one_line_and_releases_the_lock(tmp_path, monkeypatch, capsys, code, said):
    from tensorboard.summary.writer import record_writer

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's, not pytest's, prints here
    real, calls = record_writer.RecordWriter.write, []

    def write(self, data):  # runs in TensorBoard's writer thread
        calls.append(1)
        if len(calls) > 4:
            raise OSError(code, os.strerror(code))
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    out = tmp_path / "run"
    status, printed, err = run(out, capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err + printed, err
    assert f"'{out}'" in err and "tensorboard" in err and said in err, err
    assert left_behind(out) == []


def test_an_io_error_in_another_thread_keeps_its_traceback(monkeypatch, capsys):
    """Only TensorBoard's writer thread, where every call writes, has its EIO quieted (the writer raises it again
    in the main thread); elsewhere an EIO may be a failing read, and its traceback is all there is."""
    from mimkit.engine.trainer.logging import quiet_full_disk_in_threads

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    quiet_full_disk_in_threads()

    def fail():
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    class WriterThread(threading.Thread):
        __module__ = "tensorboard.summary.writer.event_file_writer"

    for thread in (threading.Thread(target=fail), WriterThread(target=fail)):
        thread.start()
        thread.join()
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "Input/output error" in err, err


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
    """A resumed run drops the lines after its checkpoint by writing a new file and renaming it: a kill before
    the rename (here: the rename fails) leaves every old line."""
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    before = (tmp_path / "metrics.jsonl").read_text()

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr("mimkit.atomic.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    log.truncate_after(2)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # gone, and not reused this instant


def test_a_killed_exports_temporary_folders_go_at_the_next_run(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    old_style, dead = out / ".encoder.k3x_9abq", out / f".encoder.{dead_pid()}.w1v2tmp3.tmp"
    live = out / f".encoder.{os.getppid()}.z9y8x7w6.tmp"  # another process still writing: kept
    for folder in (old_style, dead, live):
        shutil.copytree(reference / "encoder", folder)
    code, _, err = run(out, capsys)
    assert code == 0, err
    assert left_behind(out) == [live.name]


def test_the_run_lock_covers_the_export_and_the_summary(tmp_path, monkeypatch, capsys):
    out, seen = tmp_path / "run", []
    export, report = pretrain_module.export_method, pretrain_module.PretrainTask.report

    def watched_export(*args, **kwargs):
        seen.append(("export", checkpoint_module.read_json(out / ".mimkit.lock")))
        return export(*args, **kwargs)

    def watched_report(self, steps):
        summary = report(self, steps)
        seen.append(("summary", checkpoint_module.read_json(out / ".mimkit.lock")))
        return summary

    monkeypatch.setattr(pretrain_module, "export_method", watched_export)
    monkeypatch.setattr(pretrain_module.PretrainTask, "report", watched_report)
    code, _, err = run(out, capsys)
    assert code == 0, err
    holders = [(what, (lock or {}).get("pid")) for what, lock in seen]
    assert holders == [("export", os.getpid()), ("summary", os.getpid())]
    assert (out / "summary.json").exists() and left_behind(out) == []


def test_an_unreadable_lock_is_not_taken_over_while_its_writer_may_be_at_work(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".mimkit.lock"
    lock.touch()  # as an older mimkit left it between creating and writing it
    code, _, err = run(out, capsys)
    assert code == 2 and err.count("\n") == 1 and f"'{lock}'" in err, err
    assert lock.exists() and sorted(p.name for p in out.iterdir()) == [".mimkit.lock"]

    old = time.time() - 3600  # an hour old: its writer is gone
    os.utime(lock, (old, old))
    code, said, err = run(out, capsys)
    assert code == 0, err
    assert re.search(rf"warning: removed the unreadable run lock '{re.escape(str(lock))}'", said), said
    assert left_behind(out) == []


# ---- a real full disk: a 3 MiB tmpfs ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only), and `fill(free_kib)` to leave that much of it free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("mounting a tmpfs needs root")
    ballast = disk / "ballast"

    def fill(free_kib: int) -> None:
        stat = os.statvfs(disk)
        total = stat.f_blocks * stat.f_frsize
        with ballast.open("wb") as f:
            f.write(bytes(max(total - free_kib * 1024, 0)))

    yield disk, fill, ballast
    subprocess.run(["umount", str(disk)], check=False)


def test_a_disk_already_full_is_one_line_and_leaves_no_lock(small_disk, capsys):
    disk, fill, _ = small_disk
    fill(0)
    out = disk / "run"
    code, _, err = run(out, capsys)
    assert code == 2 and err.count("\n") == 1 and "no space left" in err and "Traceback" not in err, err
    assert not out.exists() or left_behind(out) == []


@pytest.mark.parametrize("free_kib", [16, 1024])  # the metrics or TensorBoard first; the second checkpoint
def test_a_disk_that_fills_mid_run_loses_nothing(small_disk, reference, capsys, free_kib):
    disk, fill, ballast = small_disk
    fill(free_kib)
    out = disk / "run"
    code, _, err = run(out, capsys)
    assert code == 2 and err.count("\n") == 1 and "no space left" in err and "Traceback" not in err, err
    last = out / "checkpoints" / "last.pt"
    holds = f"'{last}' holds step {load(last)['run']['step']}" if last.exists() else "no checkpoint was written yet"
    assert holds in err, err
    assert left_behind(out) == []
    ballast.unlink()
    code, _, err = run(out, capsys)
    assert code == 0, err
    assert metrics(out) == metrics(reference)


class FailingOnce:
    """os.<call> that raises OSError(`code`) on its `at`-th use and behaves otherwise."""

    def __init__(self, real, at: int, code: int):
        self.real, self.at, self.code, self.calls = real, at, code, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("call, at", [("fsync", 1), ("link", 1), ("replace", 1), ("replace", 2)])
def test_a_failing_device_in_a_checkpoint_write_keeps_both_checkpoints(tmp_path, monkeypatch, call, at):
    """EIO at the fsync, the hard link that keeps prev.pt, or either rename: one-line WriteError saying what is
    kept, the previous checkpoints intact and no temporary file (the prev.pt link was once left behind)."""
    import torch

    folder = tmp_path / "checkpoints"
    atomic_writes.save_torch({"step": torch.tensor(1)}, folder / "last.pt")
    atomic_writes.save_torch({"step": torch.tensor(2)}, folder / "last.pt", keep_previous=True)
    monkeypatch.setattr(atomic_writes.os, call, FailingOnce(getattr(os, call), at, errno.EIO))
    with pytest.raises(atomic_writes.WriteError, match=r"cannot write 'last.pt' .*input/output error") as e:
        atomic_writes.save_torch({"step": torch.tensor(3)}, folder / "last.pt", keep_previous=True)
    monkeypatch.undo()
    assert "'" + str(folder / "last.pt") + "' is unchanged" in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "prev.pt"]
    assert int(torch.load(folder / "last.pt")["step"]) == 2
    assert int(torch.load(folder / "prev.pt")["step"]) in (1, 2)  # 2 once the link was made: still a good state


@pytest.mark.parametrize("code, said, advice", [(errno.EIO, "input/output error", "check the device"),
                                                (errno.EROFS, "read-only file system", "make the folder writable"),
                                                (errno.EACCES, "permission denied", "make the folder writable"),
                                                (errno.ENOSPC, "no space left", "free some space")])  # fmt: skip
@pytest.mark.parametrize("at", [1, 6])  # the run lock (before the loop), a checkpoint (inside it)
def test_a_refused_write_in_a_run_says_why_and_what_to_do(tmp_path, monkeypatch, capsys, code, said, advice, at):
    out = tmp_path / "run"
    monkeypatch.setattr(atomic_writes.os, "fsync", FailingOnce(os.fsync, at, code))
    result, _, err = run(out, capsys)
    assert result == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert said in err and advice in err and "re-run the same command" in err, err
    assert ("'.mimkit.lock'" if at == 1 else "'last.pt'") in err, err  # fsync 1: the lock; 2: config.yaml; 3-7: last.pt
    monkeypatch.undo()
    assert left_behind(out) == []


def test_safetensors_io_error_text_is_a_refused_write():
    from mimkit.errors import write_failure

    text = "Error while serializing: I/O error: Input/output error (os error 5)"
    io = "input/output error (the device failed)"
    assert write_failure(RuntimeError(text), writing=True) == write_failure(OSError(errno.EIO, "x"), writing=True) == io
    # an EIO may as well be a read (a failing data disk): only a write known to be under way is called one
    assert write_failure(RuntimeError(text)) is None and write_failure(OSError(errno.EIO, "x", "a.jpg")) is None
    assert write_failure(PermissionError(errno.EACCES, "x", "a.jpg")) is None  # an unreadable data file
    assert write_failure(PermissionError(errno.EACCES, "x", "out"), writing=True) == "permission denied"
    assert write_failure(ValueError("(os error 2)"), writing=True) is None  # a missing file is not a refusal


@pytest.mark.parametrize("kind", ["file", "link"])
def test_an_export_over_a_file_or_a_link_is_refused_and_keeps_it(tmp_path, kind):
    import torch

    target = tmp_path / "encoder"
    if kind == "file":
        target.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(atomic_writes.MimkitError, match="exists and is not a folder"):
        atomic_writes.write_weights_folder(torch.nn.Linear(2, 2), target, {}, "config.json")
    assert target.read_text() == "mine" if kind == "file" else target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["encoder"] + (["elsewhere"] if kind == "link" else []))


def test_an_export_replaces_its_previous_folder_without_a_moment_without_one(tmp_path, monkeypatch):
    """A kill just after the previous export is removed used to leave no export at all (its replacement then went
    as a dead writer's temporary folder); the folders are now exchanged first."""
    import json

    import torch

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").touch()
    if not atomic_writes.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2 RENAME_EXCHANGE on this system or file system")
    assert (tmp_path / "b" / "x").exists() and not (tmp_path / "a" / "x").exists()
    out = tmp_path / "encoder"
    atomic_writes.write_weights_folder(torch.nn.Linear(2, 2), out, {"v": 1}, "config.json")
    real = shutil.rmtree

    def killed_after_removing(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_writes.shutil, "rmtree", killed_after_removing)
    with pytest.raises(KeyboardInterrupt):
        atomic_writes.write_weights_folder(torch.nn.Linear(2, 2), out, {"v": 2}, "config.json")
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_device_that_refuses_removals_costs_no_result(reference, tmp_path, monkeypatch, capsys):
    """EIO at every removal in the run folder (each temporary file once renamed away, the run lock at the end): the
    writes succeeded, so the run ends with exit 0 and equals the reference, one warning names the lock it leaves,
    and the next run takes the lock over and removes the leftovers (a failed removal once failed the write)."""
    out, real = tmp_path / "run", os.unlink

    def refused(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    code, said, err = run(out, capsys)
    monkeypatch.undo()
    assert code == 0 and "Traceback" not in err, err
    assert said.count("warning:") == 1 and f"could not remove the run lock '{out / '.mimkit.lock'}'" in said, said
    assert ".mimkit.lock" in left_behind(out) and metrics(out) == metrics(reference)
    mine, theirs = (load(folder / "checkpoints" / "last.pt")["model"] for folder in (out, reference))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    code, said, err = run(out, capsys)
    assert code == 0 and "warning:" not in said + err, said + err
    assert left_behind(out) == []
