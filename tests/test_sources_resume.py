"""Pre-training from packed shards and Parquet: the same metrics as from the folder, and an interrupted run resumes
to exactly those metrics and weights."""

import json

import pytest
import torch
from helpers import TINY

import mimkit.engine.trainer.task as loop
from mimkit.cli import main
from mimkit.data.pack import pack

ARGS = ["--epochs", "2", *TINY, "train.checkpoint_every=2", "eval.final_knn=false", "data.num_workers=0"]


def metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "time")} for r in rows]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_packed_data_trains_like_the_folder_and_resumes_exactly(tmp_path, labeled_folder, monkeypatch, capsys, fmt):
    pack(str(labeled_folder), str(tmp_path / "packed"), "1GB", fmt)
    data = str(tmp_path / "packed") if fmt == "tar" else f"hf:{tmp_path / 'packed'}"
    assert main(["pretrain", "--data", str(labeled_folder), "--out", str(tmp_path / "folder"), *ARGS]) == 0
    assert main(["pretrain", "--data", data, "--out", str(tmp_path / "full"), *ARGS]) == 0
    assert metrics(tmp_path / "full") == metrics(tmp_path / "folder")  # the same batches, crops and losses

    real = loop.lr_at

    def stop_at_step_5(step, *a):  # mid epoch 2 (3 steps per epoch), after the step-4 checkpoint
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_at", stop_at_step_5)
    assert main(["pretrain", "--data", data, "--out", str(tmp_path / "cut"), *ARGS]) == 130
    monkeypatch.setattr(loop, "lr_at", real)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["run"]["batch"] == 1
    assert main(["pretrain", "--data", data, "--out", str(tmp_path / "cut"), *ARGS]) == 0
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
