"""Fault injection, the fast cases (issue 16): each is a real run of the CLI on the demo digits with tiny settings,
broken the way a user's machine breaks it, and compared with what the run promises: a diverged run leaves a
finite checkpoint it can go on from, a full disk keeps the previous checkpoint byte for byte, a damaged newest
checkpoint falls back to the previous one and ends where an uninterrupted run ends, a second run into a busy
--out is refused, a restart without checkpoints rewrites metrics.jsonl instead of appending to it, and bad input
is one line naming the key and the value. The long campaign (SIGKILLs, corrupt data, crafted exports) is
benchmarks/faults.py."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY

from mimkit import atomic as atomic_writes
from mimkit.cli import main
from mimkit.engine.trainer.logging import TIMING_KEYS

# 64 images, batches of 16: 2 epochs x 4 steps, a checkpoint after every step (so prev.pt is one step back)
FLAGS = ["--data", "demo", "--max-images", "64", "--epochs", "2"]
OVERRIDES = [*TINY, "eval.final_knn=false", "train.checkpoint_every=1"]
TOTAL_STEPS = 8


def argv(out, *extra) -> list[str]:
    """The pretrain command line; extra flags go before the dotted overrides (argparse takes those as one list)."""
    flags = [a for i, a in enumerate(extra) if a.startswith("--") or (i and extra[i - 1].startswith("--"))]
    return ["pretrain", "--out", str(out), *FLAGS, *flags, *OVERRIDES, *[a for a in extra if a not in flags]]


def run(out, capsys, *extra) -> tuple[int, str, str]:
    code = main(argv(out, *extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def tensors(obj, prefix: str = ""):
    """(dotted name, tensor) for every tensor in a nested checkpoint."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def non_finite(state: dict) -> list[str]:
    return [k for k, t in tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()]


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model and optimizer of two checkpoints bit for bit (what the next step would start from)."""
    for part in ("model", "optimizer"):
        x, y = dict(tensors(a[part])), dict(tensors(b[part]))
        assert x.keys() == y.keys(), part
        assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:3]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every recovered run must end equal to."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert main(argv(out)) == 0
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        dst = tmp_path / "run"
        shutil.copytree(folder, dst)
        return dst

    return copy


# ---- a diverged run -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """The issue's case: blr=1e6 with a checkpoint after every step -> (out, exit status, stderr)."""
    out = tmp_path_factory.mktemp("faults") / "diverged"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv(out, "optim.blr=1e6"))
    return out, code, err.getvalue()


def test_diverged_run_stops_before_saving_a_non_finite_state(diverged):
    out, code, err = diverged
    assert code == 1 and err.count("\n") == 1, err
    # blr=1e6: the loss is finite but exploded (or already NaN) at the first step the guard judges
    said = re.search(r"(?:non-finite loss|loss \S+) at step (\d+)[ ;].*'([^']+)' now holds step (\d+)", err)
    assert said, err
    bad_step, named, kept = int(said[1]), said[2], int(said[3])
    assert named == str(out / "checkpoints" / "last.pt")
    # the state the diverged update started from (huge but finite weights) moved aside; the one before it is last
    state = load(named)
    assert state["run"]["step"] == kept == bad_step - 2 and not state["finished"]
    assert (out / "checkpoints" / f"diverged-step{bad_step - 1}.pt").exists()
    assert non_finite(state) == []
    assert [r["step"] for r in metrics(out)] == list(range(1, bad_step))  # no line for the diverged step
    assert not list((out / "checkpoints").glob(".*.tmp")) and not (out / ".mimkit.lock").exists()


def test_diverged_run_goes_on_with_a_sane_learning_rate(diverged, copy_of, capsys):
    """'last.pt still holds the last good state' is true only if training can go on from it."""
    out = copy_of(diverged[0])
    code, _, err = run(out, capsys, "optim.blr=1e-4")  # another lr: refused unless asked, naming the key
    assert code == 2 and "optim.blr: " in err and "-> 0.0001" in err, err
    code, _, err = run(out, capsys, "optim.blr=1e-4", "train.allow_config_change=true")
    assert code == 0, err
    state = load(out / "checkpoints" / "last.pt")
    assert state["finished"] and state["run"]["step"] == TOTAL_STEPS and non_finite(state) == []
    assert [r["step"] for r in metrics(out)] == list(range(1, TOTAL_STEPS + 1))


# ---- disk full ------------------------------------------------------------------------------------------------


