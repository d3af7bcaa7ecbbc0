"""data.decode=gpu: JPEG bytes read in workers, decoded in batches by torchvision on the device (here the CPU),
cropped there with the worker loader's keyed boxes: its batches are the worker loader's, up to the decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA
from PIL import Image

from mimkit.config import DataConfig
from mimkit.data.folder import scan_folder, seeded_subset
from mimkit.data.gpu_decode import GPUDecodeLoader
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, train_loader
from mimkit.data.views import View

# Pillow's and torchvision's libjpeg-turbo decode the same files to the same pixels: measured 0 levels of
# difference on these files, 250 Imagenette/CIFAR-10 JPEGs and the decoded batches below; the bound leaves room
# for another libjpeg-turbo build (a level or two, per its changelogs' rounding changes), not for a wrong crop.
JPEG_TOL = 2
VIEWS = (View("image", 16), View("unit", 8, "bilinear", normalize="unit"), View("other", 12, crop_group=1))


def _photo(rng, w: int, h: int) -> Image.Image:
    """Smooth gradients plus a block and noise: JPEG artefacts of every kind, in RGB."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 20, (h, w, 3))
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture
def mixed_folder(tmp_path):
    """Two classes of JPEGs in three sizes and every common encoding (4:2:0, 4:4:4, progressive, greyscale), plus
    what the device does not decode: a PNG and a CMYK JPEG (host-decoded), a truncated JPEG and a non-image
    (unreadable: replaced by the next image)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    sizes = [(24, 20), (32, 32), (20, 28)]
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            img = _photo(rng, *sizes[i % 3])
            kind = i % 6
            if kind == 0:
                img.save(root / c / f"{i:02d}.jpg", quality=90)
            elif kind == 1:
                img.save(root / c / f"{i:02d}.jpg", quality=95, subsampling=0)
            elif kind == 2:
                img.save(root / c / f"{i:02d}.jpg", quality=85, progressive=True)
            elif kind == 3:
                img.convert("L").save(root / c / f"{i:02d}.jpg", quality=90)
            elif kind == 4:
                img.save(root / c / f"{i:02d}.png")
            else:
                img.convert("CMYK").save(root / c / f"{i:02d}.jpg", quality=90)
    buf = io.BytesIO()
    _photo(rng, 32, 32).save(buf, format="JPEG", quality=90)
    (root / "a" / "03_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "05_garbage.jpg").write_bytes(b"not an image at all")
    return root


def data_config(**kw) -> DataConfig:
    return DataConfig(**{"hflip": 0.5, "crop_scale": (0.3, 1.0), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3),
                         **kw})  # fmt: skip


def reference_batches(ds: ViewDataset, sampler: EpochBatchSampler) -> list[dict]:
    return list(train_loader(ds, sampler, num_workers=0, pin=False))


def assert_same_batches(gpu_batches: list[dict], reference: list[dict], views=VIEWS, tol: int = JPEG_TOL) -> int:
    """Every view within `tol` levels, labels and unreadable files equal. -> the largest difference seen."""
    assert len(gpu_batches) == len(reference) > 0
    worst = 0
    for ours, ref in zip(gpu_batches, reference):
        for view in views:
            diff = (ours[view.name].int() - ref[view.name].int()).abs().max().item()
            worst = max(worst, diff)
        assert torch.equal(ours["label"].cpu(), ref["label"]) and ours["bad"] == ref["bad"]
    assert worst <= tol
    return worst


def raw_batches(loader: GPUDecodeLoader) -> list[dict]:
    """The loader's uint8 batches (before normalisation), through its own worker DataLoader."""
    return [loader.collate(items) for items in loader.loader]


