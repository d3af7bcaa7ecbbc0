"""Segmentation: metrics against hand counts and scikit-learn, head shapes, paired-folder errors naming the file,
a CLI run end to end, and a model that beats the constant predictor on a learnable task."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import jaccard_score

from mimkit.cli import main
from mimkit.data.folder import DataError
from mimkit.data.segmentation import SegmentationDataset, check_pairs, scan_pairs, synthetic_pairs
from mimkit.engine.tasks.segment import confusion_matrix, constant_confusion, scores, slide_logits
from mimkit.export import export_encoder
from mimkit.models.seg_heads import SegmentationModel, vit_feature_indices
from mimkit.models.vit import create_encoder
from mimkit.run_config import build_config

TINY_VIT = ["model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
SEG_TINY = [*TINY_VIT, "data.num_workers=0", "train.log_every=1", "segment.num_classes=3", "segment.head_width=16"]
COLOURS = np.array([[20, 20, 20], [220, 40, 40], [40, 200, 60]], np.uint8)  # class c is painted COLOURS[c]


def write_pairs(root, n, size=16, seed=0, ignore=None):
    """`n` images of rectangles coloured by their class over class-0 ground (colour = class: trivially
    learnable), masks as 8-bit PNGs; with `ignore`, a 2 px border of the masks is set to it."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in (1, 2):
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2 + 1, 2)
            mask[y : y + h, x : x + w] = c
        img = COLOURS[mask] + rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
        if ignore is not None:
            mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = ignore, ignore, ignore, ignore
        Image.fromarray(img).save(root / "images" / f"p{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"p{i:03d}.png")
    return root


@pytest.fixture
def seg_folder(tmp_path):
    root = tmp_path / "seg"
    write_pairs(root / "train", 24, seed=0, ignore=255)
    write_pairs(root / "val", 8, seed=1, ignore=255)
    return root


# ----------------------------------------------------------------------------------------------- metrics
def test_confusion_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, 3, 255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # the two ignored pixels count nowhere
    r = scores(conf, ["a", "b", "c"])
    # IoU = TP / (TP + FP + FN): a 1/(1+1+1), b 2/(2+1+0), c 1/(1+0+1)
    assert r["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3) and r["pixel_acc"] == pytest.approx(4 / 6)
    # a class absent from both ground truth and predictions has no IoU and stays out of the mean
    r4 = scores(confusion_matrix(pred, target, 4, 255), ["a", "b", "c", "d"])
    assert r4["per_class_iou"]["d"] is None and r4["miou"] == pytest.approx(r["miou"])


def test_miou_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (2, 20, 20), generator=g)
    target[target == 5] = 255  # ignored
    pred = torch.randint(0, 6, (2, 20, 20), generator=g)  # predicts class 5, absent from the ground truth
    pred[pred == 3] = 0  # class 3 is never predicted
    r = scores(confusion_matrix(pred, target, 7, 255), [str(i) for i in range(7)])
    valid = (target != 255).flatten().numpy()
    y, p = target.flatten().numpy()[valid], pred.flatten().numpy()[valid]
    present = sorted(set(y) | set(p))  # class 6: in neither, so no IoU
    per = jaccard_score(y, p, labels=present, average=None)
    assert r["miou"] == pytest.approx(per.mean())
    assert r["per_class_iou"]["5"] == 0.0 and r["per_class_iou"]["6"] is None
    assert [r["per_class_iou"][str(c)] for c in present] == pytest.approx(per)
    assert r["pixel_acc"] == pytest.approx((y == p).mean())


def test_constant_predictor_confusion():
    target = torch.tensor([[0, 1, 1, 2, 255, 1]])
    counts = np.bincount(target[target != 255].numpy(), minlength=3)
    expected = confusion_matrix(torch.ones_like(target), target, 3, 255)
    assert constant_confusion(counts, 1).tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------------- models
def tiny_vit(patch=4, size=32):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=size, patch_size=patch, embed_dim=32,
                             depth=2, num_heads=2, dynamic_img_size=True)  # fmt: skip


