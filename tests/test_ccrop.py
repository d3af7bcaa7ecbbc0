"""ContrastiveCrop: box sampling, boxes from heat maps, shared boxes in loader workers, checkpoint/resume."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import TINY, write_images
from PIL import Image

from mimkit.config import ConfigError, DataConfig
from mimkit.data import DataError, View
from mimkit.data.ccrop import boxes_from_heatmaps, check_boxes, estimate_boxes, feature_heatmap, update_due
from mimkit.data.folder import ImageSource, scan_folder
from mimkit.data.pipeline import (
    EpochBatchSampler,
    ViewDataset,
    contrastive_crop_box,
    random_resized_crop_box,
    to_uint8_chw,
    train_loader,
)
from mimkit.models.vit import create_vit
from mimkit.run_config import build_config

CCROP = ["data.crop_mode=ccrop", "data.ccrop_warmup_epochs=1", "data.ccrop_interval=1"]


def test_crops_fall_inside_the_image_with_centres_in_the_box():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(8, 300, 2))
        x0, x1 = sorted(rng.random(2))
        y0, y1 = sorted(rng.random(2))
        alpha = float(rng.choice([0.1, 0.6, 1.0, 3.0]))
        left, top, right, bottom = contrastive_crop_box(rng, w, h, (0.08, 1.0), (0.75, 4 / 3), (x0, y0, x1, y1), alpha)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        cx, cy = (left + right) / 2, (top + bottom) / 2
        # the centre is inside the box unless the image edge pushed the crop back in
        assert cx >= min(x0 * w, left + (right - left) / 2) - 1 and cx <= max(x1 * w, w - (right - left) / 2) + 1
        assert cy >= min(y0 * h, top + (bottom - top) / 2) - 1 and cy <= max(y1 * h, h - (bottom - top) / 2) + 1


def test_small_alpha_pushes_crops_to_the_box_edges():
    rng = np.random.default_rng(1)
    box = (0.2, 0.2, 0.8, 0.8)
    centres = [contrastive_crop_box(rng, 200, 200, (0.05, 0.05), (1, 1), box, 0.1)[0] + 22 for _ in range(500)]
    near_edges = np.mean([min(abs(c - 40), abs(c - 160)) < 15 for c in centres])
    assert near_edges > 0.7  # Beta(0.1, 0.1) is U-shaped


def test_boxes_contain_the_above_threshold_region():
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(16, 4, 4, generator=g) ** 4
    heat[3] = 1.0  # a flat map: the whole image
    size, thr = 32, 0.3
    boxes = boxes_from_heatmaps(heat, size, thr)
    lo, hi = heat.amin((1, 2), keepdim=True), heat.amax((1, 2), keepdim=True)
    norm = (heat - lo) / (hi - lo).clamp_min(1e-12)
    up = torch.nn.functional.interpolate(norm[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    for b in range(16):
        x0, y0, x1, y1 = (boxes[b] * size).round().long().tolist()
        above = up[b] > thr
        outside = above.clone()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
        if above.any():  # tight: the first and last rows / columns of the box hold above-threshold pixels
            assert above[y0].any() and above[y1 - 1].any() and above[:, x0].any() and above[:, x1 - 1].any()
    assert boxes[3].tolist() == [0.0, 0.0, 1.0, 1.0]
    hot = torch.zeros(1, 8, 8)
    hot[0, 2:4, 5:7] = 1.0  # a hot block in grid cells rows 2-3, columns 5-6
    x0, y0, x1, y1 = boxes_from_heatmaps(hot, 64, 0.5)[0].tolist()
    assert 5 / 8 - 0.07 <= x0 <= 5 / 8 and 7 / 8 <= x1 <= 7 / 8 + 0.07 and 2 / 8 - 0.07 <= y0 and y1 <= 4 / 8 + 0.07


def test_vit_heatmap_and_estimation_pass(tmp_path):
    vit = create_vit("vit_tiny_patch16_224", 16, 4, depth=1, embed_dim=32, num_heads=2)
    imgs = torch.randn(3, 3, 16, 16)
    l1, signed = feature_heatmap(vit, imgs, "l1"), feature_heatmap(vit, imgs, "sum")
    assert l1.shape == signed.shape == (3, 4, 4) and (l1 >= signed.abs() - 1e-4).all()
    write_images(tmp_path / "imgs", 10)
    cfg = DataConfig(image_size=16, num_workers=0, crop_mode="ccrop")
    src = scan_folder(tmp_path / "imgs")
    full, rate = estimate_boxes(vit, src, cfg, "cpu", batch_size=4)
    assert full.shape == (10, 4) and rate > 0 and vit.training
    assert ((full[:, :2] >= 0) & (full[:, 2:] <= 1) & (full[:, 2:] > full[:, :2])).all()
    shards = [estimate_boxes(vit, src, cfg, "cpu", batch_size=4, rank=r, world=3)[0] for r in range(3)]
    assert torch.allclose(sum(shards), full)  # each rank fills its rows; the sum is everything


def test_update_schedule_and_config_errors():
    cfg = DataConfig(crop_mode="ccrop", ccrop_warmup_epochs=3, ccrop_interval=2)
    assert [e for e in range(1, 11) if update_due(cfg, e, 10)] == [4, 6, 8]
    assert not update_due(DataConfig(ccrop_warmup_epochs=0, ccrop_interval=1), 1, 10)  # rrc: never
    for key, value, message in [
        ("crop_mode", "random", "data.crop_mode must be 'rrc' or 'ccrop'"),
        ("ccrop_alpha", 0.0, "data.ccrop_alpha must be > 0"),
        ("ccrop_threshold", 1.0, "data.ccrop_threshold must be in [0, 1)"),
        ("ccrop_interval", 0, "data.ccrop_interval >= 1"),
        ("ccrop_heat", "max", "data.ccrop_heat must be 'l1' or 'sum'"),
    ]:
        bad = DataConfig(**{"crop_mode": "ccrop", key: value})
        with pytest.raises(ConfigError, match=re.escape(message)):
            ViewDataset(stub_source(), [View("image", 8)], bad, seed=0)
    with pytest.raises(DataError, match="'run/last.pt' holds ContrastiveCrop boxes for 5 images but the training"):
        check_boxes(torch.zeros(5, 4), 7, "run/last.pt")


def stub_source():
    return ImageSource("stub", arrays=np.zeros((4, 8, 8, 3), dtype=np.uint8))


def test_crop_groups_and_ccrop_in_the_dataset(tmp_path):
    write_images(tmp_path / "imgs", 8, size=32)
    src = scan_folder(tmp_path / "imgs")
    one = ViewDataset(src, [View("a", 16)], DataConfig(), seed=2)
    two = ViewDataset(src, [View("a", 16), View("b", 16, crop_group=1)], DataConfig(), seed=2)
    for i in range(8):
        x, y = one[(0, i)], two[(0, i)]
        assert torch.equal(x["a"], y["a"])  # group 0 is drawn first: unchanged by a second group
    assert any(not torch.equal(two[(0, i)]["a"], two[(0, i)]["b"]) for i in range(8))  # its own crop

    cfg = DataConfig(crop_mode="ccrop", ccrop_warmup_epochs=1, crop_scale=(0.05, 0.05), crop_ratio=(1, 1), hflip=False)
    cc = ViewDataset(src, [View("a", 32)], cfg, seed=2)
    rrc = ViewDataset(src, [View("a", 32)], DataConfig(**{**cfg.__dict__, "crop_mode": "rrc"}), seed=2)
    assert torch.equal(cc[(0, 3)]["a"], rrc[(0, 3)]["a"])  # warm-up epoch: RandomResizedCrop
    cc.boxes[:] = torch.tensor([0.0, 0.0, 0.1, 0.1])  # everything in the top-left corner
    corner = to_uint8_chw(src.load(3).resize((32, 32), Image.Resampling.BICUBIC, box=(0, 0, 7, 7)))  # 7 px crop
    assert torch.equal(cc[(1, 3)]["a"], corner)


def test_persistent_workers_see_updated_boxes(tmp_path):
    write_images(tmp_path / "imgs", 16, size=32)
    cfg = DataConfig(crop_mode="ccrop", ccrop_warmup_epochs=0, crop_scale=(0.1, 0.3))
    ds = ViewDataset(scan_folder(tmp_path / "imgs"), [View("a", 16)], cfg, seed=0)
    sampler = EpochBatchSampler(len(ds), 8, seed=0)
    loader = train_loader(ds, sampler, num_workers=2, pin=False)
    first = [b["a"] for b in loader]
    ds.boxes.copy_(torch.tensor([0.6, 0.6, 1.0, 1.0]).expand(16, 4))
    second = [b["a"] for b in loader]  # same epoch again, new boxes, same (persistent) workers
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    reference = ViewDataset(ds.source, ds.views, cfg, seed=0)
    reference.boxes.copy_(ds.boxes)
    expected = [torch.stack([reference[k]["a"] for k in keys]) for keys in sampler]
    assert all(torch.equal(a, b) for a, b in zip(second, expected))


def test_box_state_survives_checkpoint_and_resume(tmp_path, labeled_folder, monkeypatch, capsys):
    import mimkit.engine.trainer.task as T

    base = ["--data", str(labeled_folder), "--epochs", "3", *TINY, *CCROP, "data.ccrop_threshold=0.8"]
    base += ["train.checkpoint_every=1", "eval.final_knn=false"]
    from mimkit.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "full"), *base]) == 0
    real_lr_at = T.lr_at

    def crash_at_step_7(step, *a):  # mid epoch 3, after the box update that closed epoch 2
        if step == 7:
            raise KeyboardInterrupt
        return real_lr_at(step, *a)

    monkeypatch.setattr(T, "lr_at", crash_at_step_7)
    assert main(["pretrain", "--out", str(tmp_path / "cut"), *base]) == 130
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert cut["run"]["step"] == 7 and cut["ccrop_boxes"].shape == (48, 4)
    assert (cut["ccrop_boxes"][:, 2:] - cut["ccrop_boxes"][:, :2]).prod(1).mean() < 0.95  # non-trivial boxes
    monkeypatch.setattr(T, "lr_at", real_lr_at)
    assert main(["pretrain", "--out", str(tmp_path / "cut"), *base]) == 0

    def rows(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in ("img_per_s", "time")} for x in lines]

    assert rows("cut") == rows("full") and sum("ccrop_box_area" in r for r in rows("full")) == 2
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(a["ccrop_boxes"], b["ccrop_boxes"]) and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )

    # the same run folder with another subset: the saved boxes do not fit, and the error names the file
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "cut"), *base, "--max-images", "32"]) == 2
    assert "data.max_images: None -> 32" in capsys.readouterr().err  # another experiment: refused by name
    assert main(["pretrain", "--out", str(tmp_path / "cut"), *base, "--max-images", "32", "--allow-config-change"]) == 2
    err = capsys.readouterr().err  # even when asked to go on: the saved boxes cannot fit
    assert "last.pt' holds ContrastiveCrop boxes for 48 images but the training set has 32" in err


def test_ccrop_keys_parse():
    cfg = build_config([], None, ["data.crop_mode=ccrop", "data.ccrop_alpha=0.1", "data.ccrop_warmup_epochs=5"])
    assert cfg.data.crop_mode == "ccrop" and cfg.data.ccrop_alpha == 0.1 and cfg.data.ccrop_warmup_epochs == 5
    assert random_resized_crop_box(np.random.default_rng(0), 10, 10, (1, 1), (1, 1)) == (0, 0, 10, 10)


def write_scenes(folder, n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """n images of one random-texture square object (a quarter to a half of the side) on a plain grey ground, as
    PNGs in `folder` -> the true boxes (n, 4), relative (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    boxes = []
    for i in range(n):
        img = np.full((size, size, 3), 128, dtype=np.uint8)
        s = int(rng.integers(size // 4, size // 2))
        y, x = (int(v) for v in rng.integers(0, size - s, 2))
        img[y : y + s, x : x + s] = rng.integers(0, 256, (s, s, 3))
        Image.fromarray(img).save(folder / f"scene_{i:02d}.png")
        boxes.append((x / size, y / size, (x + s) / size, (y + s) / size))
    return torch.tensor(boxes)


def check_localised(found: torch.Tensor, true: torch.Tensor, cells: int) -> None:
    """Each edge within 1.5 cells of the `cells` x `cells` heat map (a partly covered cell may stay dark or light
    up whole, and bilinear upsampling spills half a cell), and the box mostly object: IoU > 0.3, mean > 0.45."""
    assert ((found - true).abs() * cells <= 1.5).all(), (found, true)
    x0, y0 = torch.maximum(found[:, 0], true[:, 0]), torch.maximum(found[:, 1], true[:, 1])
    x1, y1 = torch.minimum(found[:, 2], true[:, 2]), torch.minimum(found[:, 3], true[:, 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / (area(found) + area(true) - inter)
    assert iou.min() > 0.3 and iou.mean() > 0.45 and area(found).max() < 0.5, iou


def test_boxes_find_objects_on_a_plain_ground(tmp_path):
    """The whole estimation pass (squashed images, heat map, threshold 0.1) on synthetic scenes. A ResNet's last
    stage (the paper's choice) localises at random initialisation: flat regions give flat, near-zero post-ReLU
    maps. A ViT does when its tokens carry content only (hand-set: position table zeroed); with MAE's fixed sin-cos
    positions a random-init ViT's map is dominated by the positions and does not (docs/methods.md)."""
    import timm

    true = write_scenes(tmp_path / "scenes", 6)
    src = scan_folder(tmp_path / "scenes")
    cfg = DataConfig(image_size=224, num_workers=0, crop_mode="ccrop")
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    check_localised(estimate_boxes(resnet, src, cfg, "cpu", batch_size=6)[0], true, cells=7)
    vit = create_vit("vit_tiny_patch16_224", 224, 16, depth=4)
    with torch.no_grad():
        vit.pos_embed.zero_()
    check_localised(estimate_boxes(vit, src, cfg, "cpu", batch_size=6)[0], true, cells=14)


def test_box_encoder_is_the_online_one():
    from mimkit.data.ccrop import box_encoder
    from mimkit.methods import build_method

    conmim = build_method(build_config(dotted=[*TINY, "method=conmim", "conmim.proj_hidden=16", "conmim.proj_dim=8"]))
    assert box_encoder(conmim) is conmim.student["vit"] and conmim.encoder is conmim.teacher.module["vit"]
    mae = build_method(build_config(dotted=TINY))
    assert box_encoder(mae) is mae.encoder