def host_decoded_images(ds: ViewDataset, sampler: EpochBatchSampler) -> int:
    """How many images the sampler's keys read (after replacements) that the device cannot decode: PNG, CMYK."""
    used = [ds._load(index)[1] for keys in sampler for _, index in keys]
    paths = [ds.source.paths[i] for i in used]
    return sum(p.endswith(".png") or Image.open(p).mode == "CMYK" for p in paths)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_match_the_worker_loader(mixed_folder, workers):
    ds = ViewDataset(scan_folder(mixed_folder), VIEWS, data_config(), seed=3)
    sampler = EpochBatchSampler(len(ds), 6, seed=3)
    loader = GPUDecodeLoader(ds, sampler, "cpu", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), num_workers=workers)
    host, bad = 0, 0
    for epoch in (0, 1):
        sampler.start(epoch)
        reference = reference_batches(ds, sampler)
        host += host_decoded_images(ds, sampler)
        bad += sum(len(b["bad"]) for b in reference)
        sampler.start(epoch)
        assert assert_same_batches(raw_batches(loader), reference) == 0  # the measured difference (see JPEG_TOL)
    assert loader.cpu_decoded == host > 0 and loader.device_decoded == 2 * 4 * 6 - host
    assert bad > 0  # the unreadable files were met, and replaced as the worker loader replaces them


def test_normalised_batches_resume_mid_epoch(mixed_folder):
    """Iterated as the engine does (normalised views on the device), positioned by sampler.start(epoch, batch):
    the tail of the epoch, as the worker loader prepares it."""
    from mimkit.data.pipeline import prepare_batch

    cfg = data_config()
    ds = ViewDataset(scan_folder(mixed_folder), VIEWS, cfg, seed=1)
    sampler = EpochBatchSampler(len(ds), 4, seed=1)
    loader = GPUDecodeLoader(ds, sampler, "cpu", cfg.mean, cfg.std)
    sampler.start(2)
    full = [prepare_batch(b, VIEWS, "cpu", cfg.mean, cfg.std) for b in reference_batches(ds, sampler)]
    sampler.start(2, 3)
    tail = list(loader)
    assert len(tail) == len(full) - 3
    for ours, ref in zip(tail, full[3:]):
        for view in VIEWS:
            torch.testing.assert_close(ours[view.name], ref[view.name], rtol=0, atol=1e-6)


def test_contrastive_crop_boxes_are_read_live(mixed_folder):
    cfg = data_config(crop_mode="ccrop", ccrop_warmup_epochs=0, ccrop_alpha=0.5)
    ds = ViewDataset(scan_folder(mixed_folder), VIEWS, cfg, seed=2)
    sampler = EpochBatchSampler(len(ds), 8, seed=2)
    loader = GPUDecodeLoader(ds, sampler, "cpu", cfg.mean, cfg.std)
    ds.boxes.copy_(torch.tensor([[0.1, 0.2, 0.5, 0.6]]).expand(len(ds), 4))  # as the loop updates them
    reference = reference_batches(ds, sampler)
    assert_same_batches(raw_batches(loader), reference)


@pytest.mark.skipif(not (SHARED_DATA / "imagenette160").is_dir(), reason="shared Imagenette-160 not present")
def test_real_jpegs_decode_on_the_device_path():
    """48 real 160 px Imagenette JPEGs at 64 px: every image decoded by torchvision, the worker loader's pixels."""
    source = seeded_subset(scan_folder(SHARED_DATA / "imagenette160" / "train"), 48, seed=0)
    views = (View("image", 64),)
    ds = ViewDataset(source, views, data_config(), seed=0)
    sampler = EpochBatchSampler(len(ds), 16, seed=0)
    loader = GPUDecodeLoader(ds, sampler, "cpu", (0.5,) * 3, (0.5,) * 3, num_workers=2)
    assert_same_batches(raw_batches(loader), reference_batches(ds, sampler), views, tol=0)
    assert loader.device_decoded == 48 and loader.cpu_decoded == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batches_are_close_to_pillow_s(mixed_folder):
    """On CUDA, nvjpeg decodes: its IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels (not
    measured by this session: no GPU); a wrong crop would differ by far more on these images."""
    ds = ViewDataset(scan_folder(mixed_folder), VIEWS, data_config(), seed=3)
    sampler = EpochBatchSampler(len(ds), 6, seed=3)
    loader = GPUDecodeLoader(ds, sampler, "cuda", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    ours = raw_batches(loader)
    assert ours[0]["image"].device.type == "cuda"
    worst = assert_same_batches(ours, reference_batches(ds, sampler), tol=24)
    print(f"nvjpeg vs Pillow: largest difference {worst} levels")