class TorchWithFullDisk:
    """`torch` as mimkit.atomic (the checkpoint writer) sees it, except that the `fail_at`-th torch.save writes a few
    bytes and then fails as a full disk does: an OSError, or (`disguised`) as torch.save does, a RuntimeError
    ('unexpected pos') with the OSError as its context."""

    def __init__(self, fail_at: int, last_pt=None, disguised: bool = False):
        self.calls, self.fail_at, self.last_pt, self.before, self.disguised = 0, fail_at, last_pt, None, disguised

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls < self.fail_at:
            return torch.save(obj, f, *args, **kwargs)
        self.before = self.last_pt.read_bytes() if self.last_pt is not None else None
        f.write(b"PK\x03\x04 partial")
        f.flush()
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            if not self.disguised:
                raise
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_disk_full_keeps_the_previous_checkpoint_and_names_folder_and_size(tmp_path, monkeypatch, capsys, reference):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    full = TorchWithFullDisk(fail_at=2, last_pt=ckpt / "last.pt")  # step 1 saved, step 2 hits the full disk
    monkeypatch.setattr(atomic_writes, "torch", full)
    code, _, err = run(out, capsys)
    monkeypatch.undo()
    assert code == 2 and err.count("\n") == 1, err
    assert f"'{ckpt}'" in err, err
    size = re.search(r"(\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB)", err)
    assert size, f"no size in: {err}"
    stated = float(size[1]) * {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[size[2]]
    written = len(full.before)  # what the same state takes on disk, give or take one step's numbers
    assert abs(stated - written) <= 0.5 * (2**20 if size[2] == "MiB" else 2**10) + 0.2 * written, (err, written)
    assert (ckpt / "last.pt").read_bytes() == full.before  # the previous state, byte for byte
    assert load(ckpt / "last.pt")["run"]["step"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]  # no temp file, no half-made prev.pt
    assert not (out / ".mimkit.lock").exists()

    code, _, err = run(out, capsys)  # space again: the restart ends where the uninterrupted run ended
    assert code == 0, err
    assert metrics(out) == metrics(reference)
    assert_same_training_state(load(ckpt / "last.pt"), load(reference / "checkpoints" / "last.pt"))


# ---- a damaged newest checkpoint ------------------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "zeroed": lambda data: bytes(len(data)),
    "random": lambda data: os.urandom(len(data)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_last_falls_back_to_prev_and_ends_like_an_uninterrupted_run(damage, reference, copy_of, capsys):
    out = copy_of(reference)
    last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "prev.pt"
    last.write_bytes(DAMAGE[damage](last.read_bytes()))
    code, said, err = run(out, capsys)
    assert code == 0, err
    warning = said[said.index("warning:") : said.index(f"resuming from '{prev}' at step {TOTAL_STEPS - 1}")]
    assert f"'{last}'" in warning and f"'{prev}'" in warning, warning
    assert metrics(out) == metrics(reference)  # the last step logged once, as before
    assert_same_training_state(load(last), load(reference / "checkpoints" / "last.pt"))


class MakesAFile:
    """A pickle that creates `marker` when unpickled: the stand-in for code in a crafted checkpoint."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_pickle(path):
    MakesAFile.marker = path.parent / "pickle-ran"
    path.write_bytes(pickle.dumps({"model": MakesAFile(), "config": {}}))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "zeroed", "random", "pickle"],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(damage, reference, tmp_path, capsys):
    """With no previous checkpoint to fall back to, the damage is an error: one line naming the file, and no advice
    to load it unsafely (a damaged file may as well be a crafted one)."""
    path = tmp_path / "last.pt"
    if damage == "pickle":
        write_pickle(path)
    else:
        path.write_bytes(DAMAGE[damage]((reference / "checkpoints" / "last.pt").read_bytes()))
    code = main(["eval", "knn", "--checkpoint", str(path), "--data", "demo"])
    err = capsys.readouterr().err
    assert not (tmp_path / "pickle-ran").exists()
    assert code == 2 and f"'{path}'" in err and "Traceback" not in err, err
    assert err.count("\n") == 1 and "weights_only" not in err, err


# ---- two runs into one --out ----------------------------------------------------------------------------------


def test_second_run_into_a_busy_out_is_refused_and_the_first_finishes(tmp_path, reference, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    first = subprocess.Popen([sys.executable, "-m", "mimkit.cli", *argv(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        # paused while the second run tries: it is alive and holds the lock however fast this machine is
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second could start"
        code, _, err = run(out, capsys)
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and err.count("\n") == 1, err
    assert f"pid {first.pid}" in err and str(out) in err, err
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))  # each step once, in order
    ref = metrics(reference)  # another process: equal up to its thread count's rounding
    assert all(r.keys() == q.keys() and r["loss"] == pytest.approx(q["loss"], rel=1e-4) for r, q in zip(rows, ref))
    assert not (out / ".mimkit.lock").exists()


# ---- a restart from scratch into a used --out -----------------------------------------------------------------


def test_restart_without_checkpoints_truncates_metrics_and_says_so(reference, copy_of, capsys):
    out = copy_of(reference)
    shutil.rmtree(out / "checkpoints")
    code, said, err = run(out, capsys)
    assert code == 0, err
    assert "no checkpoint" in said and "truncating metrics.jsonl" in said, said
    assert metrics(out) == metrics(reference)  # one run's lines, not two


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, key, value",
    [
        (["--batch-size", "0"], "train.batch_size", "0"),
        (["--image-size", "0"], "data.image_size", "0"),
        (["optim.blr=-1"], "optim.blr", "-1"),
        (["data.num_workers=-1"], "data.num_workers", "-1"),
        (["train.log_every=0"], "train.log_every", "0"),
        (["train.checkpoint_every=-1"], "train.checkpoint_every", "-1"),
        (["data.bad_file_limit=-0.5"], "data.bad_file_limit", "-0.5"),
        (["optim.blr=nan"], "optim.blr", "nan"),
        (["optim.blr=inf"], "optim.blr", "inf"),
        (["data.bad_file_limit=nan"], "data.bad_file_limit", "nan"),
        (["optim.warmup_epochs=inf"], "optim.warmup_epochs", "inf"),
    ],
)
def test_bad_input_is_one_line_naming_key_and_value(tmp_path, capsys, extra, key, value):
    out = tmp_path / "run"
    code, _, err = run(out, capsys, *extra)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert key in err and re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.])", err.split(key, 1)[1]), err
    assert not out.exists()


def test_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = run(out, capsys)
    assert code == 2 and err.count("\n") == 1 and f"'{out}'" in err and "file" in err, err
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
