"""The same pretrain command under `torchrun` with 2 CPU processes (gloo): rank 0 alone logs and saves."""

import json
import os
import shutil
import subprocess
import sys

import torch
from helpers import TINY


def test_torchrun_two_processes(tmp_path, labeled_folder):
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher, "--standalone", "--nproc_per_node=2", "-m", "mimkit.cli", "pretrain",
        "--data", str(labeled_folder), "--out", str(out), "--epochs", "2", "--device", "cpu", *TINY,
        "train.batch_size=8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("pre-trained encoder") == 1  # reported once, by rank 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 48 images / (8 per process x 2 processes) = 3 steps per epoch, logged once each
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["run"]["step"] == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_torchrun_finetune_two_processes(tmp_path, labeled_folder):
    """Fine-tuning under torchrun: the batch is split across processes, rank 0 alone writes the report."""
    out = tmp_path / "ft"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher, "--standalone", "--nproc_per_node=2", "-m", "mimkit.cli", "finetune", "--checkpoint", "none",
        "--data", str(labeled_folder), "--out", str(out), "--epochs", "2", "--device", "cpu", *TINY[:5],
        "data.num_workers=0", "train.batch_size=8", "train.log_every=1", "finetune.randaug=rand-m9-n1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("top-1 after the last epoch") == 1
    summary = json.loads((out / "finetune.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 48 images / (8 per process x 2 processes) = 3 steps per epoch
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_torchrun_segment_two_processes(tmp_path):
    """Segmentation under torchrun: each process a share of the batch and of the evaluation images."""
    out = tmp_path / "seg"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher, "--standalone", "--nproc_per_node=2", "-m", "mimkit.cli", "segment", "--checkpoint", "none",
        "--data", "demo", "--out", str(out), "--epochs", "1", "--device", "cpu", "--batch-size", "16",
        "--image-size", "32", "--max-images", "64", *TINY[1:5], "data.num_workers=0", "train.log_every=1",
        "segment.max_eval_images=9", "segment.base_size=32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote") == 1  # the final line, by rank 0
    summary = json.loads((out / "segment.json").read_text())
    assert summary["steps"] == 2 and summary["eval_images"] == 9  # 64 images / (16 x 2 processes)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["run"]["epoch"] == 1
