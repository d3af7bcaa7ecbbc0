"""Bad input: one clear line naming the path/key/value, exit status 2, nothing in --out overwritten."""

import json

import pytest
import torch
from helpers import TINY

from mimkit.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent/folder"], "data folder '/nonexistent/folder' does not exist"),
        (["train.epochz=3"], "unknown config key 'train.epochz'"),
        (["train.epochs=many"], "'train.epochs' expects an integer"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--model", "resnet_does_not_exist"], "model.name 'resnet_does_not_exist' is not a timm ViT"),
        (["mae.mask_ratio=1.5"], "mae.mask_ratio must be in (0, 1)"),
        (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    ],
)
def test_bad_pretrain_input(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code, _, err = run(["pretrain", "--out", str(out), *extra], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_empty_and_undecodable_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds no image files" in err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"\xff\xd8 broken")
    code, _, err = run(["pretrain", "--data", str(junk), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"no decodable image in '{junk}'" in err


def test_checkpoint_from_another_method_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "last.pt"
    torch.save({"method": "beit", "config": {}, "model": {}}, ckpt)
    before = ckpt.read_bytes()
    code, _, err = run(["pretrain", "--out", str(out), *TINY], capsys)
    assert code == 2 and "written by method 'beit', not 'mae'" in err
    assert ckpt.read_bytes() == before and not (out / "config.yaml").exists()


def test_pretrain_export_eval_visualize(tmp_path, capsys, labeled_folder):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "knn_top1" in summary and "knn_top1_random_init" in summary
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all("loss" in x and "epoch" in x for x in lines)
    assert (out / "config.yaml").exists() and (out / "encoder" / "model.safetensors").exists()
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["finished"] and state["method"] == "mae"

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    for source in (ckpt, tmp_path / "exp"):  # the checkpoint and its export score what pre-training reported
        res_file = tmp_path / "knn.json"
        assert (
            main(["eval", "knn", "--checkpoint", str(source), "--data", str(labeled_folder), "--out", str(res_file)])
            == 0
        )
        assert json.loads(res_file.read_text())["top1"] == summary["knn_top1"]
    res_file = tmp_path / "lin.json"
    argv = ["eval", "linear", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--linear-epochs", "5"]
    assert main([*argv, "--out", str(res_file)]) == 0
    assert "top1" in json.loads(res_file.read_text())
    png = tmp_path / "viz.png"
    assert (
        main(["visualize", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--out", str(png), "--num", "3"])
        == 0
    )
    from PIL import Image

    assert Image.open(png).size[0] > Image.open(png).size[1] / 3  # three panels side by side
    assert "original | masked | reconstruction" in capsys.readouterr().out  # the headings drawn above the columns
    capsys.readouterr()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", "demo", "--max-images", "64", "--out", str(out), "--epochs", "3", *TINY]
    # an absurd learning rate blows the weights up after the first update
    code, _, err = run([*argv, "optim.lr=1e30", "optim.warmup_epochs=0", "train.checkpoint_every=1"], capsys)
    assert code == 1 and "non-finite loss at step" in err
    bad_step = int(err.split("non-finite loss at step ")[1].split(";")[0])
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["step"] == bad_step - 1 and not state["finished"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
