"""The device-resident data path (`data.device_cache`) gives the worker loader's batches: same images, labels,
order, crops and flips; pixels within one uint8 level (measured: identical, as it replays Pillow's resampling)."""

import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import TINY, write_images

from mimkit.config import ConfigError, DataConfig
from mimkit.data import DataError, ImageSource, View
from mimkit.data.device_cache import DeviceCache
from mimkit.data.device_crops import FastCrops
from mimkit.data.folder import scan_folder
from mimkit.data.pipeline import (
    EpochBatchSampler,
    ViewDataset,
    _fallback_box,
    collate,
    contrastive_crop_box,
    prepare_batch,
    random_resized_crop_box,
)
from mimkit.engine.tasks.pretrain import pretrain
from mimkit.engine.trainer.logging import TIMING_KEYS
from mimkit.methods.mae import MAE
from mimkit.run_config import build_config

# Measured on every batch below: 0 differing pixels (max and mean difference 0). The bounds allow one level on a
# rare pixel in case a platform's libm (lanczos' sin) puts a fixed-point tap on the other side of a rounding tie.
MAX_DIFF = 1 / 255 + 1e-6  # in [0, 1] pixel units
MEAN_DIFF = 1e-4

TWO_GROUPS = [
    View("image", 16),
    View("tokens", 8, "lanczos", normalize="unit"),  # BEiT's tokenizer view: smaller, lanczos, same crop
    View("target", 12, "bilinear", crop_group=1),  # a second, independent crop (CMAE's)
]


def random_arrays(n: int, h: int, w: int, seed: int = 0) -> ImageSource:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return ImageSource("memory:random", arrays=arrays, labels=rng.integers(0, 10, n).tolist())


