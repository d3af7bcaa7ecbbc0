"""A run killed with SIGKILL and resumed by re-running the same command logs exactly the uninterrupted metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY

from mimkit.engine.trainer.logging import TIMING_KEYS

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
    from mimkit.engine.trainer import distributed

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


FINETUNE = ["finetune", "--checkpoint", "none", "--data", "{data}", "--epochs", "2", *TINY[:5], "data.num_workers=0",
            "train.batch_size=8", "train.log_every=1", "finetune.randaug=rand-m9-n1",
            "train.checkpoint_every=2"]  # fmt: skip
SEGMENT = ["segment", "--checkpoint", "none", "--data", "demo", "--epochs", "2", "--batch-size", "16", "--image-size",
           "32", "--max-images", "64", *TINY[1:5], "data.num_workers=0", "train.log_every=1",
           "segment.max_eval_images=9", "segment.base_size=32", "train.checkpoint_every=1"]  # fmt: skip
PRETRAIN = [*ARGS[:-2], "train.checkpoint_every=2", "eval.final_knn=false"]
PRETRAIN[PRETRAIN.index("--epochs") + 1] = "2"


def interrupted_run(cmd, out, sig, min_lines, env):
    """Start `cmd`, send `sig` once a checkpoint exists and `min_lines` metric lines were logged, wait."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (out / "checkpoints" / "last.pt").exists() and (out / "metrics.jsonl").exists():
            if len((out / "metrics.jsonl").read_text().splitlines()) >= min_lines:
                break
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize(
    "task, argv, sig, min_lines, code",
    [
        # killed once the first mid-epoch checkpoint of epoch 2 was written (it precedes the next step's line)
        ("finetune", FINETUNE, signal.SIGKILL, 10, -signal.SIGKILL),  # 6 steps + 1 evaluation line per epoch
        ("segment", SEGMENT, signal.SIGKILL, 7, -signal.SIGKILL),  # 4 steps + 1 evaluation line per epoch
        ("pretrain", PRETRAIN, signal.SIGTERM, 12, 3),  # pre-emption: finish the step, checkpoint, exit 3
    ],
)
def test_every_task_resumes_exactly_mid_epoch(tmp_path, labeled_folder, task, argv, sig, min_lines, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [a.replace("{data}", str(labeled_folder)) for a in argv]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "mimkit.cli", *argv, "--out", str(full)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    cmd = [sys.executable, "-m", "mimkit.cli", *argv, "--out", str(cut)]
    assert interrupted_run(cmd, cut, sig, min_lines, env) == code
    state = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert not state["finished"] and state["run"]["batch"] > 0, "the interruption must land mid-epoch"
    if sig == signal.SIGTERM:
        assert state["run"]["step"] == metrics(cut)[-1]["step"]  # the step it was in was finished and saved
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert metrics(cut) == metrics(full)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
