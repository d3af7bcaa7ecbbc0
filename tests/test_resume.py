"""A run killed with SIGKILL and resumed by re-running the same command logs exactly the uninterrupted metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from helpers import TINY

from mimkit.engine.logging import TIMING_KEYS

ARGS = [
    "pretrain", "--data", "demo", "--max-images", "320", "--epochs", "5", *TINY,
    "model.embed_dim=64", "train.batch_size=32", "train.checkpoint_every=3", "eval.final_knn=false",
]  # fmt: skip


def command(out):
    return [sys.executable, "-m", "mimkit.cli", *ARGS, "--out", str(out)]


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(command(full), check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(command(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a mid-run checkpoint exists and a few more steps were logged
        if ckpt.exists() and (cut / "metrics.jsonl").exists():
            if len((cut / "metrics.jsonl").read_text().splitlines()) >= 17:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(ckpt, weights_only=True)
    assert not state["finished"] and 0 < state["run"]["step"] < 50, "the kill must land mid-run"

    subprocess.run(command(cut), check=True, env=env, capture_output=True)
    assert metrics(cut) == metrics(full)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_epoch_end_work_is_logged_once(tmp_path, monkeypatch, capsys):
    """A step checkpoint that falls on an epoch's last step, then a kill during the epoch-end work: the resumed
    run must not write that epoch's k-NN line a second time."""
    from mimkit.cli import main
    from mimkit.engine import distributed

    out = tmp_path / "run"
    argv = ["pretrain", "--data", "demo", "--max-images", "64", "--epochs", "2", "--out", str(out), *TINY,
            "train.checkpoint_every=4", "eval.knn_every=1", "eval.final_knn=false"]  # fmt: skip
    calls = {"n": 0}

    def stop_after_second_knn_line():
        calls["n"] += 1
        if calls["n"] == 2:  # after epoch 2's k-NN line, before its checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "barrier", stop_after_second_knn_line)
    assert main(argv) == 130
    monkeypatch.undo()
    assert main(argv) == 0
    knn_epochs = [r["epoch"] for r in metrics(out) if "knn_top1" in r]
    assert knn_epochs == [1, 2]
    capsys.readouterr()
