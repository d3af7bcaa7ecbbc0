"""The device-resident data path (`data.device_cache`) gives the worker loader's batches: same images, labels,
order, crops and flips; pixels within one uint8 level (measured: identical, as it replays Pillow's resampling)."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import TINY, write_images

from mimkit.config import ConfigError, DataConfig, build_config
from mimkit.data import DataError, ImageSource, View
from mimkit.data.device_cache import DeviceCache
from mimkit.data.folder import scan_folder
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, collate, prepare_batch
from mimkit.engine.logging import TIMING_KEYS
from mimkit.engine.train import pretrain
from mimkit.methods.mae import MAE

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
