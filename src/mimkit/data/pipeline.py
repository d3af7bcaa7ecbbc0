"""Datasets and loaders: one seeded crop per image, every view resized from it, resumable batch order.

Randomness in the data never depends on worker scheduling: each (epoch, index) pair seeds its own generator, so
the same seed gives the same batches with 0 or 8 workers, and a run resumed mid-epoch sees exactly the batches
it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, DataConfig
from .folder import ImageSource
from .views import View

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
MAX_BAD_RETRIES = 50


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) sampled as torchvision's RandomResizedCrop does (10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class ViewDataset(Dataset):
    """Items are keyed by (epoch, index). Training: one random resized crop + flip per key, rendered into every
    view. Evaluation (`train=False`): the centred square resized to each view, no randomness.

    An unreadable file is replaced by the next readable one (so batches keep their shape) and reported in the
    item's `bad` list; the training loop counts them and stops past `data.bad_file_limit`."""

    def __init__(self, source: ImageSource, views: Sequence[View], cfg: DataConfig, seed: int, train: bool = True):
        self.source, self.views, self.cfg, self.seed, self.train = source, tuple(views), cfg, seed, train

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Image.Image, int, list[int]]:
        bad = []
        for k in range(min(MAX_BAD_RETRIES, len(self.source))):
            i = (index + k) % len(self.source)
            try:
                return self.source.load(i), i, bad
            except Exception:  # noqa: BLE001 — truncated JPEG, not an image, permission...
                bad.append(i)
        raise RuntimeError(f"{len(bad)} consecutive unreadable images from index {index} in '{self.source.name}'")

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, used, bad = self._load(index)
        w, h = img.size
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            box = random_resized_crop_box(rng, w, h, self.cfg.crop_scale, self.cfg.crop_ratio)
            flip = self.cfg.hflip and rng.random() < 0.5
        else:
            box, flip = center_box(w, h), False
        item = {}
        for view in self.views:
            out = img.resize((view.size, view.size), RESAMPLE[view.interpolation], box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            item[view.name] = to_uint8_chw(out)
        labels = self.source.labels
        item["label"] = labels[used] if labels is not None else -1
        item["bad"] = bad
        return item


def collate(items: list[dict]) -> dict:
    batch = {}
    for k in items[0]:
        if k == "bad":
            batch[k] = [i for it in items for i in it[k]]
        elif k == "label":
            batch[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
        else:
            batch[k] = torch.stack([it[k] for it in items])
    return batch


class EpochBatchSampler:
    """Seeded permutation per epoch, sharded across ranks, cut into full batches (drop_last, so every step has
    the same shape). `start(epoch, batch)` positions it, which is how a resumed run continues mid-epoch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.first_batch = 0, 0
        if self.batches_per_epoch() == 0:
            raise ConfigError(
                f"train.batch_size {batch_size} x {world} process(es) is more than the {size} training images; "
                "lower --batch-size"
            )

    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.first_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        n = self.batches_per_epoch() * self.batch_size * self.world
        mine = perm[:n][self.rank :: self.world].tolist()
        for b in range(self.first_batch, self.batches_per_epoch()):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


def train_loader(dataset: ViewDataset, sampler: EpochBatchSampler, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator(),  # iterators would otherwise draw a seed from the global RNG (breaks resume)
    )


def eval_loader(dataset: ViewDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator(),
    )


def prepare_batch(batch: dict, views: Sequence[View], device, mean, std) -> dict:
    """uint8 views -> float on `device` ([0, 1] for 'unit' views, mean/std-normalised otherwise)."""
    out = {}
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    for view in views:
        x = batch[view.name].to(device, non_blocking=True).float().div_(255.0)
        out[view.name] = (x - m) / s if view.normalize == "mean_std" else x
    if "label" in batch:
        out["label"] = batch["label"].to(device, non_blocking=True)
    return out