@pytest.mark.parametrize("head", ["light", "upernet"])
@pytest.mark.parametrize("backbone", ["vit4", "vit16", "resnet"])
def test_heads_give_class_maps_at_input_size(backbone, head):
    if backbone == "resnet":
        encoder = timm.create_model("resnet10t", num_classes=0)
    else:
        encoder = tiny_vit(patch=int(backbone[3:]))
    model = SegmentationModel(encoder, 5, head, width=16, aux=True).eval()
    for h, w in ((32, 32), (32, 64)):  # ViTs: any multiple of the patch (position embeddings resampled)
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            levels = model.levels(x)
            logits, aux = model(x, with_aux=True)
        assert [tuple(f.shape[-2:]) for f in levels] == [(h // s, w // s) for s in (4, 8, 16, 32)]
        assert logits.shape == aux.shape == (1, 5, h, w)


def test_vit_feature_indices_are_the_ends_of_quarters():
    assert vit_feature_indices(12) == [2, 5, 8, 11] and vit_feature_indices(2) == [0, 0, 1, 1]
    model = SegmentationModel(tiny_vit(), 3, feature_indices=[1, 1, 0, 1])
    assert model.take == [0, 1] and model.pick == [1, 1, 0, 1]


def test_slide_windows_cover_the_image_like_one_pass():
    """A per-pixel model gives the same logits in overlapping windows (edges padded) as on the whole image."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)
    for h, w in ((40, 50), (20, 33)):  # 20 < crop: one padded window
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            assert torch.allclose(slide_logits(model, x, 32, 21, 4), model(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- data
def test_transforms_keep_image_and_mask_aligned(seg_folder):
    pairs = scan_pairs(seg_folder / "train")
    torch.manual_seed(0)
    ds = SegmentationDataset(pairs, True, crop=24, base_size=16, scale_range=(0.5, 2.0), ignore_index=255)
    for i in range(8):
        img, mask = ds[i]
        assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and mask.shape == (24, 24)
        labelled = (mask != 255) & (img.float().sum(0) > 0)  # scaled down: padding is black and ignored
        colour = ((img.permute(1, 2, 0).float()[..., None, :] - torch.tensor(COLOURS).float()) ** 2).sum(-1)
        agree = (colour.argmin(-1) == mask)[labelled].float().mean()
        assert agree > 0.9  # all but the edges, where bilinear and nearest resizing differ
    ev = SegmentationDataset(pairs, False, crop=24, base_size=24, divisor=8)
    img, mask = ev[0]
    assert img.shape == (3, 24, 24) and mask.shape == (16, 16)  # the mask stays at its own size


def test_synthetic_demo_pairs_hold_every_class():
    counts = check_pairs(synthetic_pairs(32, 32, seed=0), 3, 255)
    assert (counts > 0).all()


def test_bad_pairs_are_refused_naming_the_file(tmp_path):
    root = write_pairs(tmp_path / "d", 4)
    (root / "masks" / "p001.png").unlink()
    (root / "masks" / "p003.png").unlink()
    with pytest.raises(DataError, match=r"2 of 4 images .* no mask .*p001.jpg"):
        scan_pairs(root)

    root = write_pairs(tmp_path / "size", 3)
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(root / "masks" / "p002.png")
    with pytest.raises(DataError, match=r"mask '.*size/masks/p002.png' is 12x16 but its image is 16x16"):
        check_pairs(scan_pairs(root), 3, 255)

    root = write_pairs(tmp_path / "ids", 3, ignore=255)
    mask = np.array(Image.open(root / "masks" / "p001.png"))
    mask[5, 5] = 7
    Image.fromarray(mask).save(root / "masks" / "p001.png")
    with pytest.raises(DataError, match=r"mask '.*ids/masks/p001.png' holds class id 7, outside 0..2"):
        check_pairs(scan_pairs(root), 3, 255)
    assert check_pairs(scan_pairs(root), 8, 255)[7] == 1  # with 8 classes the id is fine

    root = write_pairs(tmp_path / "rgb", 2)
    Image.new("RGB", (16, 16)).save(root / "masks" / "p000.png")
    with pytest.raises(DataError, match=r"mask '.*rgb/masks/p000.png' is a RGB image"):
        check_pairs(scan_pairs(root), 3, 255)


def test_bad_input_on_the_command_line(tmp_path, seg_folder, capsys):
    cfg = build_config(dotted=TINY_VIT)
    enc = create_encoder(cfg.model, 16)
    folder = export_encoder(enc, tmp_path / "enc", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = tmp_path / "run"

    def run(checkpoint, *extra):
        argv = ["segment", "--checkpoint", checkpoint, "--data", str(seg_folder), "--out", str(out), *SEG_TINY]
        return main([*argv, *extra]), capsys.readouterr().err

    code, err = run(str(folder), "--model", "resnet18")
    assert code == 2 and f"'{folder}' holds a vit_tiny_patch16_224" in err
    code, err = run("none", "segment.num_classes=2")  # the masks hold id 2
    assert code == 2 and "holds class id 2, outside 0..1" in err
    code, err = run("none", "segment.ignore_index=1")
    assert code == 2 and "segment.ignore_index 1 is a class id" in err
    assert not out.exists()  # nothing written before the input is known good


# --------------------------------------------------------------------------------------------- end to end
def test_cli_run_from_an_export_with_upernet(tmp_path, seg_folder):
    cfg = build_config(dotted=TINY_VIT)
    torch.manual_seed(0)
    folder = export_encoder(create_encoder(cfg.model, 16), tmp_path / "enc", image_size=16, mean=(0.5,) * 3,
                            std=(0.5,) * 3)  # fmt: skip
    out = tmp_path / "run"
    argv = ["segment", "--checkpoint", str(folder), "--data", str(seg_folder), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--image-size", "16", *SEG_TINY, "segment.head=upernet", "segment.aux_weight=0.4",
            "segment.eval_mode=slide", "segment.base_size=16", "segment.class_names=ground,red,green"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "segment.json").read_text())
    assert set(res["per_class_iou"]) == {"ground", "red", "green"}
    present = [v for v in res["per_class_iou"].values() if v is not None]
    assert res["miou"] == pytest.approx(sum(present) / len(present))  # nanmean over the classes present
    assert res["constant_baseline"]["class"] == "ground" and res["steps"] == 3 and res["eval_mode"] == "slide"
    assert res["checkpoint"] == str(folder) and res["config"]["segment"]["head"] == "upernet"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3] and "miou" in lines[-1]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["class_names"] == ["ground", "red", "green"]
    model = SegmentationModel(tiny_vit(size=16), 3, "upernet", width=16, aux=True)
    model.load_state_dict(state["model"])  # the saved weights rebuild the model exactly


def test_model_beats_the_constant_predictor(tmp_path, seg_folder):
    out = tmp_path / "run"
    argv = ["segment", "--checkpoint", "none", "--data", str(seg_folder), "--out", str(out), "--epochs", "6",
            "--batch-size", "8", "--image-size", "16", *SEG_TINY, "segment.base_size=16", "optim.lr=3e-3",
            "optim.warmup_epochs=0.5", "segment.scale_range=[0.75,1.25]"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "segment.json").read_text())
    assert res["miou"] > res["constant_baseline"]["miou"] + 0.2
    assert res["pixel_acc"] > res["constant_baseline"]["pixel_acc"]


def test_interrupted_run_resumes_after_its_last_epoch(tmp_path, seg_folder, monkeypatch):
    from mimkit.engine.tasks import segment as seg

    def argv(out):
        return ["segment", "--checkpoint", "none", "--data", str(seg_folder), "--out", str(out), "--epochs", "3",
                "--batch-size", "8", "--image-size", "16", *SEG_TINY, "segment.base_size=16"]  # fmt: skip

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 5)) for r in rows if "loss" in r]

    assert main(argv(tmp_path / "whole")) == 0
    real_step, calls = seg.train_step, {"n": 0}

    def stop_in_epoch_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # 3 steps per epoch: the second step of epoch 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(seg, "train_step", stop_in_epoch_three)
    assert main(argv(tmp_path / "cut")) == 130
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["run"]["epoch"] == 2
    monkeypatch.undo()
    assert main(argv(tmp_path / "cut")) == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # same steps, same losses as uninterrupted
    whole = json.loads((tmp_path / "whole" / "segment.json").read_text())
    cut = json.loads((tmp_path / "cut" / "segment.json").read_text())
    assert cut["miou"] == whole["miou"] and cut["steps"] == 9
    assert main(argv(tmp_path / "cut")) == 0  # finished: re-reported, nothing retrained
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