def assert_same_batches(dataset: ViewDataset, epochs=(0, 1), batch_size: int = 8) -> None:
    """Worker-path batches (collate of dataset items, then prepare_batch) vs the cache's, key for key."""
    cfg = dataset.cfg
    cache = DeviceCache(dataset, "cpu", threads=2)
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=dataset.seed)
    batches = 0
    for epoch in epochs:
        sampler.start(epoch)
        cached = iter(cache.loader(sampler, cfg.mean, cfg.std))
        for keys in sampler:
            ref = collate([dataset[k] for k in keys])
            want = prepare_batch(ref, dataset.views, "cpu", cfg.mean, cfg.std)
            got = next(cached)
            assert torch.equal(got["label"], want["label"]) and got["bad"] == ref["bad"]
            for view in dataset.views:
                diff = (got[view.name] - want[view.name]).abs()
                if view.normalize == "mean_std":  # back to [0, 1] units
                    diff = diff * torch.tensor(cfg.std).view(1, 3, 1, 1)
                assert got[view.name].shape == want[view.name].shape
                assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (view, diff.max(), diff.mean())
            batches += 1
    assert batches == len(epochs) * (len(dataset) // batch_size)


def test_rrc_with_flips_matches_worker_loader():
    ds = ViewDataset(random_arrays(40, 24, 20), [View("image", 16)], DataConfig(crop_scale=(0.08, 1.0)), seed=3)
    assert_same_batches(ds)


def test_two_crop_groups_match_worker_loader():
    ds = ViewDataset(random_arrays(32, 20, 28, seed=1), TWO_GROUPS, DataConfig(), seed=5)
    assert_same_batches(ds)


def test_contrastive_crop_past_warmup_matches_worker_loader():
    cfg = DataConfig(crop_mode="ccrop", ccrop_warmup_epochs=1)
    ds = ViewDataset(random_arrays(32, 24, 24, seed=2), TWO_GROUPS, cfg, seed=7)
    g = torch.Generator().manual_seed(0)
    corner = torch.rand(32, 2, generator=g) * 0.5
    ds.boxes.copy_(torch.cat([corner, corner + 0.2 + 0.3 * torch.rand(32, 2, generator=g)], dim=1))
    assert_same_batches(ds, epochs=(1, 2))  # epoch 0 is warm-up (RandomResizedCrop)


def test_png_folder_with_an_unreadable_file_matches_worker_loader(tmp_path):
    for c, cls in enumerate(("a", "b")):
        write_images(tmp_path / cls, 12, size=20, seed=c)
    (tmp_path / "a" / "img_0003.png").write_bytes(b"truncated")  # replaced by the next image, reported as bad
    ds = ViewDataset(scan_folder(tmp_path), [View("image", 16), View("small", 8, "bicubic", "unit")], DataConfig(), 1)
    assert_same_batches(ds, epochs=(0, 1, 2), batch_size=6)


def test_mixed_sizes_are_squashed_and_limits_name_the_folder(tmp_path):
    write_images(tmp_path / "imgs", 3, size=16)
    write_images(tmp_path / "imgs", 1, size=24, seed=1, fmt="jpg")
    src = scan_folder(tmp_path / "imgs")
    ds = ViewDataset(src, [View("image", 12), View("big", 20)], DataConfig(), seed=0)
    cache = DeviceCache(ds, "cpu")
    assert cache.images.shape == (4, 3, 20, 20)  # 0: the largest view
    batch = cache.batch([(0, 0), (0, 3)], ds.cfg.mean, ds.cfg.std)
    assert batch["image"].shape == (2, 3, 12, 12) and batch["big"].shape == (2, 3, 20, 20)
    ds.cfg.device_cache_size = 8
    assert DeviceCache(ds, "cpu").images.shape == (4, 3, 8, 8)
    ds.cfg.device_cache_max_gb = 1e-7
    with pytest.raises(DataError, match=re.escape(f"'{tmp_path / 'imgs'}' at 8x8 need")):
        DeviceCache(ds, "cpu")
    ds.cfg.device_cache_size = -1
    with pytest.raises(ConfigError, match="data.device_cache_size must be >= 0"):
        DeviceCache(ds, "cpu")


def run_metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def tiny_config(out, *extra):
    args = [*TINY, "data.max_images=64", "train.epochs=2", "train.checkpoint_every=2", "train.device=cpu"]
    return build_config(dotted=[*args, f"out={out}", *extra])


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and a shared machine's other core is often busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pretrain_with_device_cache_matches_loader_and_resumes(tmp_path, monkeypatch, one_thread):
    cached = tmp_path / "cached"
    pretrain(tiny_config(cached, "data.device_cache=true"))
    metrics = run_metrics(cached)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 8 and all(np.isfinite(losses))

    loader = tmp_path / "loader"
    pretrain(tiny_config(loader))
    assert losses == pytest.approx([m["loss"] for m in run_metrics(loader) if "loss" in m], rel=1e-5)

    def interrupt(self, step, total):  # a crash after step 3; the checkpoint of step 2 remains
        if step == 3:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(MAE, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(resumed, "data.device_cache=true"))
    monkeypatch.undo()
    pretrain(tiny_config(resumed, "data.device_cache=true"))
    assert run_metrics(resumed) == metrics


# ------------------------------------------------------------------------------------------ data.device_crops=fast
N_DRAWS = 20_000  # per statistic below: its standard error is ~1/140 of the spread it measures


def fast_boxes(cfg: DataConfig, size: int, n: int = N_DRAWS, boxes=None, position: int = 0):
    """n fast-mode crops of group 0 on a size x size image -> (boxes (n, 4), flips (n,))."""
    return FastCrops(cfg, seed=0, width=size, height=size, groups=[0], device="cpu").draw(n, 0, position, boxes)[0]


def sizes(boxes: torch.Tensor):
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def test_fast_crops_are_integer_boxes_inside_with_uniform_area_and_log_aspect():
    # a range where every first try fits (the largest crop is 0.82 of the side), so nothing rejects or falls
    # back and the area fraction is uniform in crop_scale, the log aspect uniform in log crop_ratio
    cfg = DataConfig(crop_scale=(0.08, 0.5), crop_ratio=(0.75, 4 / 3), hflip=False)
    boxes, flips = fast_boxes(cfg, 64)
    w, h = sizes(boxes)
    assert torch.equal(boxes, boxes.round()) and boxes[:, :2].min() >= 0 and boxes[:, 2:].max() <= 64
    assert w.min() > 0 and h.min() > 0 and not flips.any()
    area, log_aspect = w * h / 64**2, torch.log(w / h)
    # integer sides move the area by <= (w + h) / 2 + 1/4 px (< 0.013 here) and the aspect by < 7% (sides >= 15)
    assert 0.08 - 0.013 <= area.min() < 0.09 and 0.49 < area.max() <= 0.5 + 0.013
    assert math.log(0.75) - 0.07 <= log_aspect.min() and log_aspect.max() <= math.log(4 / 3) + 0.07
    # means vs the uniform ones: standard errors 0.12 / sqrt(n) = 0.0009 and 0.17 / sqrt(n) = 0.0012; the bounds
    # are ~5 of them (rounding the sides biases neither by more than ~1e-4)
    assert area.mean().item() == pytest.approx(0.29, abs=0.005)
    assert log_aspect.mean().item() == pytest.approx(0.0, abs=0.006)
    # top-left uniform over the valid positions: mean offset from the middle of the range ~0 (SE ~0.1 px)
    assert (boxes[:, 0] - (64 - w) / 2).mean().abs() < 0.6 and (boxes[:, 1] - (64 - h) / 2).mean().abs() < 0.6


def test_fast_crops_match_the_host_samplers_distribution_and_flip_half():
    cfg = DataConfig()  # scale (0.2, 1), where large crops of other aspects often do not fit and are re-drawn
    boxes, flips = fast_boxes(cfg, 32)
    rng = np.random.default_rng(0)
    ref = torch.tensor([random_resized_crop_box(rng, 32, 32, cfg.crop_scale, cfg.crop_ratio) for _ in range(N_DRAWS)])
    for got, want in zip(sizes(boxes), sizes(ref.double())):  # SE of a difference of means: 0.23 * 32 / 100
        assert got.mean().item() == pytest.approx(want.mean().item(), abs=0.4)
    area, ref_area = (lambda w, h: w * h / 32**2)(*sizes(boxes)), (lambda w, h: w * h / 32**2)(*sizes(ref.double()))
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.012)  # SE 0.0023
    assert area.min() >= 0.2 - 0.03 and area.max() <= 1.0
    assert flips.float().mean().item() == pytest.approx(0.5, abs=0.02)  # binomial SE 0.0035


def test_fast_crops_fall_back_to_the_centred_box():
    cfg = DataConfig(crop_scale=(0.9, 1.0), crop_ratio=(4.0, 5.0))  # no try fits a square image
    boxes, _ = fast_boxes(cfg, 16, n=64)
    assert (boxes == torch.tensor(_fallback_box(16, 16, cfg.crop_ratio), dtype=boxes.dtype)).all()


def test_fast_contrastive_crops_centre_inside_the_box_with_beta_placement():
    cfg = DataConfig(crop_mode="ccrop", crop_scale=(0.05, 0.1), ccrop_alpha=0.6)  # small crops: no clamping
    g = torch.Generator().manual_seed(0)
    corner = 0.3 + 0.1 * torch.rand(N_DRAWS, 2, generator=g)
    rel = torch.cat([corner, corner + 0.1 + 0.2 * torch.rand(N_DRAWS, 2, generator=g)], dim=1)
    boxes, _ = fast_boxes(cfg, 64, boxes=rel)
    w, h = sizes(boxes)
    cx, cy = boxes[:, 0] + torch.floor(w / 2), boxes[:, 1] + torch.floor(h / 2)
    px = (rel.double() * 64).floor()
    assert ((cx >= px[:, 0]) & (cx <= px[:, 2]) & (cy >= px[:, 1]) & (cy <= px[:, 3])).all()
    # placement in the box, against the host sampler's on the same boxes: Beta(0.6, 0.6) truncated to whole pixels
    # (mean ~0.454, variance ~0.110; uniform placement would give ~0.083). SEs of the differences: 0.0033, ~0.0017
    rng = np.random.default_rng(0)
    ref = torch.tensor(
        [contrastive_crop_box(rng, 64, 64, cfg.crop_scale, cfg.crop_ratio, b.tolist(), 0.6) for b in rel]
    ).double()

    def placement(b):  # the centre's place between the box edges, in [0, 1]
        return (b[:, 0] + torch.floor(sizes(b)[0] / 2) - px[:, 0]) / (px[:, 2] - px[:, 0])

    t, t_ref = placement(boxes), placement(ref)
    assert t.mean().item() == pytest.approx(t_ref.mean().item(), abs=0.015)
    assert t.var().item() == pytest.approx(t_ref.var().item(), abs=0.008) and t.var() > 0.1


def fast_cache(n=40, crop_mode="rrc"):
    cfg = DataConfig(device_crops="fast", crop_mode=crop_mode, ccrop_warmup_epochs=1)
    ds = ViewDataset(random_arrays(n, 24, 20), TWO_GROUPS, cfg, seed=3)
    return ds, DeviceCache(ds, "cpu", threads=2)


def test_fast_crops_are_deterministic_and_resume_mid_epoch():
    ds, cache = fast_cache(crop_mode="ccrop")
    keys = [(1, i) for i in range(8)]
    one, two = (cache.collate(keys, position=16) for _ in range(2))
    assert all(torch.equal(one[v.name], two[v.name]) for v in ds.views)
    assert not torch.equal(one["image"], cache.collate(keys, position=24)["image"])
    sampler = EpochBatchSampler(len(ds), 8, seed=ds.seed)
    for epoch in (0, 1):  # RandomResizedCrop (warm-up), then ContrastiveCrop
        sampler.start(epoch)
        whole = list(cache.loader(sampler, ds.cfg.mean, ds.cfg.std))
        sampler.start(epoch, 2)
        resumed = list(cache.loader(sampler, ds.cfg.mean, ds.cfg.std))
        assert len(resumed) == len(whole) - 2
        for a, b in zip(whole[2:], resumed):
            assert all(torch.equal(a[k], b[k]) for k in ("image", "tokens", "target", "label"))


def test_bad_device_crops_is_a_config_error():
    ds = ViewDataset(random_arrays(8, 16, 16), [View("image", 8)], DataConfig(device_crops="slow"), seed=0)
    with pytest.raises(ConfigError, match="data.device_crops must be 'exact' or 'fast', got 'slow'"):
        DeviceCache(ds, "cpu")


def test_pretrain_with_fast_device_crops(tmp_path, one_thread):
    pretrain(tiny_config(tmp_path, "data.device_cache=true", "data.device_crops=fast"))
    losses = [m["loss"] for m in run_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 8 and all(np.isfinite(losses))
